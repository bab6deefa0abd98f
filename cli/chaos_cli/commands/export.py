"""`chaos export CHECKPOINT --out FILE`: the model's weights of a verified checkpoint, as
a `state_dict` that `model.load_state_dict` takes (`docs/checkpoints.md`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from chaos_cli.errors import UserError

SUFFIXES = (".safetensors", ".pt")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write the model weights of a checkpoint as .safetensors or a torch .pt",
        description="Verify a checkpoint (every file's SHA-256 against its manifest) and "
        "write the model's state_dict (parameters and buffers, no optimizer state). "
        "CHECKPOINT is one checkpoint directory, or a checkpoint directory of a run: its "
        "newest checkpoint that verifies (the final one, if the run ended).",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or its directory")
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="model.safetensors, or model.pt"
    )
    parser.set_defaults(handler=handle)


def _check_out(out: Path) -> None:
    if out.suffix not in SUFFIXES:
        raise UserError(f"--out {out}: name it *.safetensors or *.pt")
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {folder}")


def handle(args: argparse.Namespace) -> int:
    from chaos_worker.config import MAX_STATE_BYTES
    from chaos_worker.replication.checkpoint import CheckpointError, model_weights, resolve

    out = Path(args.out)
    _check_out(out)

    def skip(path: Path, why: str) -> None:
        print(f"chaos export: skipping checkpoint {path}: {why}", file=sys.stderr)

    try:
        path, manifest = resolve(Path(args.checkpoint), MAX_STATE_BYTES, skip)
        weights = model_weights(path, MAX_STATE_BYTES)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
    os.close(fd)
    try:
        if out.suffix == ".pt":
            import torch

            torch.save(weights, partial)
        else:
            from safetensors.torch import save_file

            save_file(weights, partial, metadata={"step": str(manifest.step)})
        os.replace(partial, out)
    except OSError as exc:
        raise UserError(f"--out {out}: {exc.strerror or exc}") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    print(f"{out}: {len(weights)} tensors, the model after {manifest.step} steps, from {path}")
    return 0
