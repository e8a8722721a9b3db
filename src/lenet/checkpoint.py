"""Checkpoints: written atomically, loaded without ever unpickling code.

A checkpoint is a plain dict of tensors, numbers and strings saved with `torch.save` and
read back with `torch.load(weights_only=True)`, which refuses any other object. It keeps
everything a bit-identical resume needs: weights, optimizer state, the epoch, RNG states,
the metrics so far, and the config that made it.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from lenet.config import RunConfig
from lenet.errors import CheckpointError, ConfigError
from lenet.files import atomic_write

FORMAT = "lenet-checkpoint"
VERSION = 1


def save(path: Path, *, config: RunConfig, epoch: int, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None, generator: torch.Generator,
         history: list[dict], partial: dict | None = None) -> None:
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_json(),
        "epoch": epoch,  # epochs completed
        "model": model.state_dict(),
        # None (the fused kernel's plain SGD keeps no state) is stored as {}
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()},
        "history": history,
        "partial": partial,  # an interrupted epoch's progress (see Trainer.partial), or None
    }
    # Serialised in memory first: torch's zip writer turns a full disk into an opaque
    # RuntimeError, while a plain write of bytes gives the OSError (ENOSPC) it really is.
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load(path: str | Path) -> dict:
    """Read and check a checkpoint; raise CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors "
                              f"and plain data, which could run code ({first})") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a "
                              f"torch file: {type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lenet checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, "
                              f"expected {VERSION}")
    missing = {"config", "epoch", "model", "optimizer", "rng", "history"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(sorted(missing))}")
    try:
        import json
        state["config"] = RunConfig.from_dict(json.loads(state["config"]), f"{path}:config")
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config is invalid ({e})") from None
    return state


def restore_model(path: Path, state: dict, model: torch.nn.Module) -> None:
    """Load weights into `model`, naming the mismatch if they come from another spec."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: weights do not fit this model's spec ({detail[:300]})"
                              ) from None
