"""The throughput bench's MLP: sized by parameter count."""

from __future__ import annotations

import pytest
import torch
from chaos_worker.examples import EXAMPLES
from chaos_worker.examples.mlp import ENV, parse_count, width_for
from chaos_worker.training.trainspec import load_trainspec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "count"), [("1M", 1_000_000), ("500k", 500_000), ("2.5M", 2_500_000), ("1234", 1234)]
)
def test_parse_count(text: str, count: int) -> None:
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["", "M", "big", "1"])
def test_parse_count_refuses_what_is_not_a_count(text: str) -> None:
    with pytest.raises(ValueError):
        parse_count(text)


@pytest.mark.parametrize("params", [100_000, 1_000_000, 10_000_000, 50_000_000])
def test_width_gives_about_the_asked_parameters(params: int) -> None:
    width = width_for(params)
    assert abs(4 * (width * width + width) - params) / params < 0.01


def test_factory_builds_four_layers_of_the_asked_size(monkeypatch) -> None:
    monkeypatch.setenv(ENV, "20K")
    spec = load_trainspec(EXAMPLES["mlp"], seed=0, dtype=torch.float32, device="cpu")
    linears = [m for m in spec.model if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4
    assert abs(sum(p.numel() for p in spec.model.parameters()) - 20_000) < 500
    x, y = spec.dataset[0]
    assert spec.loss_fn(spec.model(x[None]), y[None]).shape == (1,)
