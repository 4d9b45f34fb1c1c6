"""The embedded default: a small synthetic aerial-scene domain ("synthetic-aerial").

A deterministic generator renders top-down scenes of 10 land-use classes with compositional
captions, and writes them once to a cache folder in the generic layout that users' own data
uses, read back by the generic loaders (:class:`CaptionTable`, :class:`ClassFolder`)::

    <root>/train/<class_folder>/<id>.png   training images (captioned)
    <root>/val/<class_folder>/<id>.png     validation images (captioned)
    <root>/test/<class_folder>/<id>.png    test images (captioned; zero-shot by folder)
    <root>/captions.csv                    image,caption,split,label (several rows per image)
    <root>/keywords.txt                    the class names (keyword vocabulary)
    <root>/DONE                            version stamp, written last

Why it suits S-CLIP: every scene mixes class evidence with strong nuisance factors
(illumination, tint, season, haze, rotation, object density), and only half of the
captions name the class (the rest describe it with synonyms or objects). With 10% of the
pairs, the pairs cover few nuisance combinations; the unpaired 90% cover the rest, and
their pseudo-captions and class-name keywords are the only way to learn from them.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = "synthetic-aerial-v2"

CLASSES = (
    "forest",
    "farmland",
    "lake",
    "river",
    "beach",
    "residential area",
    "industrial area",
    "parking lot",
    "desert",
    "baseball field",
)

# words a caption may use instead of the class name (never the class name itself)
_SYNONYMS = {
    "forest": ["dense woods", "thick woodland", "many trees"],
    "farmland": ["cultivated fields", "crop fields", "rectangular fields"],
    "lake": ["a pond", "a body of still water", "a reservoir"],
    "river": ["a winding stream", "flowing water", "a long waterway"],
    "beach": ["sand along the sea", "a coastline", "the shore"],
    "residential area": ["many houses", "small homes", "rows of houses"],
    "industrial area": ["large factories", "big warehouses", "plants"],
    "parking lot": ["many parked cars", "rows of cars", "cars parked"],
    "desert": ["bare sand", "dunes", "dry sand"],
    "baseball field": ["a ball diamond", "a sports diamond", "a playing diamond"],
}
_CONTEXT = ["green grass", "trees", "roads", "bare land", "buildings", "water"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the generated domain (images per class and split)."""

    train_per_class: int = 300
    val_per_class: int = 20
    test_per_class: int = 50
    image_size: int = 32
    captions_per_image: int = 3
    seed: int = 0


def default_root() -> Path:
    """``$SCLIP_CACHE/synthetic-aerial-v1`` (default ``~/.cache/sclip_lightning``)."""
    from sclip_lightning.models import cache_dir

    return cache_dir() / VERSION


def _folder(name: str) -> str:
    return name.replace(" ", "_")


def _stamp(spec: SyntheticSpec) -> str:
    return f"{VERSION} {spec}"


def ensure_synthetic(root: str | Path | None = None, spec: SyntheticSpec | None = None) -> Path:
    """Generate the domain under ``root`` unless an identical one is there; return root.

    Writing goes to a temporary sibling folder renamed into place, so concurrent or
    interrupted calls never leave a half-written domain behind.
    """
    spec = spec or SyntheticSpec()
    root = Path(root) if root is not None else default_root()
    done = root / "DONE"
    if done.is_file() and done.read_text() == _stamp(spec):
        return root
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    _write(tmp, spec)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    try:
        tmp.rename(root)
    except OSError:
        if not (done.is_file() and done.read_text() == _stamp(spec)):
            raise
    return root


def _write(root: Path, spec: SyntheticSpec) -> None:
    rng = np.random.default_rng(spec.seed)
    rows = []
    for split, per_class in (
        ("train", spec.train_per_class),
        ("val", spec.val_per_class),
        ("test", spec.test_per_class),
    ):
        for label, name in enumerate(CLASSES):
            folder = root / split / _folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image, attrs = render(label, rng, spec.image_size)
                rel = f"{split}/{_folder(name)}/{_folder(name)}_{i:04d}.png"
                Image.fromarray(image).save(root / rel, optimize=False, compress_level=1)
                for cap in captions_for(label, attrs, rng, spec.captions_per_image):
                    rows.append((rel, cap, split, _folder(name)))
    with (root / "captions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split", "label"])
        w.writerows(rows)
    (root / "keywords.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    (root / "DONE").write_text(_stamp(spec))


def render(label: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, dict]:
    """Render one scene of class ``label``: (H, W, 3) uint8 and its attributes."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    img: np.ndarray = np.zeros((s, s, 3), np.float32)
    season = rng.uniform(-1, 1)  # shifts vegetation from green to brown
    veg = np.array([0.25 + 0.2 * max(season, 0), 0.5 - 0.15 * abs(season), 0.2])
    attrs: dict = {"density": rng.choice(["few", "some", "many"]), "context": None}
    dens = {"few": 0.4, "some": 0.7, "many": 1.0}[attrs["density"]]

    def noise(scale: float) -> np.ndarray:
        return rng.normal(0, scale, (s, s, 1)).astype(np.float32)

    def blobs(color, n, rmin, rmax):
        for _ in range(n):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(rmin, rmax)
            m = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
            img[m] = np.asarray(color) * rng.uniform(0.8, 1.2)

    def rects(color, n, hmin, hmax, grid: bool = False):
        for k in range(n):
            h, w = rng.uniform(hmin, hmax), rng.uniform(hmin, hmax)
            if grid:
                side = int(np.ceil(np.sqrt(n)))
                y0, x0 = (k // side + 0.2) / side, (k % side + 0.2) / side
            else:
                y0, x0 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
            m = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            img[m] = np.asarray(color) * rng.uniform(0.8, 1.2)

    name = CLASSES[label]
    if name == "forest":
        img[:] = veg * 0.6
        blobs(veg * 0.9, int(40 * dens), 0.04, 0.09)
        img += noise(0.06)
    elif name == "farmland":
        freq = rng.uniform(4, 9)
        ang = rng.uniform(0, np.pi)
        stripes = np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * freq * 2 * np.pi) > 0
        crop = np.array([0.75, 0.65, 0.3])
        img[:] = np.where(stripes[..., None], veg, crop)
    elif name == "lake":
        img[:] = veg
        cy, cx = rng.uniform(0.35, 0.65, 2)
        ry, rx = rng.uniform(0.18, 0.35, 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[m] = [0.1, 0.25, 0.55]
        attrs["context"] = "green grass" if season < 0.3 else "bare land"
    elif name == "river":
        img[:] = veg
        phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
        center = 0.5 + amp * np.sin(yy * 2 * np.pi * rng.uniform(0.5, 1.5) + phase)
        m = np.abs(xx - center) < rng.uniform(0.05, 0.1)
        img[m] = [0.15, 0.3, 0.5]
        if rng.random() < 0.5:
            img = img.transpose(1, 0, 2).copy()
        attrs["context"] = "trees" if season < 0 else "bare land"
    elif name == "beach":
        ang = rng.uniform(0, 2 * np.pi)
        t = np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)
        img[:] = np.where((t > 0)[..., None], [0.85, 0.78, 0.55], [0.1, 0.35, 0.6])
        foam = np.abs(t) < 0.03
        img[foam] = [0.9, 0.9, 0.9]
        attrs["context"] = "water"
    elif name == "residential area":
        img[:] = [0.5, 0.5, 0.48]
        img += veg * 0.2
        rects([0.65, 0.25, 0.2], int(16 * dens) + 4, 0.07, 0.12, grid=True)
        attrs["context"] = "roads"
    elif name == "industrial area":
        img[:] = [0.45, 0.45, 0.45]
        rects([0.85, 0.85, 0.85], int(4 * dens) + 1, 0.2, 0.4)
        attrs["context"] = "roads"
    elif name == "parking lot":
        img[:] = [0.25, 0.25, 0.27]
        for _ in range(int(30 * dens) + 5):
            color = rng.uniform(0.2, 1.0, 3)
            y0, x0 = rng.integers(0, 8) / 8, rng.integers(0, 16) / 16
            m = (yy >= y0 + 0.02) & (yy < y0 + 0.1) & (xx >= x0) & (xx < x0 + 0.045)
            img[m] = color
        attrs["context"] = "buildings"
    elif name == "desert":
        freq, phase = rng.uniform(2, 5), rng.uniform(0, 2 * np.pi)
        shade = 0.5 + 0.5 * np.sin((xx + 0.3 * yy) * freq * 2 * np.pi + phase)
        img[:] = np.array([0.8, 0.65, 0.4]) * (0.75 + 0.25 * shade)[..., None]
        attrs["context"] = "bare land"
    elif name == "baseball field":
        img[:] = veg * 1.1
        cy, cx, r = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.3)
        m = (np.abs(yy - cy) + np.abs(xx - cx)) < r
        img[m] = [0.6, 0.4, 0.25]
        inner = (np.abs(yy - cy) + np.abs(xx - cx)) < r * 0.55
        img[inner] = veg * 1.1
        attrs["context"] = "trees" if season < 0 else "buildings"
    # nuisance: rotation/flip, illumination, colour tint, haze, sensor noise
    img = np.rot90(img, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = img * rng.uniform(0.6, 1.4) + rng.uniform(-0.12, 0.12, 3)
    haze = rng.uniform(0, 0.4)
    img = img * (1 - haze) + haze * 0.8
    img = img + rng.normal(0, rng.uniform(0.0, 0.08), img.shape)
    attrs["hazy"] = haze > 0.25
    attrs["bright"] = bool(img.mean() > 0.6)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), attrs


def captions_for(label: int, attrs: dict, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` compositional captions; about half name the class, the rest paraphrase it."""
    name = CLASSES[label]
    out = []
    for _ in range(n):
        subject = name if rng.random() < 0.5 else str(rng.choice(_SYNONYMS[name]))
        article = "" if subject.startswith(("a ", "many", "rows", "the", "cars")) else "a "
        if subject in (
            "bare sand",
            "dunes",
            "dry sand",
            "large factories",
            "big warehouses",
            "dense woods",
        ):
            article = ""
        if subject in ("plants", "small homes", "sand along the sea", "flowing water"):
            article = ""
        phrase = f"{article}{subject}"
        context = attrs.get("context") or str(rng.choice(_CONTEXT))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            cap = f"an aerial image of {phrase} with {attrs['density']} details"
        elif kind == 1:
            cap = f"{phrase} next to {context}"
        elif kind == 2:
            cap = f"this {'hazy' if attrs['hazy'] else 'clear'} scene shows {phrase}"
        else:
            cap = f"{phrase} seen from above, {'bright' if attrs['bright'] else 'dark'} light"
        out.append(cap[0].upper() + cap[1:] + ".")
    return out
