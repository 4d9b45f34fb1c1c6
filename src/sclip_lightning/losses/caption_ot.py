"""Caption-level pseudo-label loss: unpaired images learn the plan's mixture of captions."""

from __future__ import annotations

import torch

from sclip_lightning.losses.functional import soft_cross_entropy


def caption_loss(
    unpaired_features: torch.Tensor,
    support_text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    plan: torch.Tensor,
    support_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """S-CLIP's caption loss (Sec. 3.1): soft cross-entropy of ``s U T^T`` against ``Gamma``.

    Args:
        unpaired_features: (B_u, D) L2-normalised unpaired image features ``U``.
        support_text: (S, D) the support captions' features ``T`` (the paired batch's, then
            the support bank's).
        logit_scale: the scale ``s``.
        plan: (B_u, S) assignment ``Gamma`` (rows sum to 1), from an assigner.
        support_mask: optional (S,) bool; False columns (empty or duplicate bank slots) are
            left out of the softmax.

    Returns:
        Scalar, unweighted (the paper's objective multiplies it by 1/2).
    """
    logits = logit_scale * (unpaired_features @ support_text.T)
    return soft_cross_entropy(logits, plan, column_mask=support_mask)
