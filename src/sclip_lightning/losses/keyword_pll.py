"""Keyword-level pseudo-label loss by partial-label learning (S-CLIP Sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn as nn

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
        nearest = plan.detach().max(dim=-1).indices
        candidates = paired_candidates[nearest]
        scale = torch.as_tensor(logit_scale, dtype=unpaired_features.dtype)
        return _KeywordPLL.apply(
            unpaired_features,
            keyword_features,
            scale.to(unpaired_features.device),
            candidates,
            self.weighting,
            self.empty_rows_in_mean,
        )


def keyword_loss_forward(
    unpaired: torch.Tensor,
    keywords: torch.Tensor,
    scale: torch.Tensor,
    candidates: torch.Tensor,
    weighting: str,
    empty_rows_in_mean: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Value of the keyword loss without autograd, and what :func:`keyword_loss_backward`
    needs: ``soft_cross_entropy(s U K^T, keyword_targets(...), row_weight)``."""
    sim = unpaired @ keywords.T  # (B_u, K)
    logits = sim * scale
    targets = keyword_targets(unpaired, keywords, candidates, scale, weighting, logits)
    log_p = torch.log_softmax(logits, dim=-1)
    if empty_rows_in_mean:
        denom = logits.new_full((), float(max(logits.shape[0], 1)))  # no host->device copy
    else:  # rows without candidates have all-zero targets: they only change the count
        denom = candidates.any(dim=-1).sum().to(logits.dtype).clamp_min(1.0)
    loss = -torch.dot(targets.view(-1), log_p.view(-1)) / denom
    return loss, (sim, targets, log_p, denom)


def keyword_loss_backward(
    grad: torch.Tensor, scale: torch.Tensor, saved: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d sim * s, d s)`` for the loss of :func:`keyword_loss_forward`: the gradient with
    respect to ``U K^T`` (so ``dU = . @ K``, ``dK = .^T @ U``) and to the scale."""
    sim, targets, log_p, denom = saved
    d_logits = torch.exp(log_p).mul_(targets.sum(dim=-1, keepdim=True)).sub_(targets)
    d_logits.mul_(grad / denom)  # softmax * sum(targets) - targets
    d_scale = torch.dot(d_logits.view(-1), sim.view(-1))
    return d_logits.mul_(scale), d_scale


class _KeywordPLL(torch.autograd.Function):
    """Soft cross-entropy of ``s U K^T`` against :func:`keyword_targets`, one autograd node.

    Same value and gradients as ``soft_cross_entropy(s * U @ K.T, targets, row_weight)``
    (the targets are built from detached similarities, as released); the backward is
    ``softmax * sum(targets) - targets`` and three small products, with no graph of a dozen
    (B_u, K) operations behind it.
    """

    @staticmethod
    def forward(ctx, unpaired, keywords, scale, candidates, weighting, empty_rows_in_mean):  # type: ignore[override]
        loss, saved = keyword_loss_forward(
            unpaired, keywords, scale, candidates, weighting, empty_rows_in_mean
        )
        ctx.save_for_backward(unpaired, keywords, scale, *saved)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        unpaired, keywords, scale, *saved = ctx.saved_tensors
        d_sim, d_scale = keyword_loss_backward(grad, scale, tuple(saved))
        d_unpaired = d_sim @ keywords if ctx.needs_input_grad[0] else None
        d_keywords = d_sim.T @ unpaired if ctx.needs_input_grad[1] else None
        return (
            d_unpaired,
            d_keywords,
            d_scale if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )
