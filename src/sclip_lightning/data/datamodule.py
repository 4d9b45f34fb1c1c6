"""The S-CLIP LightningDataModule: paired + unpaired training loaders, evaluation loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from sclip_lightning.data import registry
from sclip_lightning.data.keywords import KeywordMatcher, load_keywords, mine_keywords
from sclip_lightning.data.sampling import ResumableLoader, seeded
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
    ):
        self.base, self.indices = base, list(indices)
        self.transform, self.tokenizer, self.matcher = transform, tokenizer, matcher
        self.caption_sampling = caption_sampling
        self.hidden_labels = hidden_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return seeded(key, self._get)

    def _get(self, i: int) -> dict[str, Any]:
        item = self.base[self.indices[i]]
        caps = item["captions"]
        j = int(torch.randint(len(caps), ()).item()) if self.caption_sampling == "random" else 0
        caption = caps[j]
        out = {
            "image": self.transform(item["image"]),
            "text": self.tokenizer([caption])[0],
            "keywords": self.matcher(caption),
            "index": self.indices[i],
            "pair_index": i,  # position among the pairs: the support bank's slot
        }
        if self.hidden_labels:
            out["label"] = item["label"]
        return out


class UnpairedTrainSet(Dataset):
    """Unpaired items ``{"image", "index"}``."""

    def __init__(self, base, indices, transform, hidden_labels=False):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.hidden_labels = hidden_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return seeded(key, self._get)

    def _get(self, i: int) -> dict[str, Any]:
        item = self.base[self.indices[i]]
        out = {"image": self.transform(item["image"]), "index": self.indices[i]}
        if self.hidden_labels:
            out["label"] = item["label"]
        return out


class KeyedSet(Dataset):
    """``{"image", <keys>}``: the transformed image and some fields of the base item
    (``("label",)`` for zero-shot evaluation, ``("path",)`` for ``predict``)."""

    def __init__(self, base, transform, keys: tuple[str, ...]):
        self.base, self.transform, self.keys = base, transform, keys

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        return {"image": self.transform(item["image"]), **{k: item[k] for k in self.keys}}


class RetrievalSet(Dataset):
    """``{"image", "texts": (n, ctx), "index"}``: every caption (standard protocol) or one
    caption drawn with a fixed per-image seed (the release's protocol)."""

    def __init__(self, base, transform, tokenizer, protocol: str = "all", seed: int = 0):
        if protocol not in ("all", "one"):
            raise ValueError(f"retrieval protocol must be 'all' or 'one', got {protocol!r}")
        self.base, self.transform, self.tokenizer = base, transform, tokenizer
        self.protocol, self.seed = protocol, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        caps = item["captions"]
        if self.protocol == "one":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            caps = [caps[int(torch.randint(len(caps), (), generator=g))]]
        return {"image": self.transform(item["image"]), "texts": self.tokenizer(caps), "index": i}


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
class EvalSpec:
    """One evaluation loader: what it measures and what the module needs to score it."""

    name: str
    kind: str  # "zeroshot" | "retrieval"
    classes: list[str] | None = None
    templates: list[str] | None = None


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
        hidden_labels: bool = False,
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
        self.use_unpaired = True

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
        self.train_transform = build_transforms(hp.model_name, True, hp.image_size)
        self.eval_transform = build_transforms(hp.model_name, False, hp.image_size)
        self._setup_train()
        self._prepared = True

    def _setup_train(self) -> None:
        hp: Any = self.hparams
        self.train_base = registry.build_captioned(hp.dataset, self.root, "train", **self._kw())
        n = len(self.train_base)
        self.paired_indices, rest = split_labeled(n, hp.label_ratio, hp.split_seed)
        if hp.unpaired_dataset is None:
            self.unpaired_base = self.train_base
            self.unpaired_indices = rest
        else:
            uroot = registry.resolve_root(hp.unpaired_dataset, hp.unpaired_root)
            self.unpaired_base = registry.build_unpaired(
                hp.unpaired_dataset, uroot, skip_corrupt=hp.skip_corrupt
            )
            self.unpaired_indices = list(range(len(self.unpaired_base)))
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
        if self.keyword_list:
            paired_caps = [c for i in self.paired_indices for c in self.train_base.captions[i]]
            hit, total = self.matcher.coverage(paired_caps)
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
        position = getattr(self, "_resume_position", None)
        if position is not None:
            loader.load_state_dict(position)
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

    @property
    def num_paired(self) -> int:
        """Number of paired training images (after :meth:`setup`): the slots of a
        ``support_bank_size=-1`` bank."""
        return len(self.paired_indices)

    def paired_train_set(self) -> PairedTrainSet:
        return PairedTrainSet(
            self.train_base,
            self.paired_indices,
            self.train_transform,
            self.tokenizer,
            self.matcher,
            self._hp.caption_sampling,
            self._hp.hidden_labels,
        )

    def unpaired_train_set(self) -> UnpairedTrainSet:
        return UnpairedTrainSet(
            self.unpaired_base, self.unpaired_indices, self.train_transform, self._hp.hidden_labels
        )

    def train_dataloader(self) -> CombinedLoader:
        hp: Any = self.hparams
        paired = self.paired_train_set()
        if len(paired) < hp.batch_size:
            raise ValueError(
                f"only {len(paired)} paired images for batch_size={hp.batch_size}: lower the "
                "batch size or raise label_ratio"
            )
        loaders = {"paired": self._train_loader(paired, hp.batch_size, 0)}
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.use_unpaired = bool(getattr(module, "uses_unpaired", True))
        if self.use_unpaired:
            unpaired = self.unpaired_train_set()
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

    def _eval_entries(self, kind: str, split: str) -> list[tuple[str, str, Path]]:
        hp: Any = self.hparams
        given = hp.zeroshot if kind == "zeroshot" else hp.retrieval
        if given is None:
            src = self.source
            has = src.classes if kind == "zeroshot" else src.captioned
            given = [hp.dataset] if has is not None else []
        out = []
        for entry in given:
            name, _, root = entry.partition("=")
            r = registry.resolve_root(name, root or (hp.root if name == hp.dataset else None))
            out.append((name, entry, r))
        return out

    def _eval(self, split: str, kinds: tuple[str, ...]) -> tuple[list[DataLoader], list[EvalSpec]]:
        hp: Any = self.hparams
        loaders, specs = [], []
        for kind in kinds:
            for name, label, root in self._eval_entries(kind, split):
                source = registry.get_source(name)
                if kind == "zeroshot":
                    base = registry.build_classes(name, root, split, skip_corrupt=hp.skip_corrupt)
                    templates = hp.templates or source.templates
                    loaders.append(
                        self._eval_loader(
                            KeyedSet(base, self.eval_transform, ("label",)),
                            hp.eval_batch_size,
                        )
                    )
                    specs.append(EvalSpec(f"{label}/{split}", kind, list(base.classes), templates))
                else:
                    kw = self._kw() if name == hp.dataset else {"skip_corrupt": hp.skip_corrupt}
                    base = registry.build_captioned(name, root, split, **kw)
                    rs = RetrievalSet(
                        base, self.eval_transform, self.tokenizer, hp.retrieval_protocol
                    )
                    loaders.append(
                        self._eval_loader(rs, hp.eval_batch_size, collate_fn=collate_retrieval)
                    )
                    specs.append(EvalSpec(f"{label}/{split}", kind))
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
        from sclip_lightning.data.datasets import ImageFolderUnpaired

        base = ImageFolderUnpaired(hp.predict_root, skip_corrupt=hp.skip_corrupt)
        if hp.predict_classes:
            classes, templates = list(hp.predict_classes), hp.templates or self.source.templates
        else:
            entries = self._eval_entries("zeroshot", hp.test_split)
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
