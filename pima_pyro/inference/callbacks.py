"""Lightning callbacks of the training loop that are not the loop itself."""

from __future__ import annotations

import logging
import os
import random
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from pima_pyro.files import atomic_torch_save, atomic_write


def numpy_state_as_tensors() -> dict[str, Any]:
    """numpy's global RNG state in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))


def global_rng_state() -> dict[str, Any]:
    """torch's (and CUDA's), numpy's and Python's global RNG states, as tensors and numbers."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state_as_tensors(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    set_numpy_state(state["numpy"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class RNGStateCallback(pl.Callback):
    """Every global RNG state the loop draws from, saved in each checkpoint and restored on
    resume (the loop's own draws are seeded by ``(seed, epoch, step)``; the global torch RNG
    draws the variational globals under ``bayesian_globals``).

    A fresh fit starts every process (spawned ones included) from the state captured when the
    callback was made, so all processes draw the same globals.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = global_rng_state()

    def state_dict(self) -> dict[str, Any]:
        return global_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pending is not None:
            set_global_rng_state(self.pending)
            self.pending = None


def keep_previous(path: str | os.PathLike[str]) -> None:
    """Copy ``path`` to :func:`previous_checkpoint` atomically; ``path`` itself stays in place
    until the new checkpoint replaces it, so a kill at any moment leaves a good file."""
    atomic_write(previous_checkpoint(path), partial(shutil.copyfile, path))


def previous_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.prev.ckpt`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


CONNECTOR_LOGGER = "lightning.pytorch.trainer.connectors.checkpoint_connector"


class EpochEndCheckpoint(Checkpoint):
    """Writes one Lightning checkpoint, ``path``, every ``every_n_epochs`` epochs and after the
    last one (atomically: Lightning writes a temporary file, then renames it). As a
    ``Checkpoint`` it runs after the training plan's end-of-epoch hook, so an epoch found
    non-finite is never saved."""

    def __init__(self, path: str | os.PathLike[str], every_n_epochs: int = 1) -> None:
        self.path, self.every_n_epochs = str(path), every_n_epochs

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # in every process (spawned ones too): Lightning's note that a full checkpoint
        # (optimisers included) is written is not news
        logging.getLogger(CONNECTOR_LOGGER).setLevel(logging.WARNING)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        last = done == trainer.max_epochs or trainer.should_stop
        if done % self.every_n_epochs == 0 or last:
            if trainer.is_global_zero and os.path.exists(self.path):  # keep the last good one
                keep_previous(self.path)
            trainer.save_checkpoint(self.path)  # the full checkpoint: optimisers, loops, RNG


class WeightsOnlyCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with every load ``weights_only=True`` (tensors and plain
    data only: a file cannot run code), also for the weights spawned processes hand back; and
    saves written to ``<name>.<random>.tmp`` in the target folder, then renamed (a kill during
    a write leaves the old file and a temporary that the next fit removes)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
