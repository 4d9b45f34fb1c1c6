"""CLIP contrastive loss with unpaired images as extra text->image candidates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    unpaired_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over a paired batch (S-CLIP eq. 1).

    Image->text logits are ``s X Y^T`` (B_p x B_p). Text->image logits are ``s Y [X; U]^T``
    (B_p x (B_p + B_u)) when ``unpaired_features`` is given, so unpaired images act as extra
    negatives for every caption. Targets are the diagonal.

    Args:
        image_features: (B_p, D) L2-normalised paired image features.
        text_features: (B_p, D) L2-normalised caption features.
        logit_scale: the scale ``s`` (already exponentiated).
        unpaired_features: optional (B_u, D) L2-normalised unpaired image features.

    Returns:
        Scalar ``(CE(img->txt) + CE(txt->img)) / 2``.
    """
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    logits_per_image = logit_scale * image_features @ text_features.T
    candidates = image_features
    if unpaired_features is not None and unpaired_features.shape[0] > 0:
        candidates = torch.cat([image_features, unpaired_features], dim=0)
    logits_per_text = logit_scale * text_features @ candidates.T
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2
