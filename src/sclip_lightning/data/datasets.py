"""The Dataset classes of the data module: paired and unpaired training items, zero-shot and
retrieval evaluation items, and the seeded L = U split.

Each reads its images through the source's dataset (``base``), or through the frozen-tower
outputs the tower-output cache computed for it (:class:`TowerOutputs`), never both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from sclip_lightning.data import registry
from sclip_lightning.data.sampling import eval_loader, mix_seed, seeded
from sclip_lightning.data.shards import is_paired
from sclip_lightning.data.tower_cache import TowerOutputs
from sclip_lightning.losses.component import check_choice

log = logging.getLogger(__name__)

#: retrieval evaluation: every caption of an image (standard) or one drawn per image (release)
RetrievalProtocol = Literal["all", "one"]


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


class _SeededSubset(Dataset):
    """Training items at positions ``self.indices`` of a base set. A key is a position or
    ``(position, seed)`` from a ``ResumableSampler``: ``_get`` then runs under that seed
    (:func:`~sclip_lightning.data.sampling.seeded`), so its random choices repeat on resume."""

    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return seeded(key, self._get)

    def _get(self, i: int) -> dict[str, Any]:
        raise NotImplementedError


class PairedTrainSet(_SeededSubset):
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


class UnpairedTrainSet(_SeededSubset):
    """Unpaired items ``{"image", "index"}``, and ``"image_strong"`` with a ``strong``
    transform: the strong view of the same image, as pixels, drawn after the weak view under
    the sample's seed. With cached tower outputs ``"image"`` is the cached output and the
    strong view is read live through the base set (the record the cache read)."""

    def __init__(self, base, indices, transform, hidden_labels=False, outputs=None, strong=None):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.hidden_labels, self.strong = hidden_labels, strong
        self.outputs: TowerOutputs = outputs or TowerOutputs()

    def _get(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        if self.outputs.images is not None:
            assert self.outputs.image_source is not None
            source = int(self.outputs.image_source[index])
            out = {"image": self.outputs.images[index], "index": index}
            if self.hidden_labels:
                out["label"] = self.base.labels[source]
            if self.strong is not None:
                out["image_strong"] = self.strong(self.base[source]["image"])
            return out
        item = self.base[index]
        out = {"image": self.transform(item["image"]), "index": index}
        if self.strong is not None:
            out["image_strong"] = self.strong(item["image"])
        if self.hidden_labels:
            out["label"] = item["label"]
        return out


def check_batches(
    n_paired: int,
    batch_size: int,
    n_unpaired: int | None,
    unpaired_batch_size: int,
    combined_mode: str,
) -> None:
    """ValueError when the pairs or the unpaired images (``n_unpaired``; None when they are
    not loaded or streamed) fill less than one batch; a warning when the unpaired loader has
    fewer batches than the paired one and ``min_size`` would end each epoch early."""
    if n_paired < batch_size:
        raise ValueError(
            f"only {n_paired} paired images for batch_size={batch_size}: lower the "
            "batch size or raise label_ratio"
        )
    if n_unpaired is None:
        return
    if n_unpaired < unpaired_batch_size:
        raise ValueError(
            f"the unpaired set has {n_unpaired} images, fewer than one batch "
            f"(unpaired_batch_size={unpaired_batch_size}); lower the batch size, "
            "lower label_ratio, or add unpaired images"
        )
    n_p, n_u = n_paired // batch_size, n_unpaired // unpaired_batch_size
    if combined_mode == "min_size" and n_u < n_p:
        log.warning(
            "the unpaired loader has %d batches, fewer than the paired loader's %d: with "
            "combined_mode='min_size' an epoch ends after %d steps (use "
            "'max_size_cycle' to cycle the unpaired images)", n_u, n_p, n_u,
        )  # fmt: skip


def unpaired_keys(base: Any, indices: list[int]) -> list[str]:
    """A stable key of each of the images ``indices`` of ``base``: its path (its index, as a
    string, for a custom source without ``paths``)."""
    paths = getattr(base, "paths", None)
    return [str(paths[i]) if paths is not None else str(i) for i in indices]


def listing_loader(data: UnpairedTrainSet, seed: int, batch_size: int, num_workers: int) -> Any:
    """Every item of ``data`` once, in order, the last batch kept: item ``i`` is drawn under
    its own seed of (``seed``, ``i``), so a random transform gives the same view every time."""
    keys = [(i, mix_seed(seed, 2, i)) for i in range(len(data))]
    return eval_loader(data, batch_size, num_workers, sampler=keys)


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
        self,
        base,
        transform,
        tokenizer,
        protocol: RetrievalProtocol = "all",
        seed: int = 0,
        outputs=None,
    ):
        check_choice("retrieval_protocol", protocol, RetrievalProtocol)
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
    """The record an item was read from (``skip_corrupt`` may have moved to the next one):
    its ``"record"``. A base of another kind (no ``"record"``): the record whose path is
    the item's, else ``index`` (a random view's path is no record's)."""
    if "record" in item:
        return int(item["record"])
    paths = getattr(base, "paths", None)
    if paths is None or "path" not in item or str(paths[index]) == item["path"]:
        return index
    # never a bare next(): a StopIteration raised here, in a DataLoader, reads as the end
    # of the data and silently ends the epoch
    return next((i for i, p in enumerate(paths) if str(p) == item["path"]), index)


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
class TrainingSplit:
    """The training data of a data module.

    Attributes:
        paired_base: the captioned train split; ``paired_indices`` are its pairs.
        unpaired_base: where unpaired images come from (the same set when L = U), or None
            when they are streamed; ``unpaired_indices`` are its unpaired images.
        unpaired_shards: ``(shards, exclude)`` when the unpaired images are streamed from
            WebDataset shards (``exclude``: the key filter of the pairs, when L = U).
    """

    paired_base: Any
    paired_indices: list[int]
    unpaired_base: Any
    unpaired_indices: list[int]
    unpaired_shards: tuple[Any, Any] | None = None

    def require_labels(self) -> None:
        """ValueError unless every training image has a hidden class label."""
        for name, base in (("paired", self.paired_base), ("unpaired", self.unpaired_base)):
            if getattr(base, "labels", None) is None:
                raise ValueError(
                    f"hidden_labels=True but the {name} source has no per-image labels; use a "
                    "source with labels (synthetic, class_folder, or caption_table with "
                    "dataset_kwargs.label_column)"
                )


def training_split(
    dataset: str,
    root: Path,
    unpaired_dataset: str | None,
    unpaired_root: str | None,
    label_ratio: float,
    split_seed: int,
    source_kwargs: dict[str, Any],
) -> TrainingSplit:
    """Pairs and unpaired images. L = U: ``label_ratio`` of the captioned train split (a
    seeded permutation, :func:`split_labeled`; by key for sources that split themselves) are
    the pairs, the rest unpaired. L != U: all images of ``unpaired_dataset`` are unpaired."""
    shards = None
    if registry.get_source(dataset).split_by_key:  # shards: split by key, pairs materialised
        base = registry.build_captioned(
            dataset, root, "train", label_ratio=label_ratio, split_seed=split_seed,
            **source_kwargs,
        )  # fmt: skip
        paired, rest = list(range(len(base))), list[int]()
        if unpaired_dataset is None:
            shards = (root, partial(is_paired, label_ratio=label_ratio, seed=split_seed))
    else:
        base = registry.build_captioned(dataset, root, "train", **source_kwargs)
        paired, rest = split_labeled(len(base), label_ratio, split_seed)
    split = TrainingSplit(base, paired, base, rest, shards)
    if unpaired_dataset is not None:
        uroot = registry.resolve_root(unpaired_dataset, unpaired_root)
        if registry.get_source(unpaired_dataset).streams:
            split.unpaired_shards, split.unpaired_base, split.unpaired_indices = (
                (uroot, None),
                None,
                [],
            )
        else:
            kw = {"skip_corrupt": source_kwargs.get("skip_corrupt", False)}
            split.unpaired_base = registry.build_unpaired(unpaired_dataset, uroot, **kw)
            split.unpaired_indices = list(range(len(split.unpaired_base)))
    return split
