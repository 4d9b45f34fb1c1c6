"""The S-CLIP LightningDataModule: paired + unpaired training loaders, evaluation loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from sclip_lightning.data import registry
from sclip_lightning.data.keywords import KeywordMatcher, load_keywords, mine_keywords
from sclip_lightning.data.sampling import ResumableLoader, seeded
from sclip_lightning.data.shards import ShardLoader, ShardStream, is_paired
from sclip_lightning.data.tower_cache import TowerOutputCache, TowerOutputs
from sclip_lightning.evaluation import EvalSpec
from sclip_lightning.models import build_tokenizer, build_transforms

log = logging.getLogger(__name__)


def split_labeled(n: int, label_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into (paired, rest) with ``int(ratio * n)`` pairs.

    Identical to the release's ``split_data``: the first ``int(n * label_ratio)`` entries of
    ``torch.randperm(n, generator=manual_seed(seed))`` are the pairs (returned sorted).

    Raises:
        ValueError: ``label_ratio`` outside (0, 1] or fewer than one pair would remain.
    """
    if not 0 < label_ratio <= 1:
        raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
    n_paired = int(n * label_ratio)
    if n_paired < 1:
        raise ValueError(f"label_ratio={label_ratio} of {n} images leaves no pair")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:n_paired]), sorted(perm[n_paired:])


class PairedTrainSet(Dataset):
    """Paired training items ``{"image", "text", "keywords", "index", "pair_index"}``.

    One caption per image per visit, drawn at random (``caption_sampling="random"``) or the
    first one; tokenised and matched against the keyword vocabulary here, in the workers.
    """

    def __init__(
        self,
        base,
        indices,
        transform,
        tokenizer,
        matcher,
        caption_sampling="random",
        hidden_labels=False,
        outputs: TowerOutputs | None = None,
        caption_keywords: dict[int, torch.Tensor] | None = None,
    ):
        self.base, self.indices = base, list(indices)
        self.transform, self.tokenizer, self.matcher = transform, tokenizer, matcher
        self.caption_sampling = caption_sampling
        self.hidden_labels = hidden_labels
        self.outputs = outputs or TowerOutputs()
        self.caption_keywords = caption_keywords or {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return seeded(key, self._get)

    def _get(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        cached = self.outputs
        item, image, source = _captioned_image(self.base, cached, self.transform, index)
        caps = item["captions"]
        j = int(torch.randint(len(caps), ()).item()) if self.caption_sampling == "random" else 0
        caption = caps[j]
        text = (
            cached.caption_rows(source)[j]
            if cached.captions is not None
            else self.tokenizer([caption])[0]
        )
        out = {
            "image": image,
            "text": text,
            "keywords": (
                self.caption_keywords[source][j]
                if source in self.caption_keywords
                else self.matcher(caption)
            ),
            "index": index,
            "pair_index": i,  # position among the pairs: the support bank's slot
        }
        if self.hidden_labels:
            out["label"] = item["label"]
        return out


class UnpairedTrainSet(Dataset):
    """Unpaired items ``{"image", "index"}``."""

    def __init__(self, base, indices, transform, hidden_labels=False, outputs=None):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.hidden_labels = hidden_labels
        self.outputs: TowerOutputs = outputs or TowerOutputs()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return seeded(key, self._get)

    def _get(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        if self.outputs.images is not None:
            out = {"image": self.outputs.images[index], "index": index}
            if self.hidden_labels:
                out["label"] = _label(self.base, self.outputs, index)
            return out
        item = self.base[index]
        out = {"image": self.transform(item["image"]), "index": index}
        if self.hidden_labels:
            out["label"] = item["label"]
        return out


class KeyedSet(Dataset):
    """``{"image", "index", <keys>}``: the transformed image, its index and some fields of the
    base item (``("label",)`` for zero-shot evaluation, ``("path",)`` for ``predict``)."""

    def __init__(self, base, transform, keys: tuple[str, ...], outputs=None):
        self.base, self.transform, self.keys = base, transform, keys
        self.outputs: TowerOutputs = outputs or TowerOutputs()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.outputs.images is not None:
            assert self.outputs.image_source is not None
            src = int(self.outputs.image_source[i])
            fields = {
                "label": lambda: self.base.labels[src],
                "path": lambda: str(self.base.paths[src]),
            }
            return {
                "image": self.outputs.images[i],
                "index": i,
                **{k: fields[k]() for k in self.keys},
            }
        item = self.base[i]
        return {
            "image": self.transform(item["image"]),
            "index": i,
            **{k: item[k] for k in self.keys},
        }


class RetrievalSet(Dataset):
    """``{"image", "texts": (n, ctx), "index"}``: every caption (standard protocol) or one
    caption drawn with a fixed per-image seed (the release's protocol)."""

    def __init__(
        self, base, transform, tokenizer, protocol: str = "all", seed: int = 0, outputs=None
    ):
        if protocol not in ("all", "one"):
            raise ValueError(f"retrieval protocol must be 'all' or 'one', got {protocol!r}")
        self.base, self.transform, self.tokenizer = base, transform, tokenizer
        self.protocol, self.seed = protocol, seed
        self.outputs: TowerOutputs = outputs or TowerOutputs()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        cached = self.outputs
        item, image, source = _captioned_image(self.base, cached, self.transform, i)
        caps = item["captions"]
        rows = list(range(len(caps)))
        if self.protocol == "one":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            rows = [int(torch.randint(len(caps), (), generator=g))]
        if cached.captions is not None:
            texts = cached.caption_rows(source)[rows]
        else:
            texts = self.tokenizer([caps[r] for r in rows])
        return {"image": image, "texts": texts, "index": i}


def _record(base, index: int) -> dict[str, Any]:
    """The captions (and hidden label) of record ``index``, without reading its image."""
    rec: dict[str, Any] = {"captions": list(base.captions[index])}
    labels = getattr(base, "labels", None)
    if labels is not None:
        rec["label"] = labels[index]
    return rec


def _captioned_image(
    base, outputs: TowerOutputs, transform, index: int
) -> tuple[dict[str, Any], torch.Tensor, int]:
    """``(record, image, source)`` of captioned record ``index``: the frozen image tower's
    cached output when there is one (the record then read without its image), else the
    transformed pixels; ``source`` is the record actually read."""
    if outputs.images is not None:
        assert outputs.image_source is not None
        source = int(outputs.image_source[index])
        return _record(base, source), outputs.images[index], source
    item = base[index]
    return item, transform(item["image"]), _source_of(base, item, index)


def _source_of(base, item: dict[str, Any], index: int) -> int:
    """The record an item was read from (``skip_corrupt`` may have moved to the next one)."""
    paths = getattr(base, "paths", None)
    if paths is None or "path" not in item or str(paths[index]) == item["path"]:
        return index
    return next(i for i, p in enumerate(paths) if str(p) == item["path"])


def _label(base, outputs: TowerOutputs, index: int) -> int:
    assert outputs.image_source is not None
    return base.labels[int(outputs.image_source[index])]


def collate_retrieval(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack images; concatenate captions with ``text_image`` = batch position of their image."""
    images = torch.stack([b["image"] for b in batch])
    texts = torch.cat([b["texts"] for b in batch])
    owner = torch.cat(
        [torch.full((b["texts"].shape[0],), k, dtype=torch.long) for k, b in enumerate(batch)]
    )
    index = torch.tensor([b["index"] for b in batch])
    return {"image": images, "text": texts, "text_image": owner, "index": index}


@dataclass
class TrainInfo:
    """What the module takes from the training data (``SCLIPDataModule.train_info()``)."""

    keywords: list[str]
    num_paired: int


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
            any), ``"mine"`` (top ``num_keywords`` mined from the paired captions) or None.
        num_keywords: vocabulary size when mining.
        keyword_matching: ``"tokens"`` (whole words/phrases, case-insensitive) or
            ``"release"`` (the release's case-sensitive ``" k " in " caption "``).
        caption_sampling: ``"random"`` caption per visit (release) or ``"first"``.
        combined_mode: CombinedLoader mode. ``"min_size"`` (default) ends the epoch with the
            shorter loader: one pass over the paired images when the unpaired set is larger,
            as the release (whose epoch iterates the paired loader and draws unpaired
            batches alongside), so ``max_epochs`` means the same for S-CLIP and the CLIP
            baseline. ``"max_size_cycle"``: one pass over the larger loader, cycling the other.
        zeroshot: class-labelled evaluation sets as ``"name"`` (same root as ``dataset``)
            or ``"name=root"``; default: ``dataset`` itself if it has classes.
        retrieval: captioned evaluation sets, same syntax; default: ``dataset``.
        val_split, test_split: split names for validation and test.
        retrieval_protocol: ``"all"`` captions per image (standard) or ``"one"`` (release).
        templates: zero-shot prompt templates (``{}`` = class name); default per source.
        skip_corrupt: skip unreadable images (counted and logged) instead of raising.
        unpaired: load the unpaired stream. None (default) follows the attached module's
            ``uses_unpaired`` (False for the CLIP baseline: its unpaired images would never
            be used); True / False force it.
        augment: random training augmentation (open_clip's train transform: random resized
            crop). False trains on the evaluation transform (deterministic): needed by the
            module's image tower-output cache (``tower_cache``).
        shuffle_buffer: samples in the shuffle buffer of unpaired images streamed from
            WebDataset shards (``unpaired_dataset: webdataset``, or ``dataset: webdataset``).
        hidden_labels: add the class label of every training image (paired and unpaired)
            to the batches, so the module can log the accuracy of its pseudo-labels
            (``train/pseudo_label_acc``). Needs a source with per-image labels (``synthetic``,
            or a caption table with ``label_column``); never used by the losses.
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
        keyword_matching: str = "tokens",
        caption_sampling: str = "random",
        combined_mode: str = "min_size",
        zeroshot: list[str] | None = None,
        retrieval: list[str] | None = None,
        val_split: str = "val",
        test_split: str = "test",
        retrieval_protocol: str = "all",
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
        if caption_sampling not in ("random", "first"):
            raise ValueError(
                f"caption_sampling must be 'random' or 'first', got {caption_sampling!r}"
            )
        registry.get_source(dataset)
        if unpaired_dataset is not None:
            registry.get_source(unpaired_dataset)
        self.keyword_list: list[str] = []
        self._prepared = False
        self.tower_outputs: TowerOutputCache | None = None
        #: training position from a checkpoint (load_state_dict), applied to the next loaders
        self._resume_position: dict[str, int] | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        registry.resolve_root(self._hp.dataset, self._hp.root)

    def _kw(self) -> dict[str, Any]:
        return {"skip_corrupt": self._hp.skip_corrupt, **(self._hp.dataset_kwargs or {})}

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        hp: Any = self.hparams
        self.root = registry.resolve_root(hp.dataset, hp.root)
        self.source = registry.get_source(hp.dataset)
        self.tokenizer = build_tokenizer(hp.model_name)
        self.train_transform = build_transforms(hp.model_name, hp.augment, hp.image_size)
        self.eval_transform = build_transforms(hp.model_name, False, hp.image_size)
        self._setup_train()
        self._prepared = True

    def _setup_train(self) -> None:
        hp: Any = self.hparams
        #: (shards, exclude) when the unpaired images are streamed from WebDataset shards
        self.unpaired_shards: tuple[Any, Any] | None = None
        if self.source.split_by_key:  # shards: the L = U split is by key, pairs materialised
            self.train_base = registry.build_captioned(
                hp.dataset, self.root, "train", label_ratio=hp.label_ratio,
                split_seed=hp.split_seed, **self._kw(),
            )  # fmt: skip
            rest: list[int] = []
            self.paired_indices = list(range(len(self.train_base)))
            if hp.unpaired_dataset is None:
                ratio, seed = hp.label_ratio, hp.split_seed
                self.unpaired_shards = (self.root, partial(is_paired, label_ratio=ratio, seed=seed))
        else:
            self.train_base = registry.build_captioned(hp.dataset, self.root, "train", **self._kw())
            n = len(self.train_base)
            self.paired_indices, rest = split_labeled(n, hp.label_ratio, hp.split_seed)
        self.unpaired_base: Any = self.train_base
        self.unpaired_indices = rest
        if hp.unpaired_dataset is not None:
            uroot = registry.resolve_root(hp.unpaired_dataset, hp.unpaired_root)
            if registry.get_source(hp.unpaired_dataset).streams:
                self.unpaired_shards = (uroot, None)
                self.unpaired_base, self.unpaired_indices = None, []
            else:
                self.unpaired_base = registry.build_unpaired(
                    hp.unpaired_dataset, uroot, skip_corrupt=hp.skip_corrupt
                )
                self.unpaired_indices = list(range(len(self.unpaired_base)))
        if self.unpaired_shards is not None:
            self._check_streamed()
        if hp.hidden_labels:
            for name, base in (("paired", self.train_base), ("unpaired", self.unpaired_base)):
                if getattr(base, "labels", None) is None:
                    raise ValueError(
                        f"hidden_labels=True but the {name} source has no per-image labels; "
                        "use a source with labels (synthetic, class_folder, or caption_table "
                        "with dataset_kwargs.label_column)"
                    )
        self.keyword_list = self._keywords()
        self.matcher = KeywordMatcher(self.keyword_list, hp.keyword_matching)
        # keyword candidates of every paired caption, matched once (not at every visit)
        self.caption_keywords = {
            i: self.matcher.table(self.train_base.captions[i]) for i in self.paired_indices
        }
        if self.keyword_list:
            rows = torch.cat(list(self.caption_keywords.values()))
            hit, total = int(rows.any(dim=1).sum()), rows.shape[0]
            if hit == 0:
                log.warning(
                    "none of the %d keywords occurs in any of the %d paired captions: the "
                    "keyword loss will have no signal; check the vocabulary",
                    len(self.keyword_list),
                    total,
                )
            else:
                log.info("keywords: %d of %d paired captions contain one", hit, total)
        log.info(
            "S-CLIP data: %d paired, %d unpaired images, %d keywords",
            len(self.paired_indices),
            len(self.unpaired_indices),
            len(self.keyword_list),
        )

    def _keywords(self) -> list[str]:
        spec = self._hp.keywords
        if spec is None:
            return []
        if spec == "default":
            if self.source.keywords is None:
                return []
            path = self.source.keywords(self.root)
            return load_keywords(path) if path is not None else []
        if spec == "mine":
            caps = [c for i in self.paired_indices for c in self.train_base.captions[i]]
            return mine_keywords(caps, top_k=self._hp.num_keywords)
        return load_keywords(spec)

    # ------------------------------------------------------------ loaders
    def _eval_loader(self, ds: Dataset, batch_size: int, **kw):
        """In-order loader for evaluation and prediction. Its private generator seeds the
        workers, so evaluating (e.g. a sanity check after a resume) never draws from the
        global random state that training continues with."""
        nw = self._hp.num_workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=nw,
            persistent_workers=nw > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(0),
            **kw,
        )

    def _train_loader(self, ds: Dataset, batch_size: int, stream: int) -> ResumableLoader:
        nw = self._hp.num_workers
        seed = self._hp.order_seed
        loader = ResumableLoader(
            ds,
            batch_size,
            seed=torch.initial_seed() if seed is None else seed,
            stream=stream,
            progress=self._progress,
            num_workers=nw,
            persistent_workers=nw > 0,
            pin_memory=torch.cuda.is_available(),
        )
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
        """(epoch, training batches consumed in it), the position a resume must start at."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        done = getattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed", 0)
        if done >= trainer.num_training_batches:  # the epoch is over: next one, from its start
            return trainer.current_epoch + 1, 0
        return trainer.current_epoch, done

    def train_info(self) -> TrainInfo:
        """What the module takes from the training data: the keyword vocabulary (resolved:
        a file, the source's own list, or mined) and the number of pairs. Sets up "fit"."""
        self.setup("fit")
        return TrainInfo(list(self.keyword_list), self.num_paired)

    def loads_unpaired(self) -> bool:
        """Whether the training loader carries unpaired images (see ``unpaired``)."""
        if self._hp.unpaired is not None:
            return bool(self._hp.unpaired)
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, "uses_unpaired", True))

    @property
    def num_paired(self) -> int:
        """Number of paired training images (after :meth:`setup`): the slots of a
        ``support_bank_size=-1`` bank."""
        return len(self.paired_indices)

    # ------------------------------------------------------ tower outputs
    def use_tower_outputs(
        self,
        image_fn=None,
        text_fn=None,
        image_key: dict[str, Any] | None = None,
        text_key: dict[str, Any] | None = None,
        directory: str | Path | None = None,
    ) -> None:
        """Serve frozen-tower outputs instead of pixels / tokens (the tower-output cache).

        Called by :class:`~sclip_lightning.SCLIPModule` (``tower_cache``) in its ``setup``;
        the outputs of every training and evaluation set are computed on first use and
        kept (in memory, or under ``directory``). ``predict`` keeps reading pixels.

        Args:
            image_fn: pixels -> frozen image outputs (None: images are not cached).
            text_fn: tokens -> frozen text outputs (None: captions are not cached).
            image_key, text_key: what the outputs depend on besides the data.
            directory: cache folder, or None for memory only.

        Raises:
            ValueError: images are to be cached but training augmentation is random.
        """
        if image_fn is not None and self._hp.augment:
            raise ValueError(
                "the image tower-output cache needs deterministic training images: set "
                "data.augment: false (random crops would be frozen into the cache)"
            )
        self.setup("fit")
        self.tower_outputs = TowerOutputCache(
            image_fn,
            text_fn,
            image_key or {},
            text_key or {},
            self.eval_transform,
            self.tokenizer,
            directory,
            batch_size=self._hp.eval_batch_size,
            num_workers=self._hp.num_workers,
        )

    def _outputs(self, name: str, base: Any, captions: bool) -> TowerOutputs | None:
        if self.tower_outputs is None:
            return None
        return self.tower_outputs.outputs(name, base, captions)

    def paired_train_set(self) -> PairedTrainSet:
        return PairedTrainSet(
            self.train_base,
            self.paired_indices,
            self.train_transform,
            self.tokenizer,
            self.matcher,
            self._hp.caption_sampling,
            self._hp.hidden_labels,
            self._outputs(f"{self._hp.dataset}/train", self.train_base, captions=True),
            self.caption_keywords,
        )

    def _check_streamed(self) -> None:
        hp: Any = self.hparams
        if hp.hidden_labels:
            raise ValueError("hidden_labels is not available for unpaired images from shards")
        if hp.combined_mode != "min_size":
            raise ValueError(
                "unpaired images streamed from shards are drawn alongside the paired loader: "
                "use combined_mode='min_size' (an epoch is one pass over the pairs)"
            )

    def unpaired_train_set(self) -> UnpairedTrainSet | ShardStream:
        if self.unpaired_shards is not None:
            shards, exclude = self.unpaired_shards
            seed = self._hp.order_seed
            return ShardStream(
                shards,
                self.train_transform,
                self._hp.unpaired_batch_size,
                seed=torch.initial_seed() if seed is None else seed,
                exclude=exclude,
                shuffle_buffer=self._hp.shuffle_buffer,
                skip_corrupt=self._hp.skip_corrupt,
            )
        base = self.unpaired_base
        name = (
            f"{self._hp.dataset}/train"
            if self._hp.unpaired_dataset is None
            else f"{self._hp.unpaired_dataset}/unpaired"
        )
        return UnpairedTrainSet(
            base,
            self.unpaired_indices,
            self.train_transform,
            self._hp.hidden_labels,
            self._outputs(name, base, captions=base is self.train_base),
        )

    def train_dataloader(self) -> CombinedLoader:
        hp: Any = self.hparams
        paired = self.paired_train_set()
        if len(paired) < hp.batch_size:
            raise ValueError(
                f"only {len(paired)} paired images for batch_size={hp.batch_size}: lower the "
                "batch size or raise label_ratio"
            )
        loaders: dict[str, DataLoader] = {"paired": self._train_loader(paired, hp.batch_size, 0)}
        if self.loads_unpaired() and self.unpaired_shards is not None:
            if self.tower_outputs is not None and self.tower_outputs.image_fn is not None:
                raise ValueError(
                    "the image tower-output cache reads every image once up front; unpaired "
                    "images streamed from shards are not cached: use tower_cache: text"
                )
            stream = self.unpaired_train_set()
            assert isinstance(stream, ShardStream)
            shard_loader = ShardLoader(
                stream,
                len(loaders["paired"]),
                self._progress,
                num_workers=hp.num_workers,  # not persistent: each epoch sends its position
                pin_memory=torch.cuda.is_available(),
            )
            if self._resume_position is not None:
                shard_loader.load_state_dict(self._resume_position)
            loaders["unpaired"] = shard_loader
        elif self.loads_unpaired():
            unpaired = self.unpaired_train_set()
            assert isinstance(unpaired, UnpairedTrainSet)
            if len(unpaired) < hp.unpaired_batch_size:
                raise ValueError(
                    f"the unpaired set has {len(unpaired)} images, fewer than one batch "
                    f"(unpaired_batch_size={hp.unpaired_batch_size}); lower the batch size, "
                    "lower label_ratio, or add unpaired images"
                )
            loaders["unpaired"] = self._train_loader(unpaired, hp.unpaired_batch_size, 1)
            n_p, n_u = len(paired) // hp.batch_size, len(unpaired) // hp.unpaired_batch_size
            if hp.combined_mode == "min_size" and n_u < n_p:
                log.warning(
                    "the unpaired loader has %d batches, fewer than the paired loader's %d: with "
                    "combined_mode='min_size' an epoch ends after %d steps (use "
                    "'max_size_cycle' to cycle the unpaired images)",
                    n_u,
                    n_p,
                    n_u,
                )
        self._resume_position = None  # applied once
        return CombinedLoader(loaders, mode=hp.combined_mode)

    def _eval_entries(self, kind: str) -> list[tuple[str, str, Path]]:
        """``(source name, display name, root)`` of each evaluation set of ``kind``. The
        display name is the data set's name (``rsscn7``, not ``rsscn7=/data/RSSCN7``), with
        ``-2``, ``-3`` ... when one source is given twice (two roots)."""
        hp: Any = self.hparams
        given = hp.zeroshot if kind == "zeroshot" else hp.retrieval
        if given is None:
            src = self.source
            has = src.classes if kind == "zeroshot" else src.captioned
            given = [hp.dataset] if has is not None and src.evaluates_itself else []
        out, seen = [], {}  # type: ignore[var-annotated]
        for entry in given:
            name, _, root = entry.partition("=")
            r = registry.resolve_root(name, root or (hp.root if name == hp.dataset else None))
            seen[name] = seen.get(name, 0) + 1
            out.append((name, name if seen[name] == 1 else f"{name}-{seen[name]}", r))
        return out

    def _eval(self, split: str, kinds: tuple[str, ...]) -> tuple[list[DataLoader], list[EvalSpec]]:
        hp: Any = self.hparams
        loaders, specs = [], []
        for kind in kinds:
            for name, label, root in self._eval_entries(kind):
                source = registry.get_source(name)
                if kind == "zeroshot":
                    base = registry.build_classes(name, root, split, skip_corrupt=hp.skip_corrupt)
                    templates = hp.templates or source.templates
                    outputs = self._outputs(f"{label}/{split}", base, captions=False)
                    loaders.append(
                        self._eval_loader(
                            KeyedSet(base, self.eval_transform, ("label",), outputs),
                            hp.eval_batch_size,
                        )
                    )
                    specs.append(EvalSpec(label, kind, list(base.classes), templates, split))
                else:
                    kw = self._kw() if name == hp.dataset else {"skip_corrupt": hp.skip_corrupt}
                    base = registry.build_captioned(name, root, split, **kw)
                    rs = RetrievalSet(
                        base,
                        self.eval_transform,
                        self.tokenizer,
                        hp.retrieval_protocol,
                        outputs=self._outputs(f"{label}/{split}", base, captions=True),
                    )
                    loaders.append(
                        self._eval_loader(rs, hp.eval_batch_size, collate_fn=collate_retrieval)
                    )
                    specs.append(EvalSpec(label, kind, split=split))
        return loaders, specs

    def val_dataloader(self) -> list[DataLoader]:
        loaders, self.val_specs = self._eval(self._hp.val_split, ("retrieval",))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        loaders, self.test_specs = self._eval(self._hp.test_split, ("zeroshot", "retrieval"))
        return loaders

    def predict_dataloader(self) -> DataLoader:
        hp = self._hp
        if hp.predict_root is None:
            raise ValueError("predict needs data.predict_root: a folder of images to label")
        from sclip_lightning.data.generic import ImageFolderUnpaired

        base = ImageFolderUnpaired(hp.predict_root, skip_corrupt=hp.skip_corrupt)
        self.predict_paths = [str(p) for p in base.paths]
        if hp.predict_classes:
            classes, templates = list(hp.predict_classes), hp.templates or self.source.templates
        else:
            entries = self._eval_entries("zeroshot")
            if not entries:
                raise ValueError(
                    "predict needs class names: set data.predict_classes or a zero-shot set"
                )
            name, _, root = entries[0]
            classes = list(registry.build_classes(name, root, hp.test_split).classes)
            templates = hp.templates or registry.get_source(name).templates
        self.predict_spec = EvalSpec(str(hp.predict_root), "predict", classes, list(templates))
        return self._eval_loader(KeyedSet(base, self.eval_transform, ("path",)), hp.eval_batch_size)

    def eval_specs(self, stage: str) -> list[EvalSpec]:
        """The specs of the loaders last built for ``stage`` (``"val"`` or ``"test"``)."""
        if stage == "test":
            if not hasattr(self, "test_specs"):
                self.test_dataloader()
            return self.test_specs
        if not hasattr(self, "val_specs"):
            self.val_dataloader()
        return self.val_specs
