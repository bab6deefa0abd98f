"""The baseline of `chaos bench throughput`: torch DistributedDataParallel over gloo on
loopback, one spawned process per rank, one torch thread each, keeping the memory it
frees as a Chaos worker does (`chaos_worker.heap`), so the two differ in their data planes.

Every rank loads the same `module:factory` entry as a Chaos worker, takes the same sample
ids per step (`step_sample_ids`) and an even contiguous slice of them, backpropagates the
sum of its per-sample losses scaled so that DDP's averaging over ranks gives the same
`sum / global_batch` gradient Chaos applies, and steps the optimizer. Rank 0 stamps
`time.monotonic()` when each step's `optimizer.step()` has returned; the bench takes the
gaps between consecutive stamps, as the Chaos report takes the gaps between consecutive
completed steps. Every rank also notes its process's CPU time (`time.process_time()`, all
threads, gloo's included) at every step, and when it entered the rendezvous
(`init_process_group`) and came out of it with its DDP model built (the parameters
broadcast from rank 0).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
from dataclasses import dataclass


@dataclass
class DdpResult:
    step_stamps: list[float]
    """monotonic seconds at which rank 0 finished each step."""
    losses: list[float]
    """rank 0's mean loss over its own slice, per step."""
    cpu_s: list[list[float]]
    """per rank, its process's CPU seconds (every thread) when each step had finished."""
    rendezvous_s: float
    """from the last rank entering the rendezvous to the last one leaving it with its DDP
    model built: what meeting costs once every rank is there (start-up skew left out)."""


def train(
    entry: str,
    *,
    workers: int,
    steps: int,
    global_batch: int,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    timeout_s: float = 600.0,
) -> DdpResult:
    """Train `steps` steps of `entry` with `workers` DDP ranks; rank 0's stamps."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    # a pipe per rank: `Connection.send` writes a message over 16 KiB (about 600 steps of
    # stamps) as two writes, so ranks sharing a pipe interleaved and the reader failed
    pipes = [context.Pipe(duplex=False) for _ in range(workers)]
    procs = [
        context.Process(
            target=_rank,
            args=(rank, workers, port, entry, steps, global_batch, seed, dtype, device, tx),
            daemon=True,
        )
        for rank, (_, tx) in enumerate(pipes)
    ]
    for proc in procs:
        proc.start()
    for _, tx in pipes:
        tx.close()
    waiting = {rx: rank for rank, (rx, _) in enumerate(pipes)}
    results: dict[int, object] = {}
    try:
        while waiting:
            ready = multiprocessing.connection.wait(list(waiting), timeout_s)
            if not ready:
                raise RuntimeError(f"DDP baseline: no result within {timeout_s:.0f} s")
            for rx in ready:
                rank = waiting.pop(rx)
                try:
                    _, results[rank] = rx.recv()
                except EOFError:
                    results[rank] = f"rank {rank} exited without a result"
            if any(isinstance(got, str) for got in results.values()):
                break
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    errors = [r for r in results.values() if isinstance(r, str)]
    if failed or errors:
        raise RuntimeError(f"DDP baseline failed: {errors or failed}")
    stamps, losses, _, _ = results[0]
    met = [results[r][3] for r in range(workers)]  # (entered, built) per rank
    rendezvous_s = max(built for _, built in met) - max(entered for entered, _ in met)
    return DdpResult(stamps, losses, [results[r][2] for r in range(workers)], rendezvous_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank, workers, port, entry, steps, global_batch, seed, dtype, device, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import time

    import torch
    import torch.distributed as dist
    from chaos_worker.heap import keep_freed_memory
    from chaos_worker.process import pick_device
    from chaos_worker.training.sampling import step_sample_ids
    from chaos_worker.training.trainspec import load_trainspec
    from torch.nn.parallel import DistributedDataParallel

    keep_freed_memory()  # as a Chaos worker does: the two differ in their data planes only
    torch.set_num_threads(1)
    try:
        where = pick_device(device)
        spec = load_trainspec(entry, seed=seed, dtype=getattr(torch, dtype), device=where)
        entered = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        dist.init_process_group("gloo", rank=rank, world_size=workers)
        model = DistributedDataParallel(spec.model)
        met = (entered, time.monotonic())
        # DDP averages over ranks: scale the summed loss so the gradient is sum / G
        scale = workers / global_batch
        per = [global_batch // workers + (r < global_batch % workers) for r in range(workers)]
        begin = sum(per[:rank])
        stamps, losses, cpu = [], [], []
        for step in range(steps):
            ids = step_sample_ids(seed, step, global_batch, len(spec.dataset))
            mine = ids[begin : begin + per[rank]]
            inputs, targets = zip(*(spec.dataset[int(i)] for i in mine), strict=True)
            x = torch.stack(inputs).to(where)
            y = torch.stack(targets).to(where)
            per_sample = spec.loss_fn(model(x), y)
            (per_sample.sum() * scale).backward()
            spec.optimizer.step()
            spec.optimizer.zero_grad(set_to_none=True)
            if where.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.monotonic())
            cpu.append(time.process_time())
            losses.append(float(per_sample.detach().mean()))
        dist.barrier()
        out.send((rank, (stamps, losses, cpu, met)))
        dist.destroy_process_group()
    except Exception as exc:  # the parent reports it as one line
        out.send((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
