"""Fuzz the data path: every kind of broken or unusual file either loads as a proper RGB
tensor or fails with a message that names the file; nothing is dropped silently."""

from __future__ import annotations

import csv
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sclip_lightning.data import CaptionTable, ImageFolderUnpaired
from sclip_lightning.data.images import CorruptImageError
from sclip_lightning.models import build_transforms

TRANSFORM = build_transforms("sclip-tiny", True)


def _good(kind: str, rng: np.random.Generator) -> Image.Image:
    h, w = {"tiny": (1, 1), "huge": (3000, 4000), "thin": (2, 900)}.get(kind, (37, 53))
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "L":
        return Image.fromarray(rgb[..., 0], "L")
    if kind == "RGBA":
        return Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA")
    if kind == "P":
        return Image.fromarray(rgb).convert("P")
    if kind == "I;16":
        im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert im.mode.startswith("I;16")
        return im
    if kind == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    return Image.fromarray(rgb)


GOOD = ["RGB", "L", "RGBA", "P", "I;16", "CMYK", "tiny", "huge", "thin"]
BAD = ["zero_bytes", "truncated", "random_bytes", "text_as_png"]


def _write(folder, n, seed):
    """n random files; returns (names, set of bad names)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    names, bad = [], set()
    for i in range(n):
        kind = pick.choice(GOOD + BAD)
        ext = ".jpg" if kind in ("RGB", "huge", "truncated", "CMYK") else ".png"
        name = f"img_{i:03d}_{kind.replace(';', '')}{ext}"
        path = folder / name
        if kind in GOOD:
            _good(kind, rng).save(path)
        elif kind == "zero_bytes":
            path.write_bytes(b"")
        elif kind == "truncated":
            _good("RGB", rng).save(path)
            path.write_bytes(path.read_bytes()[:100])
        elif kind == "random_bytes":
            path.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
        else:
            path.write_text("not an image")
        names.append(name)
        if kind in BAD:
            bad.add(name)
    return names, bad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_files_load_or_fail_naming_the_file(tmp_path, seed):
    names, bad = _write(tmp_path, 24, seed)
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for n in names:
            w.writerow([n, f"a picture called {n}"])
    table = CaptionTable(tmp_path / "captions.csv", transform=TRANSFORM)
    assert len(table) == len(names)  # every record is there
    for i, name in enumerate(table.paths):
        if name.name in bad:
            with pytest.raises(CorruptImageError, match=name.name + ".*skip_corrupt=True"):
                table[i]
        else:
            x = table[i]["image"]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_skip_corrupt_counts_and_logs_every_skipped_file(tmp_path, caplog):
    names, bad = _write(tmp_path, 30, seed=3)
    assert bad
    ds = ImageFolderUnpaired(tmp_path, transform=TRANSFORM, skip_corrupt=True)
    assert len(ds) == len(names)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert {p.name for p in (ds.paths[i] for i in ds.skipped)} == bad
    for name in bad:
        assert name in caplog.text
    assert all(Image.open(it["path"]).size and it["image"].shape == (3, 32, 32) for it in items)


def test_caption_tables_with_bad_text_fail_naming_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("image,caption\na.png,caf\xe9 on a r\xf6of\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv line 2: not valid UTF-8"):
        CaptionTable(latin)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv"):
        CaptionTable(empty)
    blank = tmp_path / "blank.csv"
    blank.write_text("image,caption\na.png,   \n")
    with pytest.raises(ValueError, match=r"blank\.csv.*line 2.*empty caption"):
        CaptionTable(blank)


def test_keyword_file_that_is_not_utf8_is_named(tmp_path):
    from sclip_lightning.data.keywords import load_keywords

    path = tmp_path / "kw.txt"
    path.write_bytes("lake\nr\xf6of\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"kw\.txt line 2: not valid UTF-8"):
        load_keywords(path)


def _corrupt_chunk(path, dataset: str, row: int) -> None:
    """Overwrite the compressed bytes of one row's chunk in an HDF5 file (a damaged disk)."""
    import h5py

    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(row)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\x00\xff" * (info.size // 2))


def test_fashiongen_rows_go_through_the_shared_loading_path(tmp_path, caplog):
    """A damaged HDF5 row raises naming the file and the row, or is skipped (counted, logged)
    with skip_corrupt; a product's image is drawn with torch's seeded generator."""
    import h5py
    from fixtures import write_fashiongen

    from sclip_lightning.data import FashionGen
    from sclip_lightning.data.sampling import seeded

    root = write_fashiongen(tmp_path / "fg", n=8)
    path = root / "fashiongen_256_256_train.hdf5"
    with h5py.File(path, "a") as f:  # rewrite the images chunked + compressed, one row a chunk
        images = f["input_image"][:]
        del f["input_image"]
        f.create_dataset("input_image", data=images, chunks=(1, 16, 16, 3), compression="gzip")
    _corrupt_chunk(path, "input_image", 3)  # product 1's second image
    ds = FashionGen(root, "train", transform=TRANSFORM, random_item_image=False)
    assert ds[0]["image"].shape == (3, 32, 32)
    strict = FashionGen(root, "train", transform=TRANSFORM)
    with pytest.raises(CorruptImageError, match=r"row 3 of .*train\.hdf5.*skip_corrupt=True"):
        for seed in range(20):  # the random draw reaches row 3 for some seed
            seeded((1, seed), strict.__getitem__)
    lenient = FashionGen(root, "train", transform=TRANSFORM, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        items = [seeded((1, seed), lenient.__getitem__) for seed in range(20)]
    assert lenient.skipped == {1} and "skip_corrupt: skipped" in caplog.text
    assert all(it["image"].shape == (3, 32, 32) for it in items)
    draws = [seeded((0, 7), strict.__getitem__)["path"] for _ in range(3)]
    assert len(set(draws)) == 1  # the same sample seed draws the same product image


def test_huggingface_records_go_through_the_shared_loading_path(tmp_path, caplog):
    """A record of a datasets folder whose image bytes do not decode raises naming it, or is
    skipped with skip_corrupt (counted and logged)."""
    import datasets

    from sclip_lightning.data import SimpsonsCaptions

    rng = np.random.default_rng(0)
    good = []
    for _ in range(9):
        buf = __import__("io").BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
        good.append({"bytes": buf.getvalue(), "path": None})
    images = good[:4] + [{"bytes": b"not an image at all", "path": None}] + good[4:]
    texts = [f"homer number {i}" for i in range(len(images))]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": texts}, features=features).save_to_disk(
        str(tmp_path / "hf")
    )
    strict = SimpsonsCaptions(tmp_path / "hf", split="train", train_ratio=1.0)
    bad = strict.rows.index(4)
    with pytest.raises(CorruptImageError, match=r"record 4 of .*hf.*skip_corrupt=True"):
        strict[bad]
    lenient = SimpsonsCaptions(tmp_path / "hf", "train", TRANSFORM, True, train_ratio=1.0)
    with caplog.at_level(logging.WARNING):
        items = [lenient[i] for i in range(len(lenient))]
    assert lenient.skipped == {bad} and "skip_corrupt: skipped" in caplog.text
    assert all(it["image"].shape == (3, 32, 32) for it in items)
