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

from sclip_lightning.data.datasets import CaptionTable, ImageFolderUnpaired
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
