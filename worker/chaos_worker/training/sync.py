"""How a step's work becomes one update of the shared state: the seam for a second
synchronisation strategy (ADR 0003, *A seam for a second synchronisation strategy*).

`Trainer` runs every step's protocol side: the boundary, the split of the step's samples
by the view's speeds, the all-reduce over the view's tree, aborts and replays, publishing
and reporting. What a step computes and what its total does to the state is its `Sync`'s:

- `sample_ids(step)`: the samples the step covers (the members split them);
- `start`, `compute`, `stage`: this member's contribution, written into `buf` (the flat
  buffer every member all-reduces, of one size and dtype for the whole job) and handed to
  the all-reduce bucket by bucket: `start` on the event loop before the compute, `compute`
  on the compute thread, `stage` on the loop once it returned;
- `renew()`: an all-reduce that had `buf` itself on its way (`Contribution.lent`) was
  abandoned: `buf` becomes a fresh buffer, the old one is never written again;
- `update(total, before_change)`: apply the reduced total. Every member (and every
  newcomer replaying totals) applies the same totals in the same order, so all hold the
  same state after each step: that is what joins, replays and checkpoints rely on.

`GradientSync`, the strategy of every job today, all-reduces the gradient sum of one
global batch a step and steps the optimizer with it. A strategy that synchronises every H
steps (the DiLoCo family) is a second `Sync` whose step is one round: `sample_ids` gives H
batches, `compute` runs H local optimizer steps and writes the parameters' change, and
`update` applies the averaged change with an outer optimizer. The loop stays as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from chaos_worker.collective import Contribution, TreeAllReduce
from chaos_worker.config import WorkerConfig
from chaos_worker.training.compute import (
    FlatGradients,
    apply_flat_grads,
    flatten_grads,
    gradient_sum,
    trainable_parameters,
)
from chaos_worker.training.overlap import BucketMap, Release, signal_to
from chaos_worker.training.sampling import step_sample_ids
from chaos_worker.training.staging import BucketStaging
from chaos_worker.training.trainspec import TrainSpec


class Sync(Protocol):
    """One synchronisation strategy: what a step covers, contributes and changes."""

    buf: np.ndarray
    """This member's contribution to a step, all-reduced by every member alike."""

    def sample_ids(self, step: int) -> list[int]:
        """The samples step `step` covers, split among the members by speed."""
        ...

    def start(self, contribution: Contribution, samples: int) -> Release | None:
        """On the event loop, before the compute: how `compute` releases buckets of
        `contribution` as they become final (None: `stage` releases them all)."""
        ...

    def compute(self, ids: Sequence[int], release: Release | None) -> float:
        """On the compute thread: this member's contribution for `ids`, into `buf`;
        returns the summed loss of its samples."""
        ...

    def stage(
        self, contribution: Contribution, release: Release | None, loss: float, samples: int
    ) -> None:
        """On the event loop, after `compute` returned: release what it has not."""
        ...

    def renew(self) -> None:
        """Take a fresh `buf`: the old one may still be read by a link (`Contribution.lent`)."""
        ...

    def update(self, total: np.ndarray, before_change: Callable[[], None]) -> float:
        """Apply the reduced `total` to the state, calling `before_change()` just before
        the state's tensors change; returns the step's mean loss. ValueError, changing
        nothing, for a total that is not one of this strategy's steps."""
        ...


def gradient_layout(spec: TrainSpec) -> tuple[int, np.dtype]:
    """Elements and dtype of what every step of a `GradientSync` all-reduces: the flat
    gradient of the trainable parameters, then the loss and the sample count."""
    flat = flatten_grads(spec.model).detach().cpu().numpy()
    return flat.size + 2, flat.dtype


class GradientSync:
    """Every step all-reduces the gradient sum of the step's global batch; every member
    divides it by the batch and steps its optimizer (the trajectory of `local_step`).

    On a CPU the gradients are views of `buf` (`FlatGradients`), so backward writes the
    contribution in place and releases each bucket as the last backward finishes it
    (`overlap.py`). On a GPU they are views of one vector on the device, and each bucket
    final to the hooks is copied to `buf` on a side stream and released once copied
    (`staging.BucketStaging`). Where that cannot work, the whole buffer is filled and
    released after the compute: with mixed dtypes (no `FlatGradients`); so it is where it
    gains nothing, with one bucket (final only when backward ends).
    """

    def __init__(
        self,
        config: WorkerConfig,
        spec: TrainSpec,
        device: torch.device,
        collective: TreeAllReduce,
    ) -> None:
        """`collective`, sized by `gradient_layout(spec)`, says the buffer and its buckets."""
        self._cfg = config
        self._spec = spec
        self._device = device
        self._collective = collective
        self._grads: FlatGradients | None = None
        self.renew()  # the first `buf`: the collective's (pinned on a GPU, `staging.py`)
        self._buckets = (
            BucketMap(
                trainable_parameters(spec.model),
                bucket_elements=collective.bucket_elements,
                buckets=collective.buckets,
            )
            if self._grads is not None and collective.buckets > 1
            else None
        )
        self._staging = (
            BucketStaging(device, collective.bucket_elements) if device.type != "cpu" else None
        )

    def renew(self) -> None:
        self.buf = self._collective.zeros()
        # on a CPU the gradients are views of `buf`; on a GPU of a vector there that no
        # link reads, so it is kept
        if self._device.type == "cpu" or self._grads is None:
            self._grads = _flat_gradients(self._spec.model, self.buf, self._device)

    def sample_ids(self, step: int) -> list[int]:
        cfg = self._cfg
        return step_sample_ids(cfg.seed, step, cfg.global_batch, len(self._spec.dataset))

    def start(self, contribution: Contribution, samples: int) -> Release | None:
        if self._buckets is None:
            return None
        signal = signal_to(asyncio.get_running_loop(), contribution)
        if self._staging is None or self._grads is None:
            return self._buckets.step(contribution.buf, samples, signal)
        copies = self._staging.step(self._grads.flat, contribution.buf, signal)
        return self._buckets.step(contribution.buf, samples, copies, copies.drain)

    def compute(self, ids: Sequence[int], release: Release | None) -> float:
        loss = gradient_sum(
            self._spec,
            ids,
            micro_batch=self._cfg.micro_batch,
            grads=self._grads,
            last_backward=None if release is None else release.last_backward,
        )
        if release is not None:
            release.computed(loss)
        return loss

    def stage(
        self, contribution: Contribution, release: Release | None, loss: float, samples: int
    ) -> None:
        if release is not None:
            release.finish(loss)
            return
        buf = self.buf
        if self._grads is None:
            buf[:-2] = flatten_grads(self._spec.model).detach().cpu().numpy()
        elif self._grads.flat.device.type != "cpu":
            torch.from_numpy(buf[:-2]).copy_(self._grads.flat)
        buf[-2] = loss
        buf[-1] = samples
        contribution.ready_all()

    def update(self, total: np.ndarray, before_change: Callable[[], None]) -> float:
        batch = self._cfg.global_batch
        if round(float(total[-1])) != batch:
            raise ValueError(f"the step reduced {total[-1]} samples, expected {batch}")
        # both only read it (torch wants a writable array even so)
        gradient = torch.from_numpy(total[:-2] if total.flags.writeable else total[:-2].copy())
        if self._grads is not None:
            self._grads.assign(gradient, 1.0 / batch)
        else:
            apply_flat_grads(self._spec.model, gradient.to(self._device), 1.0 / batch)
        before_change()
        self._spec.optimizer.step()
        return float(total[-2]) / batch


def _flat_gradients(
    model: torch.nn.Module, buf: np.ndarray, device: torch.device
) -> FlatGradients | None:
    """The model's gradients as views of `buf` (on a CPU) or of one vector on `device`;
    None when the parameters' dtypes or devices differ (then each step flattens them)."""
    host = torch.from_numpy(buf[:-2])
    flat = host if device.type == "cpu" else torch.zeros_like(host, device=device)
    return FlatGradients(model, flat) if FlatGradients.fits(model, flat) else None
