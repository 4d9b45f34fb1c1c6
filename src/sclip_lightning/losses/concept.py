"""SemiCLIP's concept loss: images classified against learned concept embeddings.

Stage 1 trains on the paired images with multi-hot targets of the nouns in their captions;
stage 2 on the strong view of unpaired images with the top-k concepts of the stage-1
logits (Gan & Wei, "Semi-Supervised CLIP Adaptation by Enforcing Semantic and Trapezoidal
Consistency", ICLR 2025, eqs. 2 and 4; release ``custom/loss.py:211-232``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sclip_lightning.losses.functional import soft_cross_entropy


def concept_logits(
    features: torch.Tensor, embeddings: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """``exp(c) * F E^T``: (N, D) unit image features against (K, D) concept embeddings
    (E is not re-normalised, as in the release) -> (N, K) logits."""
    return log_scale.exp() * features @ embeddings.T


def multi_hot_targets(labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """(N, K) 0/1 labels -> rows summing to 1 (zero rows stay zero).

    Args:
        labels: (N, K) multi-hot concept labels.
        smoothing: added to every entry before the row sum (release: 1e-8, so a row of n
            concepts sums to n / (n + K * 1e-8)); 0: exactly 1.
    """
    if smoothing:
        return labels / (labels + smoothing).sum(dim=1, keepdim=True)
    return labels / labels.sum(dim=1, keepdim=True).clamp_min(1.0)


def top_k_targets(logits: torch.Tensor, k: int, smoothing: float = 0.0) -> torch.Tensor:
    """Uniform targets over the top-``k`` concepts of each row of ``logits`` (B, K) (the
    release ranks ``softmax(logits)``; the order is the same barring underflow ties)."""
    top = torch.topk(F.softmax(logits.detach(), dim=1), k, dim=1).indices
    hot = torch.zeros_like(logits).scatter_(1, top, 1.0)
    return multi_hot_targets(hot, smoothing)


def concept_loss(
    logits: torch.Tensor, targets: torch.Tensor, empty_rows_in_mean: bool = True
) -> torch.Tensor:
    """Soft cross-entropy of concept logits against target rows.

    Args:
        logits: (N, K) concept logits (:func:`concept_logits`).
        targets: (N, K) rows summing to 1, or all-zero for images without a concept.
        empty_rows_in_mean: count all-zero rows in the mean (release: True, they add 0);
            False averages over the rows that have a concept.

    Returns:
        Scalar loss.
    """
    if empty_rows_in_mean:
        return soft_cross_entropy(logits, targets)
    return soft_cross_entropy(logits, targets, row_weight=(targets.sum(dim=1) > 0).to(logits))
