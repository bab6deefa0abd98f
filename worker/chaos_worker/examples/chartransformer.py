"""A small character-level transformer on a bundled public-domain English corpus.

The corpus (``data/corpus.txt``) holds King James Bible passages, the Declaration of
Independence, two Lincoln speeches and some Shakespeare; see ``examples/README.md``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT = 64
D_MODEL = 64
HEADS = 4
LAYERS = 2


@lru_cache(maxsize=1)
def corpus() -> str:
    """The bundled training text."""
    return resources.files(__package__).joinpath("data").joinpath("corpus.txt").read_text("utf-8")


class CharDataset:
    """Item ``i`` is ``(ids[i : i+ctx], ids[i+1 : i+ctx+1])`` over the corpus' vocabulary."""

    def __init__(self, text: str, context: int = CONTEXT) -> None:
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.context = context
        if len(self.ids) <= context:
            raise ValueError(f"text of {len(self.ids)} chars is too short for context {context}")

    def __len__(self) -> int:
        return len(self.ids) - self.context

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        window = self.ids[index : index + self.context + 1]
        return window[:-1], window[1:]


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP, no dropout."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, final LayerNorm, linear head."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        return self.head(self.ln(self.blocks(x)))


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged over positions: ``[batch, ctx, vocab] -> [batch]``."""
    b, t, v = output.shape
    losses = F.cross_entropy(output.reshape(b * t, v), target.reshape(b * t), reduction="none")
    return losses.view(b, t).mean(dim=1)


def factory(*, seed: int, dtype: torch.dtype, device: torch.device):
    """2 layers, d_model 64, 4 heads, context 64, Adam lr 3e-3, per-position-mean loss."""
    del seed  # the caller seeds torch; the data has no randomness
    dataset = CharDataset(corpus())
    model = CharTransformer(len(dataset.vocab), CONTEXT, D_MODEL, HEADS, LAYERS)
    model = model.to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return model, optimizer, dataset, per_sample_loss
