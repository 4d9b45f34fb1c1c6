"""Small helpers shared by the tests (the tests folder is on sys.path, see conftest.py)."""

from __future__ import annotations

from typing import Any

import lightning as L


def quiet_cpu_trainer(**overrides: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)
