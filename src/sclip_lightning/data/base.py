"""What every data source shares: the one image-loading path, captioned and labelled records,
split names, and errors that name the missing file and the expected layout.

Captioned items are ``{"image", "captions": list[str], "path", "record"}``; class items are
``{"image", "label": int, "path", "record"}``; unpaired items are ``{"image", "path",
"record"}``. ``image`` is a PIL RGB image, or whatever ``transform`` makes of it; ``path``
names the image actually read; ``record`` is the index of the record it belongs to.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils import data as torch_data
from torch.utils.data import Dataset

from sclip_lightning.data.images import CorruptImageError, load_image
from sclip_lightning.data.names import clean_class_name

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any] | None

#: How each source names the generic splits ``train`` / ``val`` / ``test`` on disk (one
#: table for every source; a split not listed keeps its name).
SPLITS: dict[str, dict[str, str]] = {
    "fashion200k": {"val": "test"},
    "fashiongen": {"val": "validation", "test": "validation"},
    "polyvore": {"val": "valid"},
}


def split_name(source: str, split: str) -> str:
    """The on-disk name of generic split ``split`` in ``source`` (see :data:`SPLITS`)."""
    return SPLITS.get(source, {}).get(split, split)


def require(path: Path, what: str, layout: str) -> Path:
    """``path`` if it exists, else FileNotFoundError naming it and the expected layout."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout}")
    return path


def random_index(n: int) -> int:
    """A uniform draw from ``range(n)`` with torch's generator (seeded per sample in training
    by :func:`~sclip_lightning.data.sampling.seeded`; never Python's global ``random``)."""
    return int(torch.randint(n, ())) if n > 1 else 0


class ImageRecords(Dataset):
    """Records with an image each: the one loading path every source goes through.

    Subclasses fill ``self.paths`` (one entry per record, used in messages and as the item's
    ``"path"``), implement :meth:`_record` (the record's other fields) and, when images do
    not come from files, :meth:`load` (HDF5 rows, Hugging Face records). ``__getitem__`` turns
    an unreadable image into :class:`CorruptImageError` naming it, or, with
    ``skip_corrupt``, serves the next readable record instead (each skip counted and logged
    once per process). Every item says which record it was read from (``"record"``): the
    index asked for, or the record served instead; ``"path"`` cannot tell, as a record
    with random views reads one of several images (not ``paths[record]``).

    Attributes:
        random_views: True when a record's image is drawn at random per visit (e.g. one of a
            product's photos): such inputs cannot be cached (``tower_cache``).
    """

    random_views = False

    def __init__(self, transform: Transform = None, skip_corrupt: bool = False) -> None:
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.paths: list[Path] = []
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[Image.Image, str]:
        """The image of record ``index`` (RGB) and where it came from.

        Raises:
            FileNotFoundError, CorruptImageError: naming the file (and the fix).
        """
        return load_image(self.paths[index]), str(self.paths[index])

    def _record(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.paths)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image, where = self.load(i)
            except (CorruptImageError, FileNotFoundError):
                if not self.skip_corrupt:
                    raise
                if i not in self.skipped:
                    self.skipped.add(i)
                    log.warning(
                        "skip_corrupt: skipped unreadable image %s (%d skipped so far in this "
                        "process)",
                        self.paths[i],
                        len(self.skipped),
                    )
                continue
            item = self._record(i)
            item["image"] = self.transform(image) if self.transform else image
            item["path"] = where
            item["record"] = i
            return item
        raise CorruptImageError(f"no readable image at all in {type(self).__name__} ({n} files)")


class CaptionedDataset(ImageRecords):
    """Image records with one or more captions each (and hidden labels, when known)."""

    def __init__(self, transform: Transform = None, skip_corrupt: bool = False) -> None:
        super().__init__(transform, skip_corrupt)
        self.captions: list[list[str]] = []
        self.labels: list[int] | None = None  # hidden class labels, when the source has them
        self.classes: list[str] | None = None

    def _add(self, path: Path, captions: Sequence[str], where: str) -> None:
        caps = [str(c).strip() for c in captions if c is not None]
        if not caps:
            raise ValueError(f"{where}: image {path} has no caption. Add one or remove the record.")
        for c in caps:
            if not c:
                raise ValueError(
                    f"{where}: empty caption for image {path}. Fill or remove the caption."
                )
        self.paths.append(path)
        self.captions.append(caps)

    def _record(self, index: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"captions": list(self.captions[index])}
        if self.labels is not None:
            rec["label"] = self.labels[index]
        return rec


class LabelledRecords(ImageRecords):
    """Class datasets built from (path, class name) pairs (zero-shot sets)."""

    def __init__(self, transform: Transform = None, skip_corrupt: bool = False) -> None:
        super().__init__(transform, skip_corrupt)
        self.classes: list[str] = []
        self.labels: list[int] = []

    def _set(self, pairs: list[tuple[Path, str]], where: str) -> None:
        if not pairs:
            raise ValueError(f"{where}: no labelled image found")
        names = sorted({c for _, c in pairs})
        index = {c: i for i, c in enumerate(names)}
        self.classes = [clean_class_name(c) for c in names]
        self.paths = [p for p, _ in pairs]
        self.labels = [index[c] for _, c in pairs]

    def _record(self, index: int) -> dict[str, Any]:
        return {"label": self.labels[index]}


class ConcatCaptioned(torch_data.ConcatDataset):
    """Several captioned data sets as one (RS-ALL, Fashion-ALL); keeps ``.captions``."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        super().__init__(datasets)
        self.captions = [c for d in datasets for c in d.captions]  # type: ignore[attr-defined]
        self.paths = [p for d in datasets for p in d.paths]  # type: ignore[attr-defined]
        self.labels = None
        self.classes = None
        self.random_views = any(getattr(d, "random_views", False) for d in datasets)

    def __getitem__(self, idx: int) -> Any:
        """The item of record ``idx``, its ``"record"`` an index into the whole set."""
        if idx < 0:
            idx += len(self)
        item = super().__getitem__(idx)
        if isinstance(item, dict) and "record" in item:
            part = bisect.bisect_right(self.cumulative_sizes, idx)
            item["record"] += self.cumulative_sizes[part - 1] if part else 0
        return item


def utf8_error(path: Path, err: UnicodeDecodeError) -> ValueError:
    """A decoding error that names the file, the line and the fix."""
    raw = path.read_bytes()
    line = raw[: err.start].count(b"\n") + 1
    return ValueError(
        f"{path} line {line}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}). "
        "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    )
