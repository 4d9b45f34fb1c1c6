"""The base of training objectives: the features of a batch in, named loss terms out.

An objective is a component of the model (:class:`~sclip_lightning.SCLIPModule` takes it as
``criterion``). The module encodes what the objective says it reads (paired images and
captions always; unpaired images when :attr:`Objective.uses_unpaired`; the keyword texts when
:attr:`Objective.uses_keywords`) and calls it; the objective returns ``{"<name>_loss": ...}``
(open_clip's key names: ``contrastive_loss``, ...), whose sum training minimises. To write
your own, subclass :class:`Objective` (or :class:`~sclip_lightning.losses.CLIPLoss`) and
override :meth:`Objective.compute`; name it in YAML by its class path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sclip_lightning import distributed
from sclip_lightning.interfaces import TrainInfo
from sclip_lightning.losses.component import Component


@dataclass
class Features:
    """One training batch as an objective sees it: float32, L2-normalised, and under DDP
    with ``gather_distributed`` the global batch (features gathered with gradients).

    Attributes:
        image: (B_p, D) paired image features.
        text: (B_p, D) their captions' features.
        logit_scale: the scale ``s`` (0-d, already exponentiated).
        unpaired: (B_u, D) unpaired image features, or None.
        keywords: (K, D) keyword text features (not gathered: the same on every rank).
        keyword_candidates: (B_p, K) bool, keyword k occurs in caption i.
        pair_index: (B_p,) long position of each pair among the paired training images.
        label: (B_p,) long hidden class labels (diagnostics only, never a loss input).
    """

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    unpaired: torch.Tensor | None = None
    keywords: torch.Tensor | None = None
    keyword_candidates: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    label: torch.Tensor | None = None


class Objective(Component):
    """Base class: features of a training batch -> ``{"<name>_loss": scalar}``.

    :meth:`forward` checks the shapes, disables autocast, casts to float32 and (under DDP,
    with ``gather_distributed``) gathers the batch from every rank, then calls
    :meth:`compute`, which subclasses implement.

    Args:
        gather_distributed: under DDP, all-gather features (with gradients), keyword
            candidates, pair indices and labels across ranks, so every term runs over the
            global batch (as open_clip's ``gather_with_grad`` and both methods' releases).
    """

    def __init__(self, gather_distributed: bool = True) -> None:
        super().__init__()
        self.gather_distributed = bool(gather_distributed)

    @property
    def uses_unpaired(self) -> bool:
        """Whether :meth:`compute` reads unpaired images (the data module loads them only
        then)."""
        return False

    @property
    def uses_keywords(self) -> bool:
        """Whether :meth:`compute` reads the keyword features (encoded every step then)."""
        return False

    def setup(self, info: TrainInfo) -> None:
        """Called by the module once the training data is known (override to size state)."""

    def compute(self, f: Features) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (override). Keys end in ``_loss``."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")

    def train_metrics(self, unpaired_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diagnostics of the last training step from the unpaired images' hidden labels
        (never seen by :meth:`compute`), logged per epoch as ``train/<key>``; none by
        default. No host sync."""
        return {}

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        unpaired_features: torch.Tensor | None = None,
        keyword_features: torch.Tensor | None = None,
        keyword_candidates: torch.Tensor | None = None,
        pair_index: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        output_dict: bool = True,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """The loss terms (see :class:`Features` for the shapes), or their sum with
        ``output_dict=False``."""
        _check_shapes(
            image_features,
            text_features,
            unpaired_features,
            keyword_features,
            keyword_candidates,
            pair_index,
        )
        device = image_features.device
        with torch.autocast(device_type=device.type, enabled=False):
            f = Features(
                image_features.float(),
                text_features.float(),
                torch.as_tensor(logit_scale, device=device).float(),
                None if unpaired_features is None else unpaired_features.float(),
                None if keyword_features is None else keyword_features.float(),
                None if keyword_candidates is None else keyword_candidates.bool(),
                pair_index,
                label,
            )
            if self.gather_distributed:
                f = _gathered(f)
            losses = self.compute(f)
        return losses if output_dict else sum(losses.values())  # type: ignore[return-value]


def _gathered(f: Features) -> Features:
    """The global batch: features with gradients, the rest without."""
    g, ng = distributed.gather_with_grad, distributed.gather_no_grad
    return Features(
        g(f.image),
        g(f.text),
        f.logit_scale,
        None if f.unpaired is None else g(f.unpaired),
        f.keywords,
        None if f.keyword_candidates is None else ng(f.keyword_candidates),
        None if f.pair_index is None else ng(f.pair_index),
        None if f.label is None else ng(f.label),
    )


def _check_shapes(
    image: torch.Tensor,
    text: torch.Tensor,
    unpaired: torch.Tensor | None,
    keywords: torch.Tensor | None,
    candidates: torch.Tensor | None,
    ids: torch.Tensor | None,
) -> None:
    if image.ndim != 2 or text.shape != image.shape:
        raise ValueError(
            "image_features and text_features must both be (B_p, D); got "
            f"{tuple(image.shape)} and {tuple(text.shape)}"
        )
    dim = image.shape[1]
    if unpaired is not None and (unpaired.ndim != 2 or unpaired.shape[1] != dim):
        raise ValueError(f"unpaired_features must be (B_u, {dim}); got {tuple(unpaired.shape)}")
    if keywords is not None and (keywords.ndim != 2 or keywords.shape[1] != dim):
        raise ValueError(f"keyword_features must be (K, {dim}); got {tuple(keywords.shape)}")
    if candidates is not None:
        k = keywords.shape[0] if keywords is not None else candidates.shape[-1]
        if candidates.shape != (image.shape[0], k):
            raise ValueError(
                f"keyword_candidates must be (B_p, K) = ({image.shape[0]}, {k}); got "
                f"{tuple(candidates.shape)}: the batch's keyword labels and the keyword features "
                "must come from the same vocabulary (the data module's; leave the module's "
                "keyword_vocabulary unset)"
            )
    if ids is not None and ids.shape != (image.shape[0],):
        raise ValueError(f"pair_index must be (B_p,) = ({image.shape[0]},); got {tuple(ids.shape)}")
