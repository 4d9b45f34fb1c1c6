"""Generic sources: a caption table (CSV/TSV/JSONL), a folder of images, a class-folder tree.

The sources to use for your own data (``dataset: caption_table``, ``unpaired_dataset:
image_folder``, zero-shot ``class_folder``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sclip_lightning.data.base import (
    CaptionedDataset,
    ImageRecords,
    Transform,
    require,
    utf8_error,
)
from sclip_lightning.data.images import IMAGE_EXTENSIONS
from sclip_lightning.data.names import clean_class_name

_LETTER_PREFIX = re.compile(r"^[a-z][A-Z]")


def has_letter_prefixes(names: Sequence[str]) -> bool:
    """Whether every name starts with a one-letter ordering prefix (``aGrass``, ``bField``)."""
    return bool(names) and all(_LETTER_PREFIX.match(n) for n in names)


class CaptionTable(CaptionedDataset):
    """A CSV, TSV or JSONL table of image paths and captions (paths relative to the file).

    Rows that name the same image are merged (one image, several captions). A caption cell
    may also hold several captions separated by ``caption_separator``.

    Args:
        path: the table (``.csv``, ``.tsv``, ``.jsonl``/``.json`` lines).
        split: keep rows whose ``split_column`` equals this value (None: all rows).
        image_column: column with the image path.
        caption_column: one column name or a list of columns, each a caption.
        split_column: column with the split name (used only when ``split`` is given).
        label_column: optional column with a class name per image: fills ``.labels`` and
            ``.classes`` (sorted names), e.g. for pseudo-label accuracy or zero-shot.
        caption_separator: optional separator inside a caption cell.
        transform: applied to the PIL image.
        skip_corrupt: skip unreadable images (counted and logged) instead of raising.
    """

    LAYOUT = "captions.csv with columns image,caption[,split]; image paths relative to the file"

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        image_column: str = "image",
        caption_column: str | list[str] = "caption",
        split_column: str = "split",
        label_column: str | None = None,
        caption_separator: str | None = None,
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.path = require(Path(path), "caption table", self.LAYOUT)
        rows = list(_read_table(self.path))
        if not rows:
            raise ValueError(f"caption table {self.path} has no rows (expected: {self.LAYOUT})")
        cols = [caption_column] if isinstance(caption_column, str) else list(caption_column)
        needed = [image_column, *cols] + ([split_column] if split is not None else [])
        needed += [label_column] if label_column is not None else []
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise KeyError(
                f"caption table {self.path} lacks column(s) {missing}; it has {list(rows[0])}. "
                "Set image_column / caption_column / split_column."
            )
        grouped: dict[str, list[str]] = {}
        label_of: dict[str, str] = {}
        for n, row in enumerate(rows, start=2 if self.path.suffix != ".jsonl" else 1):
            if split is not None and str(row[split_column]) != split:
                continue
            caps: list[str] = []
            for c in cols:
                cell = row[c]
                items = cell if isinstance(cell, list) else [cell]
                for item in items:
                    text = "" if item is None else str(item)
                    parts = text.split(caption_separator) if caption_separator else [text]
                    caps.extend(parts)
            for cap in caps:
                if not cap.strip():
                    raise ValueError(
                        f"{self.path} line {n}: empty caption for image {row[image_column]!r}. "
                        "Fill or remove the row."
                    )
            grouped.setdefault(str(row[image_column]), []).extend(caps)
            if label_column is not None:
                label_of[str(row[image_column])] = str(row[label_column])
        if not grouped:
            raise ValueError(f"caption table {self.path} has no rows for split {split!r}")
        for rel, caps in grouped.items():
            self._add(self.path.parent / rel, caps, str(self.path))
        if label_column is not None:
            self.classes = sorted(set(label_of.values()))
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[label_of[rel]] for rel in grouped]


def _read_table(path: Path):
    try:
        yield from _read_table_utf8(path)
    except UnicodeDecodeError as e:
        raise utf8_error(path, e) from None


def _read_table_utf8(path: Path):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n}: not valid JSON ({e})") from e
        return
    delimiter = "\t" if suffix == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter=delimiter)


class ImageFolderUnpaired(ImageRecords):
    """Every image file below ``root`` (any depth), sorted, as unpaired images."""

    def __init__(
        self,
        root: str | Path,
        transform: Transform = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "unpaired image folder", "<root>/**/<image files>")
        exts = tuple(e.lower() for e in extensions)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts)
        if not self.paths:
            raise ValueError(f"no image files ({', '.join(exts)}) found below {self.root}")

    def _record(self, index: int) -> dict[str, Any]:
        return {}


class ClassFolder(ImageRecords):
    """A ``<root>/<class>/<images>`` tree (UC Merced, WHU-RS19, RSSCN7, AID, RESISC45, ...).

    Args:
        root: the folder whose sub-folders are classes (sorted by folder name).
        drop_letter_prefix: strip a one-letter ordering prefix (RSSCN7's ``aGrass`` ->
            ``grass``). ``"auto"`` (default) strips it when every folder name has one (a
            lower-case letter followed by an upper-case one): RSSCN7's layout is recognised
            without a flag, ``denseResidential`` and friends are left alone.
    """

    LAYOUT = "<root>/<class name>/<image files>"

    def __init__(
        self,
        root: str | Path,
        transform: Transform = None,
        drop_letter_prefix: bool | str = "auto",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = require(Path(root), "class folder root", self.LAYOUT)
        folders = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"no class sub-folders in {self.root}; expected {self.LAYOUT}")
        exts = tuple(e.lower() for e in extensions)
        self.folder_names = [d.name for d in folders]
        if drop_letter_prefix == "auto":
            drop_letter_prefix = has_letter_prefixes(self.folder_names)
        self.classes = [clean_class_name(d.name, bool(drop_letter_prefix)) for d in folders]
        self.labels: list[int] = []
        for label, d in enumerate(folders):
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in exts)
            self.paths.extend(files)
            self.labels.extend([label] * len(files))
        if not self.paths:
            raise ValueError(f"no image files found below {self.root}")

    def _record(self, index: int) -> dict[str, Any]:
        return {"label": self.labels[index]}
