"""The strong view of an unpaired image: SemiCLIP's RandAugment + Cutout, at the model's size.

SemiCLIP's stage 2 reads two views of each unpaired image: the weak one (the training
transform) and a strong one (:func:`build_strong_transform`). The data module serves the
strong one as ``"image_strong"`` only when the module asks (``uses_strong_view``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from open_clip.transform import MaybeConvertMode
from torchvision import transforms as T

from sclip_lightning.models import preprocess_config

#: the release's sizes at a 224-pixel input: the resize of the shorter side, the crop's
#: reflect padding and the side of the Cutout square (scaled to the model's input size S)
RELEASE_SIZE, RELEASE_RESIZE, RELEASE_PADDING, RELEASE_CUTOUT = 224, 256, 28, 16


def build_strong_transform(model_name: str, image_size: int | None = None) -> Callable[[Any], Any]:
    """The strong augmentation of SemiCLIP's release, scaled to the model's input size.

    For an input of S x S pixels (:func:`~sclip_lightning.models.preprocess_config`; at
    S = 224 the sizes are the release's): conversion to the model's colour mode (RGB), Resize
    of the shorter side to round(S * 256 / 224) (bilinear, as the release), RandomCrop(S,
    padding=round(S * 28 / 224), padding_mode="reflect"), RandomHorizontalFlip, torchvision
    ``RandAugment(num_ops=2, magnitude=10)``, ToTensor, Normalize with the model's mean and
    std, then Cutout: a square of side round(S * 16 / 224) (at least 1) set to 0, i.e. the
    mean colour. Every random draw comes from torch's generator, so a sample seeded by the
    training sampler (``(position, seed)`` keys) gets the same view again on resume.

    Where it deviates from the release (FixMatch's ``RandAugmentMC(2, 10)`` + ``CutoutAbs(16)``):

    - RandAugment is torchvision's: the same 14 operations drawn with replacement, but each
      always applied (the release: with probability 0.5) at the fixed magnitude 10 of 31 bins,
      a third of torchvision's maxima, with a random sign: shear 0.1, translation 15% of the
      side, rotation 10 degrees, enhancement factors 1 +- 0.3, posterize to 7 bits, solarize
      above 170. The release draws a level v from 1..9 per operation: shear 0.03 v,
      translation 0.03 v of the side, rotation up to 3 v degrees, enhancement factors
      0.09 v + 0.05 (0.14..0.86), posterize to 4..7 bits, solarize above 256 - 25.6 v.
    - Cutout is ``RandomErasing(p=1, scale=(a, a), ratio=(1, 1), value=0)`` with
      a = (side / S)^2, after normalisation: the value 0 is the normalised mean colour, where
      the release pastes grey (127, 127, 127) before normalisation (0.498 of full scale in
      each channel against the mean's 0.481 / 0.458 / 0.408). The square lies wholly inside
      the image; the release centres it at a uniform point and clips it at the borders (a
      smaller patch near them).

    Args:
        model_name: open_clip model name (its input size, colour mode, mean and std).
        image_size: override the model's input size.

    Returns:
        PIL image -> (C, S, S) float tensor.
    """
    pp = preprocess_config(model_name, image_size)
    h, w = (pp.size, pp.size) if isinstance(pp.size, int) else pp.size
    s = min(h, w)
    side = max(1, round(s * RELEASE_CUTOUT / RELEASE_SIZE))
    area = side * side / (h * w)
    return T.Compose(
        [
            MaybeConvertMode(pp.mode),
            T.Resize(round(s * RELEASE_RESIZE / RELEASE_SIZE)),
            T.RandomCrop(
                (h, w), padding=round(s * RELEASE_PADDING / RELEASE_SIZE), padding_mode="reflect"
            ),  # fmt: skip
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=2, magnitude=10),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
            T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0),
        ]
    )
