"""Soft cross-entropy, the one reduction the caption and keyword losses share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    column_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over rows.

    Args:
        logits: (N, C) unnormalised scores.
        targets: (N, C) target distributions (rows may be all-zero: they add 0).
        row_weight: optional (N,) weights; the result is ``sum(w * ce) / max(sum(w), 1)``.
            ``None`` is the plain mean over all N rows (the release).
        column_mask: optional (C,) bool: columns that exist (False columns are left out of
            the softmax; their targets must be 0).

    Returns:
        Scalar loss.
    """
    if column_mask is not None:
        logits = logits.masked_fill(~column_mask, -math.inf)
    log_p = F.log_softmax(logits, dim=-1)
    if column_mask is not None:
        log_p = log_p.masked_fill(~column_mask, 0.0)  # 0 * -inf would be NaN
    per_row = -(targets * log_p).sum(dim=-1)
    if row_weight is None:
        return per_row.mean()
    return (per_row * row_weight).sum() / row_weight.sum().clamp_min(1.0)
