"""Checkpoints of a run: atomic writes, the RNG states, :func:`save_checkpoint` /
:func:`load_checkpoint`, and merging a ``--resume`` request with the saved configuration.

A checkpoint (``checkpoint.pt``) holds the model, the optimiser state, the iteration, the RNG
states (``rng``: rank 0's; ``rng_ranks``: every rank's, several processes), the resolved config,
the elapsed time, the process segments, the model record, and ``world_size`` / ``backend``.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import (
    RESUME_OVERRIDABLE,
    ConfigError,
    TrainConfig,
    _algorithm_key,
    _dataset_key,
    _explicit,
)

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "atomic_write", "rng_state",
           "set_rng_state", "seed_everything", "merge_resume"]

CHECKPOINT = "checkpoint.pt"
_FORMAT = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: Path, write, binary: bool = True) -> None:
    """Write through a temporary file in the same directory, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, iteration: int,
                    config: TrainConfig, elapsed: float, extra: dict | None = None) -> None:
    """Atomically write model, optimiser, iteration, RNG states and config to ``path``."""
    state = {"format": _FORMAT, "iteration": int(iteration), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": rng_state(), "config": asdict(config),
             "elapsed": float(elapsed), "torch_version": str(torch.__version__), **(extra or {})}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def merge_resume(config: TrainConfig, out: Path) -> tuple[TrainConfig, dict]:
    """``(the saved config with the allowed changes of config, the checkpoint)``; a change
    outside :data:`RESUME_OVERRIDABLE` raises :class:`ConfigError`."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # a foreign or corrupt file
        raise ConfigError(f"cannot read the checkpoint {path}: {err}") from None
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    given = {n for n in _explicit(config) if n not in ("out",)}
    changes = {}
    for name in sorted(given):
        new, old = getattr(config, name), getattr(saved, name)
        if name == "algorithm":
            new = _algorithm_key(new)
        if name == "dataset":
            new = _dataset_key(new)
        if new == old:
            continue
        if name not in RESUME_OVERRIDABLE:
            raise ConfigError(f"--resume: {name.replace('_', '-')} {new!r} differs from the "
                              f"run's {old!r}; only {', '.join(sorted(RESUME_OVERRIDABLE))} may "
                              f"change when resuming")
        changes[name] = new
    merged = replace(saved, **changes, out=str(out))
    return merged, ckpt

