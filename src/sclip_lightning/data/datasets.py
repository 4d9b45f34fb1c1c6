"""Datasets in their native on-disk layouts.

Captioned items are ``{"image", "captions": list[str], "path"}``; class items are
``{"image", "label": int, "path"}``; unpaired items are ``{"image", "path"}``. ``image`` is
a PIL RGB image, or whatever ``transform`` makes of it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils import data as torch_data
from torch.utils.data import Dataset

from sclip_lightning.data.images import IMAGE_EXTENSIONS, CorruptImageError, load_image
from sclip_lightning.data.names import clean_class_name

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any] | None


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout}")
    return path


class _ImageRecords(Dataset):
    """Shared logic: a list of records with an image path; corrupt-image handling."""

    def __init__(self, transform: Transform = None, skip_corrupt: bool = False) -> None:
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.paths: list[Path] = []
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _record(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.paths)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image = load_image(self.paths[i])
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
            item["path"] = str(self.paths[i])
            return item
        raise CorruptImageError(f"no readable image at all in {type(self).__name__} ({n} files)")


class CaptionedDataset(_ImageRecords):
    """Image paths with one or more captions each."""

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
        self.path = _require(Path(path), "caption table", self.LAYOUT)
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


def utf8_error(path: Path, err: UnicodeDecodeError) -> ValueError:
    """A decoding error that names the file, the line and the fix."""
    raw = path.read_bytes()
    line = raw[: err.start].count(b"\n") + 1
    return ValueError(
        f"{path} line {line}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}). "
        "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    )


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


class RSICD(CaptionedDataset):
    """RSICD (Lu et al. 2017): ``dataset_rsicd.json`` (Karpathy style) + ``RSICD_images/``.

    Args:
        root: folder holding ``dataset_rsicd.json`` and ``RSICD_images/``.
        split: ``"train" | "val" | "test"`` or None for all images.
    """

    LAYOUT = "<root>/dataset_rsicd.json\n<root>/RSICD_images/<filename>.jpg"
    INDEX = "dataset_rsicd.json"
    IMAGES = "RSICD_images"

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), f"{type(self).__name__} root", self.LAYOUT)
        index = _require(self.root / self.INDEX, "caption index", self.LAYOUT)
        images = _require(self.root / self.IMAGES, "image folder", self.LAYOUT)
        data = json.loads(index.read_text(encoding="utf-8"))
        for rec in data["images"]:
            if split is not None and rec.get("split") != split:
                continue
            caps = [s["raw"] for s in rec.get("sentences", [])]
            self._add(images / rec["filename"], caps, f"{index} image {rec['filename']!r}")
        if not self.paths:
            raise ValueError(f"{index} has no images for split {split!r}")


class UCMCaptions(RSICD):
    """UCM-captions (Qu et al. 2016): ``dataset.json`` (Karpathy style) + ``images/``."""

    LAYOUT = "<root>/dataset.json\n<root>/images/<filename>"
    INDEX = "dataset.json"
    IMAGES = "images"


class SydneyCaptions(UCMCaptions):
    """Sydney-captions (Qu et al. 2016): ``dataset.json`` (Karpathy style) + ``images/``."""


class Fashion200k(CaptionedDataset):
    """Fashion200k (Han et al. 2017): ``{dress,jacket,pants,skirt,top}_{split}_detect_all.txt``.

    Each line is ``path TAB score TAB sentence``; images lie under ``root``. As in the
    release, records are products (the 4th path component is the item id) with the
    sentence as caption; a product's images are all kept (``.paths`` holds the first; the
    others are in ``.item_images`` and sampled at random per visit when
    ``random_item_image=True``). Lines whose image is missing are skipped and counted
    (``.missing``), as the release silently did; ``strict=True`` raises instead.

    Args:
        root: the Fashion200k folder. split: ``"train"`` or ``"test"``.
    """

    CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")
    LAYOUT = "<root>/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt\n<root>/women/..."

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        random_item_image: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "Fashion200k root", self.LAYOUT)
        split = {"val": "test"}.get(split, split)
        items: dict[str, dict[str, Any]] = {}
        self.missing = 0
        for cat in self.CATEGORIES:
            path = _require(self.root / f"{cat}_{split}_detect_all.txt", "label file", self.LAYOUT)
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise ValueError(f"{path} line {n}: expected 'path<TAB>score<TAB>sentence'")
                rel, _, sentence = parts
                comps = rel.split("/")
                if len(comps) < 5:
                    raise ValueError(f"{path} line {n}: image path {rel!r} has no item id")
                if not (self.root / rel).is_file():
                    if strict:
                        raise FileNotFoundError(f"{path} line {n}: image not found {rel}")
                    self.missing += 1
                    continue
                item = items.setdefault(
                    comps[3],
                    {"images": [], "caption": sentence, "category": cat, "subcategory": comps[2]},
                )
                item["images"].append(self.root / rel)
        if self.missing:
            log.warning(
                "Fashion200k %s: %d listed images are missing (skipped)", split, self.missing
            )
        self.item_ids = list(items)
        self.item_images = [items[i]["images"] for i in self.item_ids]
        self.random_item_image = random_item_image
        for i in self.item_ids:
            self._add(items[i]["images"][0], [items[i]["caption"]], f"Fashion200k item {i}")
        if not self.paths:
            raise ValueError(
                f"Fashion200k {split}: no item with an existing image under {self.root}"
            )

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.random_item_image and len(self.item_images[index]) > 1:
            import random

            self.paths[index] = random.choice(self.item_images[index])
        return super().__getitem__(index)


class FashionGen(CaptionedDataset):
    """FashionGen (Rostamzadeh et al. 2018): ``fashiongen_256_256_{train,validation}.hdf5``.

    Records are products (``input_productID``); caption = ``name + ". " + description``
    (latin-1, as the release); a product's images are sampled at random per visit.
    Needs ``h5py``.
    """

    LAYOUT = "<root>/fashiongen_256_256_{train,validation}.hdf5"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "FashionGen root", self.LAYOUT)
        split = {"val": "validation", "test": "validation"}.get(split, split)
        self.file = _require(
            self.root / f"fashiongen_256_256_{split}.hdf5", "HDF5 file", self.LAYOUT
        )
        h5 = _open_h5(self.file)
        ids = h5["input_productID"][:].reshape(-1)
        names = h5["input_name"][:].reshape(-1)
        descs = h5["input_description"][:].reshape(-1)
        items: dict[int, list[int]] = {}
        for idx, pid in enumerate(ids.tolist()):
            items.setdefault(int(pid), []).append(idx)
        self.item_rows = list(items.values())
        for rows in self.item_rows:
            r = rows[0]
            cap = _decode(names[r]) + ". " + _decode(descs[r])
            self._add(self.file, [cap], f"{self.file} row {r}")
        self._h5: Any = None

    def __getitem__(self, index: int) -> dict[str, Any]:
        import random

        row = random.choice(self.item_rows[index])
        image = _h5_image(self, row)
        return {
            "image": self.transform(image) if self.transform else image,
            "captions": list(self.captions[index]),
            "path": f"{self.file}#{row}",
        }

    def __getstate__(self):
        return _state_without_h5(self)


def _h5_image(ds: Any, row: int):
    """Row ``row`` of ``input_image`` as RGB; the file is opened lazily, once per worker."""
    from PIL import Image

    if ds._h5 is None:
        ds._h5 = _open_h5(ds.file)
    return Image.fromarray(ds._h5["input_image"][row]).convert("RGB")


def _state_without_h5(ds: Any) -> dict[str, Any]:
    """Pickle state without the open HDF5 handle (DataLoader workers reopen it)."""
    state = ds.__dict__.copy()
    state["_h5"] = None
    return state


def _open_h5(path: Path):
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise ImportError("FashionGen needs h5py: pip install h5py") from e
    return h5py.File(path, "r")


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _decode(value.tolist()[0] if isinstance(value.tolist(), list) else value.tolist())
    return str(value)


class Polyvore(CaptionedDataset):
    """Polyvore Outfits: ``{split}_info.json`` (``images``, ``id``, ``title``,
    ``description``) + ``images/``; caption = ``title + "." + description`` (release)."""

    LAYOUT = "<root>/{train,valid,test}_info.json\n<root>/images/<file>"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "Polyvore root", self.LAYOUT)
        index = _require(self.root / f"{split}_info.json", "info file", self.LAYOUT)
        self.ids: list[str] = []
        for rec in json.loads(index.read_text(encoding="utf-8")):
            cap = f"{rec.get('title', '')}.{rec.get('description', '')}"
            if not (rec.get("title") or rec.get("description")):
                raise ValueError(f"{index}: item {rec.get('id')!r} has no title or description")
            self._add(self.root / "images" / rec["images"], [cap], f"{index} item {rec['id']!r}")
            self.ids.append(str(rec["id"]))


class SciCap(CaptionedDataset):
    """SciCap (Hsu et al. 2021): ``SciCap-No-Subfig-Img/<split>/*.png`` +
    ``SciCap-Caption-All/<split>/*.json``; figures with sub-figures are skipped; caption =
    ``0-originally-extracted`` (the tokenizer truncates long captions; the release cut them
    to 77 characters, ``max_chars=77`` restores that)."""

    LAYOUT = (
        "<root>/SciCap-No-Subfig-Img/<split>/<id>.png\n<root>/SciCap-Caption-All/<split>/<id>.json"
    )

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        max_chars: int | None = None,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "SciCap root", self.LAYOUT)
        caps = _require(self.root / "SciCap-Caption-All" / split, "caption folder", self.LAYOUT)
        imgs = _require(self.root / "SciCap-No-Subfig-Img" / split, "image folder", self.LAYOUT)
        for f in sorted(caps.glob("*.json")):
            rec = json.loads(f.read_text(encoding="utf-8"))
            if rec.get("contains-subfigure"):
                continue
            cap = str(rec.get("0-originally-extracted", ""))
            if max_chars is not None:
                cap = cap[:max_chars]
            self._add(imgs / f"{f.stem}.png", [cap], str(f))
        if not self.paths:
            raise ValueError(f"SciCap {split}: no figure without sub-figures in {caps}")


class ImageFolderUnpaired(_ImageRecords):
    """Every image file below ``root`` (any depth), sorted, as unpaired images."""

    def __init__(
        self,
        root: str | Path,
        transform: Transform = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "unpaired image folder", "<root>/**/<image files>")
        exts = tuple(e.lower() for e in extensions)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts)
        if not self.paths:
            raise ValueError(f"no image files ({', '.join(exts)}) found below {self.root}")

    def _record(self, index: int) -> dict[str, Any]:
        return {}


class ClassFolder(_ImageRecords):
    """A ``<root>/<class>/<images>`` tree (UC Merced, WHU-RS19, RSSCN7, AID, RESISC45, ...).

    Args:
        root: the folder whose sub-folders are classes (sorted by folder name).
        drop_letter_prefix: strip RSSCN7's leading letter (``aGrass`` -> ``grass``).
    """

    LAYOUT = "<root>/<class name>/<image files>"

    def __init__(
        self,
        root: str | Path,
        transform: Transform = None,
        drop_letter_prefix: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "class folder root", self.LAYOUT)
        folders = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"no class sub-folders in {self.root}; expected {self.LAYOUT}")
        exts = tuple(e.lower() for e in extensions)
        self.folder_names = [d.name for d in folders]
        self.classes = [clean_class_name(d.name, drop_letter_prefix) for d in folders]
        self.labels: list[int] = []
        for label, d in enumerate(folders):
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in exts)
            self.paths.extend(files)
            self.labels.extend([label] * len(files))
        if not self.paths:
            raise ValueError(f"no image files found below {self.root}")

    def _record(self, index: int) -> dict[str, Any]:
        return {"label": self.labels[index]}


class RSICDClasses(_ImageRecords):
    """RSICD-CLS: ``txtclasses_rsicd/<Class>.txt`` list the file names of each class.

    Args:
        root: the RSICD root (``RSICD_images/`` and ``txtclasses_rsicd/``).
        split: keep only images of this split of ``dataset_rsicd.json`` (None: all listed).
    """

    LAYOUT = RSICD.LAYOUT + "\n<root>/txtclasses_rsicd/<Class>.txt (one file name a line)"

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        self.root = _require(Path(root), "RSICD root", self.LAYOUT)
        lists = _require(self.root / "txtclasses_rsicd", "class lists", self.LAYOUT)
        images = _require(self.root / RSICD.IMAGES, "image folder", self.LAYOUT)
        keep: set[str] | None = None
        if split is not None:
            data = json.loads((self.root / RSICD.INDEX).read_text(encoding="utf-8"))
            keep = {r["filename"] for r in data["images"] if r.get("split") == split}
        files = sorted(lists.glob("*.txt"))
        if not files:
            raise ValueError(f"no <Class>.txt files in {lists}")
        self.classes = [clean_class_name(f.stem) for f in files]
        self.labels: list[int] = []
        for label, f in enumerate(files):
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                name = line.strip()
                if name and (keep is None or name in keep):
                    self.paths.append(images / name)
                    self.labels.append(label)
        if not self.paths:
            raise ValueError(f"RSICD class lists in {lists} name no image (split {split!r})")

    def _record(self, index: int) -> dict[str, Any]:
        return {"label": self.labels[index]}


class _LabelledRecords(_ImageRecords):
    """Shared logic of class datasets built from (path, class name) pairs."""

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


def _check_level(level: str) -> None:
    if level not in ("category", "subcategory"):
        raise ValueError(f"level must be 'category' or 'subcategory', got {level!r}")


class Fashion200kClasses(_LabelledRecords):
    """Fashion200k zero-shot: every listed image, labelled by its ``category`` (2nd path
    component, e.g. ``dresses``) or ``subcategory`` (3rd, e.g. ``casual_and_day_dresses``)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        level: str = "category",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        _check_level(level)
        root = _require(Path(root), "Fashion200k root", Fashion200k.LAYOUT)
        split = {"val": "test"}.get(split, split)
        pairs = []
        for cat in Fashion200k.CATEGORIES:
            f = _require(root / f"{cat}_{split}_detect_all.txt", "label file", Fashion200k.LAYOUT)
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rel = line.split("\t")[0]
                    comps = rel.split("/")
                    if (root / rel).is_file() and len(comps) > 3:
                        pairs.append((root / rel, comps[1 if level == "category" else 2]))
        self._set(pairs, f"Fashion200k {split}")


class FashionGenClasses(_LabelledRecords):
    """FashionGen zero-shot: images labelled by ``input_category`` or ``input_subcategory``
    (lower-cased, as the release)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "validation",
        level: str = "category",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        _check_level(level)
        root = _require(Path(root), "FashionGen root", FashionGen.LAYOUT)
        split = {"val": "validation", "test": "validation"}.get(split, split)
        self.file = _require(
            root / f"fashiongen_256_256_{split}.hdf5", "HDF5 file", FashionGen.LAYOUT
        )
        h5 = _open_h5(self.file)
        key = "input_category" if level == "category" else "input_subcategory"
        names = [_decode(v).lower() for v in h5[key][:].reshape(-1)]
        self._set([(self.file, n) for n in names], str(self.file))
        self._h5: Any = None

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = _h5_image(self, index)
        return {
            "image": self.transform(image) if self.transform else image,
            "label": self.labels[index],
            "path": f"{self.file}#{index}",
        }

    def __getstate__(self):
        return _state_without_h5(self)


class PolyvoreClasses(_LabelledRecords):
    """Polyvore zero-shot: items labelled by ``semantic_category`` of
    ``polyvore_item_metadata.json``."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        root = _require(Path(root), "Polyvore root", Polyvore.LAYOUT)
        index = _require(root / f"{split}_info.json", "info file", Polyvore.LAYOUT)
        meta_file = _require(root / "polyvore_item_metadata.json", "item metadata", Polyvore.LAYOUT)
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        pairs = []
        for rec in json.loads(index.read_text(encoding="utf-8")):
            key = str(rec["id"])
            if key not in meta or "semantic_category" not in meta[key]:
                raise KeyError(f"{meta_file}: no semantic_category for item {key!r}")
            pairs.append((root / "images" / rec["images"], meta[key]["semantic_category"]))
        self._set(pairs, str(index))


class ConcatCaptioned(torch_data.ConcatDataset):
    """Several captioned data sets as one (RS-ALL, Fashion-ALL); keeps ``.captions``."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        super().__init__(datasets)
        self.captions = [c for d in datasets for c in d.captions]  # type: ignore[attr-defined]
        self.labels = None
        self.classes = None


class SimpsonsCaptions(CaptionedDataset):
    """Simpsons captions (the release: Hugging Face ``Norod78/simpsons-blip-captions``).

    ``root`` is either a folder written by ``datasets``' ``save_to_disk`` (columns ``image``
    and ``text``; a DatasetDict's ``train`` part is used) or a caption table (CSV/TSV/JSONL
    with ``image`` and ``text`` columns, see :class:`CaptionTable`). As in the release, a
    seeded permutation (seed 42) keeps 90% for ``"train"`` and 10% for ``"val"``/``"test"``.
    Needs ``datasets`` for the folder form (``pip install datasets``).
    """

    LAYOUT = "<root>/ (datasets.save_to_disk folder: image, text) or a table file"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform = None,
        skip_corrupt: bool = False,
        train_ratio: float = 0.9,
        seed: int = 42,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        import torch

        self.root = _require(Path(root), "Simpsons captions", self.LAYOUT)
        self._hf = None
        if self.root.is_file():
            table = CaptionTable(self.root, caption_column="text", skip_corrupt=skip_corrupt)
            texts, paths = table.captions, table.paths
        else:
            try:
                import datasets
            except ImportError as e:
                raise ImportError(
                    "reading a Hugging Face dataset folder needs `pip install datasets`"
                ) from e
            hf = datasets.load_from_disk(str(self.root))
            if isinstance(hf, datasets.DatasetDict):
                hf = hf["train"]
            if "image" not in hf.column_names or "text" not in hf.column_names:
                raise KeyError(f"{self.root}: needs columns image and text, has {hf.column_names}")
            self._hf = hf
            texts = [[t] for t in hf["text"]]
            paths = [Path(f"{self.root}#{i}") for i in range(len(hf))]
        n = len(texts)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        cut = int(n * train_ratio)
        keep = perm[:cut] if split == "train" else perm[cut:]
        self.rows = keep
        for i in keep:
            self._add(paths[i], texts[i], f"{self.root} record {i}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._hf is None:
            return super().__getitem__(index)
        from sclip_lightning.data.images import to_rgb

        image = to_rgb(self._hf[self.rows[index]]["image"])
        return {
            "image": self.transform(image) if self.transform else image,
            "captions": list(self.captions[index]),
            "path": str(self.paths[index]),
        }
