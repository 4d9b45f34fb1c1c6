"""Keyword-level pseudo-label loss by partial-label learning (S-CLIP Sec. 3.2)."""

from __future__ import annotations

from typing import Literal

import torch

from sclip_lightning.losses.component import check_choice
from sclip_lightning.losses.functional import soft_cross_entropy

KeywordWeighting = Literal["linear", "softmax"]


def keyword_targets(
    unpaired_features: torch.Tensor,
    keyword_features: torch.Tensor,
    candidates: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weighting: KeywordWeighting = "softmax",
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Partial-label targets over the keyword vocabulary.

    Inside the candidate set the weights come from the model's own (detached) similarity
    ``sim = s * u k^T``: ``"linear"`` is the release's ``sim / sum(sim)`` (unstable when
    similarities can be negative), ``"softmax"`` a softmax over the candidates. A single
    candidate is always one-hot; rows without candidates are all zero.

    Args:
        unpaired_features: (B_u, D).
        keyword_features: (K, D).
        candidates: (B_u, K) bool candidate sets.
        logit_scale: the scale ``s``.
        weighting: ``"linear" | "softmax"``.
        logits: optional precomputed ``s * unpaired_features @ keyword_features.T``.

    Returns:
        (B_u, K) float targets, rows summing to 1 (or 0 without candidates).
    """
    check_choice("keyword_weighting", weighting, KeywordWeighting)
    if logits is None:
        logits = (unpaired_features @ keyword_features.T) * logit_scale
    sim = logits.detach()
    if weighting == "softmax":
        # one candidate -> exactly one-hot; none -> a uniform softmax, then zeroed
        outside = ~candidates
        filled = sim.masked_fill(outside, torch.finfo(sim.dtype).min)
        return torch.softmax(filled, dim=-1).masked_fill_(outside, 0.0)
    mask = candidates.to(sim.dtype)
    count = mask.sum(dim=-1, keepdim=True)
    masked = sim * mask
    weights = masked / masked.sum(dim=-1, keepdim=True)
    weights = torch.where(count == 1, mask, weights)  # the release sets one-hot explicitly
    return torch.where(count > 0, weights, torch.zeros_like(weights))


def keyword_loss(
    unpaired_features: torch.Tensor,
    keyword_features: torch.Tensor,
    support_candidates: torch.Tensor,
    plan: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weighting: KeywordWeighting = "softmax",
    empty_rows_in_mean: bool = True,
) -> torch.Tensor:
    """S-CLIP's keyword loss (Sec. 3.2): partial-label learning over the keyword vocabulary.

    The candidate set of unpaired image ``j`` is the keyword set of the support caption with
    the largest plan entry (``argmax_i Gamma_ji``); the loss is the soft cross-entropy of
    ``s U k^T`` (keyword texts encoded with gradient) against :func:`keyword_targets`.

    Args:
        unpaired_features: (B_u, D). keyword_features: (K, D).
        support_candidates: (S, K) bool, keyword k occurs in support caption i.
        plan: (B_u, S) assignment; only its row argmax is used (no gradient through it).
        logit_scale: the scale ``s``.
        weighting: ``"linear"`` (release) or ``"softmax"`` (bounded).
        empty_rows_in_mean: count images without candidates in the mean with a zero target
            (release: True) or average over images with candidates only (False).

    Returns:
        Scalar, unweighted (the paper's objective multiplies it by 1/2).
    """
    nearest = plan.detach().max(dim=-1).indices
    candidates = support_candidates[nearest]
    logits = logit_scale * (unpaired_features @ keyword_features.T)
    targets = keyword_targets(
        unpaired_features, keyword_features, candidates, logit_scale, weighting, logits
    )
    row_weight = None if empty_rows_in_mean else candidates.any(dim=-1).to(logits.dtype)
    return soft_cross_entropy(logits, targets, row_weight)
