"""Image loading with errors that name the file and the fix."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and convert it to RGB.

    Any mode (L, LA, P, RGBA, CMYK, I;16, I, F) becomes 8-bit RGB; 16-bit and float images
    are rescaled by their maximum rather than clipped.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptImageError: the file cannot be decoded (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(
            f"cannot decode image {path}: {e}. Replace or delete the file, or pass "
            "skip_corrupt=True to skip unreadable images (they are counted and logged)."
        ) from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (16-bit / float images rescaled to 0..255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        arr = arr / hi * 255.0 if hi > 0 else arr
        im = Image.fromarray(arr.clip(0, 255).astype("uint8"), mode="L")
    if im.mode in ("P", "LA", "PA") or (im.mode == "RGBA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")
