"""Named data sources: how a name + root becomes captioned, class and unpaired datasets.

Add your own with :func:`register_source`; the DataModule and the CLI look names up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from sclip_lightning.data import (
    comics,
    fashion,
    generic,
    remote_sensing,
    scientific,
    shards,
    synthetic,
)
from sclip_lightning.data.base import ConcatCaptioned

AERIAL_TEMPLATES = ["an aerial photograph of {}."]
PHOTO_TEMPLATES = ["a photo of a {}."]


@dataclass
class Source:
    """How to build the datasets of one named source.

    Attributes:
        captioned: ``(root, split, **kwargs) -> CaptionedDataset`` or None.
        classes: ``(root, split, **kwargs) -> class dataset`` (has ``.classes``) or None.
        unpaired: ``(root, **kwargs) -> dataset of images`` (default: captioned train split).
        resolve_root: turns the user's root (may be None) into a usable root.
        keywords: ``root -> keyword file`` (the source's default vocabulary) or None.
        templates: default zero-shot prompt templates (``{}`` = class name).
        split_by_key: the source splits pairs from unpaired images itself (by key, given
            ``label_ratio`` and ``split_seed``) instead of the data module's permutation.
        streams: as ``unpaired_dataset`` the images are streamed (WebDataset shards).
        evaluates_itself: without explicit ``zeroshot`` / ``retrieval`` entries, evaluate on
            this source's own val/test splits (False: its root holds training data only).
        class_splits: the class set honours ``split`` (its val and test images differ);
            False for a plain class folder, which serves every image at every split, so it
            must never score model selection (its "val" images are its test images).
    """

    captioned: Callable[..., Dataset] | None = None
    classes: Callable[..., Dataset] | None = None
    unpaired: Callable[..., Dataset] | None = None
    resolve_root: Callable[[str | None], Path] | None = None
    keywords: Callable[[Path], Path | None] | None = None
    templates: list[str] = field(default_factory=lambda: list(PHOTO_TEMPLATES))
    split_by_key: bool = False
    streams: bool = False
    evaluates_itself: bool = True
    class_splits: bool = True


def _need_root(root: str | None) -> Path:
    if root is None:
        raise ValueError("this data source needs `root` (the folder or file of the data set)")
    return Path(root)


def _class_folder_source(subdir: str | None = None, drop_letter_prefix: bool = False) -> Source:
    """A remote-sensing ``<class>/<images>`` set (zero-shot or unpaired) under ``root[/subdir]``."""

    def build(root: Path, **kw: Any) -> Dataset:
        folder = Path(root) / subdir if subdir else Path(root)
        return generic.ClassFolder(folder, drop_letter_prefix=drop_letter_prefix, **kw)

    return Source(
        classes=lambda root, split, **kw: build(root, **kw),
        unpaired=build,
        resolve_root=_need_root,
        templates=list(AERIAL_TEMPLATES),
        class_splits=False,
    )


def _shard_root(root: str | None) -> Any:
    """Shard specs stay strings: ``Path`` would fold the ``//`` of ``s3://`` or ``https://``."""
    _need_root(root)
    return root


def _synthetic_root(root: str | None) -> Path:
    return synthetic.ensure_synthetic(root)


SOURCES: dict[str, Source] = {
    "synthetic": Source(
        captioned=lambda root, split, **kw: generic.CaptionTable(
            Path(root) / "captions.csv", split=split, label_column="label", **kw
        ),
        classes=lambda root, split, **kw: generic.ClassFolder(Path(root) / (split or "test"), **kw),
        resolve_root=_synthetic_root,
        keywords=lambda root: Path(root) / "keywords.txt",
        templates=list(AERIAL_TEMPLATES),
    ),
    "caption_table": Source(
        captioned=lambda root, split, **kw: generic.CaptionTable(root, split=split, **kw),
        resolve_root=_need_root,
    ),
    "rsicd": Source(
        captioned=lambda root, split, **kw: remote_sensing.RSICD(root, split=split, **kw),
        classes=lambda root, split, **kw: remote_sensing.RSICDClasses(root, split=split, **kw),
        resolve_root=_need_root,
        templates=list(AERIAL_TEMPLATES),
    ),
    "ucm": Source(
        captioned=lambda root, split, **kw: remote_sensing.UCMCaptions(root, split=split, **kw),
        resolve_root=_need_root,
        templates=list(AERIAL_TEMPLATES),
    ),
    "sydney": Source(
        captioned=lambda root, split, **kw: remote_sensing.SydneyCaptions(root, split=split, **kw),
        resolve_root=_need_root,
        templates=list(AERIAL_TEMPLATES),
    ),
    "ucm_cls": _class_folder_source("Images"),
    "whu_rs19": _class_folder_source(),
    "rsscn7": _class_folder_source(drop_letter_prefix=True),
    "aid": _class_folder_source(),
    "resisc45": _class_folder_source(),
    "fashion200k": Source(
        captioned=lambda root, split, **kw: fashion.Fashion200k(root, split=split, **kw),
        classes=lambda root, split, **kw: fashion.Fashion200kClasses(
            root, split=split or "test", **kw
        ),
        resolve_root=_need_root,
    ),
    "fashion200k_sub": Source(
        classes=lambda root, split, **kw: fashion.Fashion200kClasses(
            root, split=split or "test", level="subcategory", **kw
        ),
        resolve_root=_need_root,
    ),
    "fashiongen": Source(
        captioned=lambda root, split, **kw: fashion.FashionGen(root, split=split, **kw),
        classes=lambda root, split, **kw: fashion.FashionGenClasses(
            root, split=split or "val", **kw
        ),
        resolve_root=_need_root,
    ),
    "fashiongen_sub": Source(
        classes=lambda root, split, **kw: fashion.FashionGenClasses(
            root, split=split or "val", level="subcategory", **kw
        ),
        resolve_root=_need_root,
    ),
    "polyvore": Source(
        captioned=lambda root, split, **kw: fashion.Polyvore(root, split=split or "train", **kw),
        classes=lambda root, split, **kw: fashion.PolyvoreClasses(
            root, split=split or "test", **kw
        ),
        resolve_root=_need_root,
    ),
    "scicap": Source(
        captioned=lambda root, split, **kw: scientific.SciCap(root, split=split, **kw),
        resolve_root=_need_root,
    ),
    "rs_all": Source(
        captioned=lambda root, split, **kw: ConcatCaptioned(
            [
                remote_sensing.RSICD(Path(root) / "RSICD", split=split, **kw),
                remote_sensing.UCMCaptions(Path(root) / "UCM_captions", split=split, **kw),
                remote_sensing.SydneyCaptions(Path(root) / "Sydney_captions", split=split, **kw),
            ]
        ),
        resolve_root=_need_root,
        templates=list(AERIAL_TEMPLATES),
    ),
    "fashion_all": Source(
        captioned=lambda root, split, **kw: ConcatCaptioned(
            [
                fashion.Fashion200k(Path(root) / "fashion200k", split=split, **kw),
                fashion.FashionGen(Path(root) / "FashionGen", split=split, **kw),
                fashion.Polyvore(Path(root) / "PolyvoreOutfits", split=split or "train", **kw),
            ]
        ),
        resolve_root=_need_root,
    ),
    "simpsons": Source(
        captioned=lambda root, split, **kw: comics.SimpsonsCaptions(root, split=split, **kw),
        resolve_root=_need_root,
        templates=["a picture of {}, a character from The Simpsons."],
    ),
    "webdataset": Source(
        # root: brace pattern(s) or a list file of shard URLs / paths; the split name is not
        # part of a shard set: give val / test shards as their own entries
        # (retrieval: ["webdataset=/data/val-{000..004}.tar"])
        captioned=lambda root, split, **kw: shards.ShardCaptioned(root, **kw),
        resolve_root=_shard_root,
        split_by_key=True,
        streams=True,
        evaluates_itself=False,
    ),
    "image_folder": Source(
        unpaired=lambda root, **kw: generic.ImageFolderUnpaired(root, **kw),
        resolve_root=_need_root,
    ),
    "class_folder": Source(
        classes=lambda root, split, **kw: generic.ClassFolder(root, **kw),
        unpaired=lambda root, **kw: generic.ClassFolder(root, **kw),
        resolve_root=_need_root,
        class_splits=False,
    ),
}


def register_source(name: str, source: Source, overwrite: bool = False) -> None:
    """Make ``name`` usable as ``dataset=`` / ``unpaired_dataset=`` / eval entries."""
    if name in SOURCES and not overwrite:
        raise ValueError(f"data source {name!r} exists; pass overwrite=True to replace it")
    SOURCES[name] = source


def get_source(name: str) -> Source:
    """Look a source up, with the list of known names in the error."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; known: {sorted(SOURCES)} "
            "(or register your own with sclip_lightning.data.register_source)"
        ) from None


def resolve_root(name: str, root: str | None) -> Path:
    src = get_source(name)
    return src.resolve_root(root) if src.resolve_root else _need_root(root)


def build_captioned(name: str, root: Path, split: str | None, **kwargs: Any) -> Any:
    src = get_source(name)
    if src.captioned is None:
        raise ValueError(f"data set {name!r} has no captions; use it as unpaired or zero-shot")
    return src.captioned(root, split, **kwargs)


def build_classes(name: str, root: Path, split: str | None, **kwargs: Any) -> Any:
    src = get_source(name)
    if src.classes is None:
        raise ValueError(f"data set {name!r} has no class labels; it cannot be used for zero-shot")
    return src.classes(root, split, **kwargs)


def build_unpaired(name: str, root: Path, **kwargs: Any) -> Any:
    src = get_source(name)
    if src.unpaired is not None:
        return src.unpaired(root, **kwargs)
    return build_captioned(name, root, "train", **kwargs)
