"""What the module and the data module read from each other, as typed protocols.

The module reads the data through :class:`TrainingData` (keyword vocabulary and number of
pairs, evaluation sets, what to predict, the tower-output cache); the data module reads the
module through :class:`DataConsumer` (whether unpaired images are needed at all). Either side
can be replaced by any class with these members; no other attribute is probed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from sclip_lightning.evaluation import EvalSpec


@dataclass
class TrainInfo:
    """What the module and its objective take from the training data.

    Attributes:
        keywords: the keyword vocabulary (resolved: a file, the source's own list, or mined).
        num_paired: the number of paired training images (the slots of a per-pair bank).
    """

    keywords: list[str]
    num_paired: int


@runtime_checkable
class TrainingData(Protocol):
    """A data module the module can train, evaluate and predict with
    (:class:`~sclip_lightning.SCLIPDataModule` is one)."""

    def train_info(self) -> TrainInfo:
        """The keyword vocabulary and the number of pairs (sets up "fit" if needed)."""
        ...

    def eval_specs(self, stage: str) -> list[EvalSpec]:
        """The evaluation sets of ``"val"`` or ``"test"``, in dataloader order."""
        ...

    def predict_spec(self) -> EvalSpec:
        """The classes and templates of ``predict`` (after ``predict_dataloader``)."""
        ...

    def predict_paths(self) -> list[str]:
        """The image path of every ``predict`` index."""
        ...

    def use_tower_outputs(
        self,
        image_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        text_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        image_key: dict[str, Any] | None,
        text_key: dict[str, Any] | None,
        directory: str | Path | None,
    ) -> None:
        """Serve frozen-tower outputs instead of pixels / tokens from now on."""
        ...


@runtime_checkable
class DataConsumer(Protocol):
    """What a data module may ask the module it feeds."""

    @property
    def uses_unpaired(self) -> bool:
        """Whether training reads unpaired images (False: the loader skips them)."""
        ...
