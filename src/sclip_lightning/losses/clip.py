"""The supervised CLIP baseline as an objective: the pairs only."""

from __future__ import annotations

import torch

from sclip_lightning.losses.contrastive import contrastive_loss
from sclip_lightning.losses.objective import Features, Objective


class CLIPLoss(Objective):
    """Symmetric InfoNCE over the paired batch (open_clip's ``ClipLoss`` with
    ``gather_with_grad``); unpaired images are not used (nor loaded).

    Returns ``{"contrastive_loss"}``. Options: see :class:`Objective`.
    """

    def compute(self, f: Features) -> dict[str, torch.Tensor]:
        return {"contrastive_loss": contrastive_loss(f.image, f.text, f.logit_scale)}
