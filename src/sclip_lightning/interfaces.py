"""What the module and the data module read from each other, as typed protocols.

The module reads the data through small protocols, each checked on its own: training
(:class:`TrainingData`: keyword vocabulary and number of pairs), evaluation
(:class:`EvaluationData`), prediction (:class:`PredictionData`) and the tower-output cache
(:class:`TowerOutputData`); the data module reads the module through :class:`DataConsumer`
(whether unpaired images are needed at all). Either side can be replaced by any class with
these members; no other attribute is probed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sclip_lightning.data.tower_cache import Pass
    from sclip_lightning.evaluation import EvalSpec


@dataclass
class TrainInfo:
    """What the module and its objective take from the training data.

    Attributes:
        keywords: the keyword vocabulary (resolved: a file, the source's own list, or mined).
        num_paired: the number of paired training images (the slots of a per-pair bank).
        paired_captions: every caption of each paired image, in ``pair_index`` order (what
            an objective mines its own vocabulary from, e.g. SemiCLIP's concepts).
        unpaired_index: the ``index`` an unpaired training item carries, in unpaired order
            (empty when unpaired images are streamed without a fixed order).
        unpaired_keys: a stable identifier of each of those images (its path), same order:
            what a file of per-image values (SemiCLIP's stage-1 logits) is keyed by.
    """

    keywords: list[str]
    num_paired: int
    paired_captions: list[list[str]] = field(default_factory=list)
    unpaired_index: list[int] = field(default_factory=list)
    unpaired_keys: list[str] = field(default_factory=list)


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
        image_pass: Pass | None,
        text_pass: Pass | None,
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

    @property
    def uses_strong_view(self) -> bool:
        """Whether unpaired training items also carry ``"image_strong"``: a strongly augmented
        view (RandAugment + Cutout) of the same image, as pixels even with the image cache."""
        ...


@runtime_checkable
class UnpairedData(Protocol):
    """A data module that can list its unpaired training images once, in order (SemiCLIP's
    stage-1 logits are written from it)."""

    def unpaired_dataloader(self, train_view: bool = False) -> Any:
        """Batches ``{"image", "index"}`` over every unpaired training image, in
        ``TrainInfo.unpaired_index`` order, not shuffled, not dropping the last batch, as the
        encoders take them (pixels, or cached tower outputs); ``train_view``: the training
        transform (one random crop) instead of the evaluation one."""
        ...
