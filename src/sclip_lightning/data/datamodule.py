"""The S-CLIP LightningDataModule: paired + unpaired training loaders, evaluation loaders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from sclip_lightning.data import registry
from sclip_lightning.data.augment import build_strong_transform
from sclip_lightning.data.datasets import (
    PairedTrainSet,
    RetrievalProtocol,
    UnpairedTrainSet,
    check_batches,
    listing_loader,
    training_split,
    unpaired_keys,
)
from sclip_lightning.data.eval_sets import Kind, eval_loaders, predict_set
from sclip_lightning.data.keywords import (
    KeywordMatcher,
    KeywordMatching,
    candidate_tables,
    resolve_keywords,
)
from sclip_lightning.data.sampling import ResumableLoader, eval_loader, training_position
from sclip_lightning.data.shards import ShardStream, check_streamed, stream_loader
from sclip_lightning.data.tower_cache import Pass, TowerOutputCache, TowerOutputs
from sclip_lightning.evaluation import EvalSpec
from sclip_lightning.interfaces import TrainInfo
from sclip_lightning.losses.component import check_choice
from sclip_lightning.models import build_tokenizer, build_transforms

log = logging.getLogger(__name__)

CaptionSampling = Literal["random", "first"]
CombinedMode = Literal["min_size", "max_size_cycle", "max_size", "sequential"]


class SCLIPDataModule(L.LightningDataModule):
    """Paired captions + unpaired images for S-CLIP, and evaluation sets.

    L = U (``unpaired_dataset=None``): the captioned train split is split by ``label_ratio``
    with ``split_seed``; the remaining images (captions dropped) are the unpaired set.
    L != U: ``label_ratio`` of the captioned train split are the pairs and all images of
    ``unpaired_dataset`` are unpaired.

    Args:
        dataset: paired source name (``synthetic``, ``rsicd``, ``caption_table``, ...).
        root: its root folder (or table file); ``None`` for ``synthetic`` uses the cache.
        unpaired_dataset: optional separate unpaired source (``image_folder``, ...).
        unpaired_root: its root.
        label_ratio: fraction of the captioned train images kept as pairs, in (0, 1].
        split_seed: seed of the paired/unpaired split.
        order_seed: seed of the training order and of each sample's augmentation and caption
            draw (``None``: the global seed, ``torch.initial_seed()``, as set by
            ``seed_everything``). The order is a function of (seed, epoch), so a run resumed
            mid-epoch from a checkpoint continues on exactly the same batches.
        batch_size: paired images per device and step.
        unpaired_batch_size: unpaired images per device and step.
        eval_batch_size: images per evaluation batch.
        num_workers: loader workers.
        model_name: open_clip model name: its tokenizer and preprocessing are used.
        image_size: override the model's input size.
        keywords: keyword vocabulary: a file path, ``"default"`` (the source's own list, if
            any), ``"mine"`` (top ``num_keywords`` by frequency in the paired captions),
            ``"yake"`` (top ``num_keywords`` by YAKE, the extractor S-CLIP's authors used)
            or None.
        num_keywords: vocabulary size when mining (``"mine"`` or ``"yake"``).
        keyword_matching: ``"tokens"`` (whole words/phrases, case-insensitive) or
            ``"release"`` (the release's case-sensitive ``" k " in " caption "``).
        caption_sampling: ``"random"`` caption per visit (release) or ``"first"``.
        combined_mode: CombinedLoader mode. ``"min_size"``: an epoch is one pass over the
            pairs when the unpaired set is larger, as the release's, so ``max_epochs`` means
            the same for S-CLIP and CLIP; ``"max_size_cycle"``: over the larger, cycling.
        zeroshot: class-labelled evaluation sets as ``"name"`` (same root as ``dataset``)
            or ``"name=root"``; default: ``dataset`` itself if it has classes.
        retrieval: captioned evaluation sets, same syntax; default: ``dataset``.
        val_split, test_split: split names for validation and test.
        retrieval_protocol: ``"all"`` captions per image (standard) or ``"one"`` (release).
        templates: zero-shot prompt templates (``{}`` = class name); default per source.
        skip_corrupt: skip unreadable images (counted and logged) instead of raising.
        unpaired: load the unpaired stream. None: when the attached module's objective uses
            unpaired images (not for the CLIP baseline); True / False force it. Their items
            also carry a strong view, ``"image_strong"`` (:mod:`~sclip_lightning.data.augment`),
            when the module's ``uses_strong_view`` asks (SemiCLIP's stage 2).
        augment: open_clip's random training augmentation; False trains on the evaluation
            transform (deterministic), as the module's image ``tower_cache`` needs.
        shuffle_buffer: samples in the shuffle buffer of unpaired images streamed from
            WebDataset shards (``unpaired_dataset: webdataset``, or ``dataset: webdataset``).
        hidden_labels: add every training image's class label to the batches, for the
            objective's diagnostics (``train/pseudo_label_acc``), never its losses; needs a
            source with labels (``synthetic``, a caption table with ``label_column``).
        predict_root: folder of images for ``predict`` (any depth).
        predict_classes: class names for ``predict``; default: the classes of the first
            zero-shot set (with its templates).
        dataset_kwargs: extra keyword arguments for the paired source (e.g. table columns).
    """

    @property
    def _hp(self) -> Any:
        """``self.hparams`` (typed loosely for mypy)."""
        return self.hparams

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        unpaired_dataset: str | None = None,
        unpaired_root: str | None = None,
        label_ratio: float = 0.1,
        split_seed: int = 0,
        order_seed: int | None = None,
        batch_size: int = 32,
        unpaired_batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        model_name: str = "sclip-tiny",
        image_size: int | None = None,
        keywords: str | None = "default",
        num_keywords: int = 100,
        keyword_matching: KeywordMatching = "tokens",
        caption_sampling: CaptionSampling = "random",
        combined_mode: CombinedMode = "min_size",
        zeroshot: list[str] | None = None,
        retrieval: list[str] | None = None,
        val_split: str = "val",
        test_split: str = "test",
        retrieval_protocol: RetrievalProtocol = "all",
        templates: list[str] | None = None,
        skip_corrupt: bool = False,
        unpaired: bool | None = None,
        augment: bool = True,
        hidden_labels: bool = False,
        shuffle_buffer: int = 1000,
        predict_root: str | None = None,
        predict_classes: list[str] | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0 < label_ratio <= 1:
            raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
        for name, v in (("batch_size", batch_size), ("unpaired_batch_size", unpaired_batch_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        check_choice("keyword_matching", keyword_matching, KeywordMatching)
        check_choice("caption_sampling", caption_sampling, CaptionSampling)
        check_choice("combined_mode", combined_mode, CombinedMode)
        check_choice("retrieval_protocol", retrieval_protocol, RetrievalProtocol)
        registry.get_source(dataset)
        if unpaired_dataset is not None:
            registry.get_source(unpaired_dataset)
        self.keyword_list: list[str] = []
        self._specs: dict[str, list[EvalSpec]] = {}  # the evaluation sets last built per stage
        self._prepared = False
        self.tower_outputs: TowerOutputCache | None = None
        #: training position from a checkpoint (load_state_dict), applied to the next loaders
        self._resume_position: dict[str, int] | None = None

    def prepare_data(self) -> None:
        registry.resolve_root(self._hp.dataset, self._hp.root)

    def _source_kwargs(self, name: str) -> dict[str, Any]:
        """Keyword arguments of ``name``'s datasets (``dataset_kwargs``: the paired source's)."""
        extra = self._hp.dataset_kwargs or {} if name == self._hp.dataset else {}
        return {"skip_corrupt": self._hp.skip_corrupt, **extra}

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        hp: Any = self.hparams
        self.root = registry.resolve_root(hp.dataset, hp.root)
        self.source = registry.get_source(hp.dataset)
        self.tokenizer = build_tokenizer(hp.model_name)
        self.train_transform = build_transforms(hp.model_name, hp.augment, hp.image_size)
        self.eval_transform = build_transforms(hp.model_name, False, hp.image_size)
        split = training_split(
            hp.dataset, self.root, hp.unpaired_dataset, hp.unpaired_root, hp.label_ratio,
            hp.split_seed, self._source_kwargs(hp.dataset),
        )  # fmt: skip
        self.train_base, self.paired_indices = split.paired_base, split.paired_indices
        self.unpaired_base, self.unpaired_indices = split.unpaired_base, split.unpaired_indices
        self.unpaired_shards = split.unpaired_shards
        if self.unpaired_shards is not None:
            check_streamed(hp.hidden_labels, hp.combined_mode)
        if hp.hidden_labels:
            split.require_labels()
        caps = [c for i in self.paired_indices for c in self.train_base.captions[i]]
        self.keyword_list = resolve_keywords(
            hp.keywords, self.source.keywords, self.root, caps, hp.num_keywords
        )
        self.matcher = KeywordMatcher(self.keyword_list, hp.keyword_matching)
        # keyword candidates of every paired caption, matched once (not at every visit)
        self.caption_keywords = candidate_tables(
            self.matcher, {i: self.train_base.captions[i] for i in self.paired_indices}
        )
        n_p, n_u, k = len(self.paired_indices), len(self.unpaired_indices), len(self.keyword_list)
        log.info("S-CLIP data: %d paired, %d unpaired images, %d keywords", n_p, n_u, k)
        self._prepared = True

    # ------------------------------------------------------------ loaders
    def _train_loader(self, ds: Dataset, batch_size: int, stream: int) -> ResumableLoader:
        nw = self._hp.num_workers
        loader = ResumableLoader(
            ds, batch_size, seed=self._seed(), stream=stream,
            progress=self._progress, num_workers=nw, persistent_workers=nw > 0,
            pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        if self._resume_position is not None:
            loader.load_state_dict(self._resume_position)
        return loader

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where in the training order the run stands."""
        epoch, consumed = self._progress()
        return {"train_position": {"epoch": epoch, "consumed_batches": consumed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called on resume before any loader exists; the loaders start at the position.

        (Lightning also hands each loader its own state, but only when the loaders are
        built after the training state is restored; this path does not depend on it.)
        """
        self._resume_position = state_dict.get("train_position")

    def _progress(self) -> tuple[int, int]:
        return training_position(self.trainer)

    def train_info(self) -> TrainInfo:
        """What the module takes from the training data (:class:`TrainInfo`; no unpaired
        indices or keys for shards). Sets up "fit"."""
        self.setup("fit")
        rest = self.unpaired_indices
        return TrainInfo(
            list(self.keyword_list), len(self.paired_indices),
            [list(self.train_base.captions[i]) for i in self.paired_indices],
            list(rest), unpaired_keys(self.unpaired_base, rest),
        )  # fmt: skip

    def _module_says(self, name: str, default: bool) -> bool:
        """The attached module's :class:`~sclip_lightning.interfaces.DataConsumer` property
        ``name``, read on its own (``default`` without a module or without that property)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, name, default))

    def loads_unpaired(self) -> bool:
        """Whether the training loader carries unpaired images (see ``unpaired``)."""
        if self._hp.unpaired is not None:
            return bool(self._hp.unpaired)
        return self._module_says("uses_unpaired", True)

    def loads_strong_view(self) -> bool:
        """Whether unpaired training items carry ``"image_strong"`` (pixels, also with the
        image cache): when the module's ``uses_strong_view`` says so; False without one."""
        return self._module_says("uses_strong_view", False)

    # ------------------------------------------------------ tower outputs
    def use_tower_outputs(
        self,
        image_pass: Pass | None = None,
        text_pass: Pass | None = None,
        image_key: dict[str, Any] | None = None,
        text_key: dict[str, Any] | None = None,
        directory: str | Path | None = None,
    ) -> None:
        """Serve frozen-tower outputs instead of pixels / tokens (the tower-output cache of
        :class:`~sclip_lightning.towers.CachedTowers`): the outputs of every training and
        evaluation set are computed on first use and kept (in memory, or under
        ``directory``); ``predict`` keeps reading pixels. ValueError when images are to be
        cached but training augmentation is random."""
        if image_pass is not None and self._hp.augment:
            raise ValueError(
                "the image tower-output cache needs deterministic training images: set "
                "data.augment: false (random crops would be frozen into the cache)"
            )
        self.setup("fit")
        self.tower_outputs = TowerOutputCache(
            image_pass, text_pass, image_key or {}, text_key or {}, self.eval_transform,
            self.tokenizer, directory, self._hp.eval_batch_size, self._hp.num_workers,
        )  # fmt: skip

    def _outputs(self, name: str, base: Any, captions: bool) -> TowerOutputs | None:
        if self.tower_outputs is None:
            return None
        return self.tower_outputs.outputs(name, base, captions)

    def paired_train_set(self) -> PairedTrainSet:
        hp, base = self._hp, self.train_base
        return PairedTrainSet(
            base, self.paired_indices, self.train_transform, self.tokenizer, self.matcher,
            hp.caption_sampling, hp.hidden_labels, self._outputs(f"{hp.dataset}/train", base, True),
            self.caption_keywords,
        )  # fmt: skip

    def _seed(self) -> int:
        return torch.initial_seed() if self._hp.order_seed is None else self._hp.order_seed

    def _unpaired_outputs(self) -> TowerOutputs | None:
        hp, base, u = self._hp, self.unpaired_base, self._hp.unpaired_dataset
        name = f"{hp.dataset}/train" if u is None else f"{u}/unpaired"
        return self._outputs(name, base, captions=base is self.train_base)

    def unpaired_train_set(self) -> UnpairedTrainSet | ShardStream:
        """The unpaired training images, with their strong view when
        :meth:`loads_strong_view`."""
        hp, view = self._hp, self.loads_strong_view()
        strong = build_strong_transform(hp.model_name, hp.image_size) if view else None
        if self.unpaired_shards is not None:
            shards, exclude = self.unpaired_shards
            return ShardStream(
                shards, self.train_transform, hp.unpaired_batch_size, seed=self._seed(),
                exclude=exclude, shuffle_buffer=hp.shuffle_buffer, skip_corrupt=hp.skip_corrupt,
                strong=strong,
            )  # fmt: skip
        return UnpairedTrainSet(
            self.unpaired_base, self.unpaired_indices, self.train_transform, hp.hidden_labels,
            self._unpaired_outputs(), strong,
        )  # fmt: skip

    def unpaired_dataloader(self, train_view: bool = False) -> DataLoader:
        """:class:`~sclip_lightning.interfaces.UnpairedData`: batches of ``eval_batch_size``.
        ``image``: evaluation-transform pixels, training-transform ones with ``train_view``
        (each crop seeded by ``order_seed`` and the position: the same at every call), or the
        cached tower outputs with the image cache (``train_view`` then changes nothing: the
        cache holds the one deterministic view). ValueError for shards."""
        self.setup("fit")
        if self.unpaired_shards is not None:
            raise ValueError(
                "unpaired images streamed from WebDataset shards have no fixed order to list "
                "once; use an indexed unpaired source (e.g. image_folder) for this"
            )
        hp, transform = self._hp, self.train_transform if train_view else self.eval_transform
        data = UnpairedTrainSet(
            self.unpaired_base, self.unpaired_indices, transform, False, self._unpaired_outputs()
        )
        return listing_loader(data, self._seed(), hp.eval_batch_size, hp.num_workers)

    def train_dataloader(self) -> CombinedLoader:
        hp: Any = self.hparams
        paired = self.paired_train_set()
        unpaired = self.unpaired_train_set() if self.loads_unpaired() else None
        n_u = len(unpaired) if isinstance(unpaired, UnpairedTrainSet) else None
        check_batches(len(paired), hp.batch_size, n_u, hp.unpaired_batch_size, hp.combined_mode)
        loaders: dict[str, DataLoader] = {"paired": self._train_loader(paired, hp.batch_size, 0)}
        if isinstance(unpaired, ShardStream):
            cached = self.tower_outputs is not None and self.tower_outputs.image_pass is not None
            check_streamed(hp.hidden_labels, hp.combined_mode, images_cached=cached)
            loaders["unpaired"] = stream_loader(
                unpaired, len(loaders["paired"]), self._progress, hp.num_workers,
                self._resume_position,
            )  # fmt: skip
        elif unpaired is not None:
            loaders["unpaired"] = self._train_loader(unpaired, hp.unpaired_batch_size, 1)
        self._resume_position = None  # applied once
        return CombinedLoader(loaders, mode=hp.combined_mode)

    def _eval(self, split: str, kinds: tuple[Kind, ...]) -> tuple[list[DataLoader], list[EvalSpec]]:
        return eval_loaders(
            self._hp, split, kinds, self.eval_transform, self.tokenizer, self._outputs,
            self._source_kwargs,
        )  # fmt: skip

    def val_dataloader(self) -> list[DataLoader]:
        loaders, self._specs["val"] = self._eval(self._hp.val_split, ("retrieval",))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        loaders, self._specs["test"] = self._eval(self._hp.test_split, ("zeroshot", "retrieval"))
        return loaders

    def predict_dataloader(self) -> DataLoader:
        hp = self._hp
        keyed, self._predict_spec, self._predict_paths = predict_set(hp, self.eval_transform)
        return eval_loader(keyed, hp.eval_batch_size, hp.num_workers)

    def eval_specs(self, stage: str) -> list[EvalSpec]:
        """The specs of the loaders last built for ``stage`` (``"val"`` or ``"test"``)."""
        if stage not in self._specs:
            self.test_dataloader() if stage == "test" else self.val_dataloader()
        return self._specs[stage]

    def predict_spec(self) -> EvalSpec:
        """The classes and templates ``predict`` labels with (after ``predict_dataloader``)."""
        return self._predict_spec

    def predict_paths(self) -> list[str]:
        """The path of every ``predict`` image, by index (after ``predict_dataloader``)."""
        return self._predict_paths
