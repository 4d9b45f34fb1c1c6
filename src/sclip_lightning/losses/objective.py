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

from dataclasses import dataclass, field, replace
from typing import Any

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
        unpaired_strong: (B_u, D) features of a strongly augmented view of the unpaired
            images (only when :attr:`Objective.uses_strong_view`).
        unpaired_index: (B_u,) long ``index`` of each unpaired image (its dataset item).
        extra: tensors an objective computed per rank in :meth:`Objective.prepare` (rows
            first; floating ones gathered with gradients, the others without).
    """

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    unpaired: torch.Tensor | None = None
    keywords: torch.Tensor | None = None
    keyword_candidates: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    label: torch.Tensor | None = None
    unpaired_strong: torch.Tensor | None = None
    unpaired_index: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


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

    @property
    def uses_strong_view(self) -> bool:
        """Whether :meth:`compute` reads ``unpaired_strong`` (the data module then serves a
        strongly augmented view of each unpaired image)."""
        return False

    def bind_text_tower(self, encoder: Any) -> None:
        """Called by the module before :meth:`setup` with a
        :class:`~sclip_lightning.prompts.PromptEncoder` of its text tower, for objectives
        that encode their own prompts (override; nothing by default)."""

    def setup(self, info: TrainInfo) -> None:
        """Called by the module once the training data is known (override to size state)."""

    def prepare(self, f: Features) -> Features:
        """Per-rank work before the batch is gathered (override; identity by default): e.g.
        encoding prompts of this rank's images into ``f.extra``. Runs under the caller's
        autocast, on the local batch."""
        return f

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups of the objective's own parameters with settings of their own
        (``{"params", "lr", "weight_decay"}``); parameters not listed go to the module's
        groups. None by default."""
        return []

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to clamp a learned scale); nothing by
        default."""

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
        unpaired_strong_features: torch.Tensor | None = None,
        unpaired_index: torch.Tensor | None = None,
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
            unpaired_strong_features,
        )
        device = image_features.device
        f = Features(
            image_features,
            text_features,
            torch.as_tensor(logit_scale, device=device),
            unpaired_features,
            keyword_features,
            keyword_candidates,
            pair_index,
            label,
            unpaired_strong_features,
            unpaired_index,
        )
        f = self.prepare(f)
        with torch.autocast(device_type=device.type, enabled=False):
            f = _float32(f)
            if self.gather_distributed:
                f = _gathered(f)
            losses = self.compute(f)
        return losses if output_dict else sum(losses.values())  # type: ignore[return-value]


def _float32(f: Features) -> Features:
    """Floating features in float32 (autocast may have produced half precision)."""

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.float() if t is not None and t.is_floating_point() else t

    return replace(
        f,
        image=f.image.float(),
        text=f.text.float(),
        logit_scale=f.logit_scale.float(),
        unpaired=cast(f.unpaired),
        keywords=cast(f.keywords),
        keyword_candidates=None if f.keyword_candidates is None else f.keyword_candidates.bool(),
        unpaired_strong=cast(f.unpaired_strong),
        extra={k: cast(v) for k, v in f.extra.items()},  # type: ignore[misc]
    )


def _gathered(f: Features) -> Features:
    """The global batch: floating tensors with gradients, the rest without."""

    def gather(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.is_floating_point():
            return distributed.gather_with_grad(t)
        return distributed.gather_no_grad(t)

    return Features(
        distributed.gather_with_grad(f.image),
        distributed.gather_with_grad(f.text),
        f.logit_scale,
        gather(f.unpaired),
        f.keywords,  # the same on every rank
        gather(f.keyword_candidates),
        gather(f.pair_index),
        gather(f.label),
        gather(f.unpaired_strong),
        gather(f.unpaired_index),
        {k: gather(v) for k, v in f.extra.items()},  # type: ignore[misc]
    )


def _check_shapes(
    image: torch.Tensor,
    text: torch.Tensor,
    unpaired: torch.Tensor | None,
    keywords: torch.Tensor | None,
    candidates: torch.Tensor | None,
    ids: torch.Tensor | None,
    strong: torch.Tensor | None,
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
    if strong is not None and (unpaired is None or strong.shape != unpaired.shape):
        raise ValueError(
            "unpaired_strong_features must match unpaired_features' shape; got "
            f"{tuple(strong.shape)} for {None if unpaired is None else tuple(unpaired.shape)}"
        )
