"""Keyword-level pseudo-label loss by partial-label learning (S-CLIP Sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn as nn

from sclip_lightning.losses.functional import soft_cross_entropy

KEYWORD_WEIGHTINGS = ("linear", "softmax")


def keyword_targets(
    unpaired_features: torch.Tensor,
    keyword_features: torch.Tensor,
    candidates: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weighting: str = "softmax",
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
    if weighting not in KEYWORD_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {KEYWORD_WEIGHTINGS}, got {weighting!r}")
    if logits is None:
        logits = (unpaired_features @ keyword_features.T) * logit_scale
    sim = logits.detach()
    mask = candidates.to(sim.dtype)
    count = mask.sum(dim=-1, keepdim=True)
    if weighting == "linear":
        masked = sim * mask
        weights = masked / masked.sum(dim=-1, keepdim=True)
    else:
        filled = sim.masked_fill(~candidates, torch.finfo(sim.dtype).min)
        weights = torch.softmax(filled, dim=-1) * mask
    weights = torch.where(count == 1, mask, weights)
    return torch.where(count > 0, weights, torch.zeros_like(weights))


class KeywordPLLLoss(nn.Module):
    """Keyword-level partial-label loss, usable alone.

    For unpaired image ``j`` the candidate set is the keyword set of the caption of the paired
    image with the largest plan entry (``argmax_i Gamma_ji``). Loss: soft cross-entropy of
    ``s U k^T`` (keyword texts encoded by the text tower, with gradient) against
    :func:`keyword_targets` (unweighted: multiply by 1/2 for the paper's objective).

    Args:
        weighting: ``"linear"`` (release) or ``"softmax"`` (stable).
        empty_rows_in_mean: count images with no candidate in the mean with a zero target
            (release: True) or average over images with candidates only (False).
    """

    def __init__(self, weighting: str = "softmax", empty_rows_in_mean: bool = True) -> None:
        super().__init__()
        if weighting not in KEYWORD_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {KEYWORD_WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.empty_rows_in_mean = empty_rows_in_mean

    def forward(
        self,
        unpaired_features: torch.Tensor,
        keyword_features: torch.Tensor,
        paired_candidates: torch.Tensor,
        plan: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """Args:
        unpaired_features: (B_u, D). keyword_features: (K, D).
        paired_candidates: (B_p, K) bool, keyword k occurs in paired caption i.
        plan: (B_u, B_p) assignment; its row argmax picks the candidate set.
        logit_scale: scalar ``s``.
        """
        nearest = plan.detach().argmax(dim=-1)
        candidates = paired_candidates[nearest]
        logits = (unpaired_features @ keyword_features.T) * logit_scale
        targets = keyword_targets(
            unpaired_features, keyword_features, candidates, logit_scale, self.weighting, logits
        )
        row_weight = None if self.empty_rows_in_mean else candidates.any(dim=-1).to(logits.dtype)
        return soft_cross_entropy(logits, targets, row_weight)
