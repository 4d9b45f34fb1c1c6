"""What the module and the data module read from each other, as typed protocols.

The module reads the data through small protocols, each checked on its own: training
(:class:`TrainingData`: keyword vocabulary and number of pairs), evaluation
(:class:`EvaluationData`), prediction (:class:`PredictionData`) and the tower-output cache
(:class:`TowerOutputData`); the data module reads the module through :class:`DataConsumer`
(whether unpaired images are needed at all). Either side can be replaced by any class with
these members; no other attribute is probed.
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
    """A data module the module trains with reads ``train_info()`` (your own LightningDataModule
    needs only this to train; without it the module takes its ``keyword_vocabulary``)."""

    def train_info(self) -> TrainInfo:
        """The keyword vocabulary and the number of pairs (sets up "fit" if needed)."""
        ...


@runtime_checkable
class EvaluationData(Protocol):
    """A data module the module evaluates with: which set each val / test loader is."""

    def eval_specs(self, stage: str) -> list[EvalSpec]:
        """The evaluation sets of ``"val"`` or ``"test"``, in dataloader order."""
        ...


@runtime_checkable
class PredictionData(Protocol):
    """A data module ``predict`` labels images of."""

    def predict_spec(self) -> EvalSpec:
        """The classes and templates of ``predict`` (after ``predict_dataloader``)."""
        ...

    def predict_paths(self) -> list[str]:
        """The image path of every ``predict`` index."""
        ...


@runtime_checkable
class TowerOutputData(Protocol):
    """A data module that can serve frozen-tower outputs (the module's ``tower_cache``)."""

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
