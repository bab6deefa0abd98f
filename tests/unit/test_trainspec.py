"""Loading training factories: validation, one-line errors, seeded determinism."""

from __future__ import annotations

import pytest
import torch
from chaos_worker.examples import EXAMPLES
from chaos_worker.training.trainspec import FactoryError, TrainSpec, load_trainspec

pytestmark = pytest.mark.unit

BAD = "tests.unit.badfactories"
CPU = torch.device("cpu")


def load(entry: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> TrainSpec:
    return load_trainspec(entry, seed=seed, dtype=dtype, device=CPU)


def error(entry: str, dtype: torch.dtype = torch.float32) -> str:
    with pytest.raises(FactoryError) as info:
        load(entry, dtype)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_good_factory_gets_default_loss() -> None:
    spec = load(f"{BAD}:good")
    assert len(spec.dataset) == 4
    out = spec.model(torch.zeros(3, 2))
    assert spec.loss_fn(out, torch.zeros(3, dtype=torch.long)).shape == (3,)


def test_factory_may_return_its_loss() -> None:
    spec = load(f"{BAD}:good_with_loss")
    assert spec.loss_fn(torch.ones(2, 3), None).tolist() == [3.0, 3.0]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("no_colon_here", "malformed entry"),
        (":factory", "malformed entry"),
        (f"{BAD}:", "malformed entry"),
        (f"{BAD}:good:extra", "malformed entry"),
        ("chaos_no_such_module.sub:factory", "module 'chaos_no_such_module.sub' not found"),
        (f"{BAD}:missing", "has no attribute 'missing'"),
        (f"{BAD}:NOT_CALLABLE", "is not callable"),
        (f"{BAD}:raises", "raised RuntimeError: out of memory"),
        (f"{BAD}:wrong_signature", "raised TypeError"),
        (f"{BAD}:returns_none", "must return (model, optimizer, dataset[, loss_fn]), got NoneType"),
        (f"{BAD}:returns_two", "got tuple of length 2"),
        (f"{BAD}:not_a_module", "model must be a torch.nn.Module, got str"),
        (f"{BAD}:not_an_optimizer", "optimizer must be a torch.optim.Optimizer, got str"),
        (f"{BAD}:no_dataset_protocol", "dataset must support len() and indexing"),
        (f"{BAD}:empty_dataset", "dataset is empty"),
        (f"{BAD}:bad_item", "must be an (input, target) pair of tensors"),
        (f"{BAD}:loss_not_callable", "loss_fn must be callable, got str"),
        (f"{BAD}:wrong_dtype", "is torch.float16, expected torch.float32"),
        (f"{BAD}:foreign_optimizer", "not model parameters"),
        (f"{BAD}:frozen_model", "no trainable parameters"),
    ],
)
def test_factory_errors_are_one_clear_line(entry: str, expected: str) -> None:
    assert expected in error(entry)


def test_import_failure_inside_module_names_the_cause(tmp_path, monkeypatch) -> None:
    (tmp_path / "chaos_broken_factory.py").write_text("import chaos_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = error("chaos_broken_factory:factory")
    assert "importing module 'chaos_broken_factory' failed" in message
    assert "chaos_missing_dependency" in message


def test_import_raising_is_reported(tmp_path, monkeypatch) -> None:
    (tmp_path / "chaos_raising_factory.py").write_text("raise ValueError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ValueError: bad config" in error("chaos_raising_factory:factory")


def test_dtype_is_checked_for_examples() -> None:
    spec = load(EXAMPLES["digits"], torch.float64)
    assert all(p.dtype == torch.float64 for p in spec.model.parameters())
    x, y = spec.dataset[0]
    assert x.dtype == torch.float64 and y.dtype == torch.long


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_identical_seeds_give_bit_identical_parameters(name: str) -> None:
    first, second = load(EXAMPLES[name], seed=7), load(EXAMPLES[name], seed=7)
    other = load(EXAMPLES[name], seed=8)

    def same(a: TrainSpec, b: TrainSpec) -> bool:
        pairs = zip(a.model.parameters(), b.model.parameters(), strict=True)
        return all(torch.equal(p, q) for p, q in pairs)

    assert same(first, second)
    assert not same(first, other)


def test_corpus_is_package_data() -> None:
    from importlib import resources

    from chaos_worker.examples.chartransformer import CONTEXT, CharDataset, corpus

    text = resources.files("chaos_worker.examples").joinpath("data/corpus.txt").read_text()
    assert text == corpus() and 20_000 < len(text) < 60_000 and text.isascii()
    data = CharDataset(text)
    x, y = data[5]
    assert x.shape == y.shape == (CONTEXT,) and torch.equal(x[1:], y[:-1])
    assert len(data) == len(text) - CONTEXT
    with pytest.raises(IndexError):
        data[len(data)]
