"""Checkpoints: crash-safe files (write aside, flush to disk, then rename over the target)
and the random states a bit-identical resume needs."""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and the
    file is renamed over ``path`` (``os.replace``: atomic on POSIX and Windows). A crash at
    any moment leaves either the previous file or the new one, never a truncated mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose local saves are atomic (see :func:`atomic_torch_save`).

    Remote paths (``s3://`` ...) use Lightning's own saving. ``sclip`` installs it by
    default (``trainer.plugins``); with a plain Trainer pass ``plugins=[AtomicCheckpointIO()]``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class RandomStateCheckpoint(Callback):
    """Saves the random states in every checkpoint and restores them on resume.

    Torch (CPU and CUDA), NumPy and Python's ``random`` are restored, so a run resumed from a
    checkpoint draws what the original run would have (with the data module's resumable
    order: the same batches, the same augmentations). States are stored as tensors and plain
    numbers (a checkpoint stays loadable with ``weights_only=True``). Installed by
    :class:`~sclip_lightning.SCLIPModule`.
    """

    @property
    def state_key(self) -> str:
        return "RandomStateCheckpoint"

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["sclip_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_tensors(tuple(np.random.get_state())),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sclip_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
        random.setstate(state["python"])


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    """NumPy's legacy RNG state as tensors and numbers (loadable with ``weights_only``)."""
    name, keys, pos, has_gauss, gauss = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's content, loaded with ``weights_only=True`` (tensors, numbers, strings,
    containers: never code). SCLIPModule checkpoints hold nothing else.

    Raises:
        ValueError: the file holds pickled Python objects; loading them could run code.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds pickled Python objects, and unpickling an "
            "untrusted checkpoint can run arbitrary code (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]}). Checkpoints written by SCLIPModule hold only tensors "
            "and plain values; if you trust this file, load it yourself with "
            "torch.load(..., weights_only=False) and save its 'state_dict'."
        ) from None


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights into ``module`` (no optimiser, schedule or step): every
    tensor of ``module`` must be in it except the objective's that the checkpoint's stage
    did not have (e.g. SemiCLIP's context, new in stage 2); extra entries are an error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_from checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict (a Lightning checkpoint is expected)")
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("criterion.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit this model: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}; init_from takes a checkpoint of the same "
            "model_name (and objective parameters of the same stage or an earlier one)"
        )
