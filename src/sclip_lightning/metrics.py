"""Retrieval recall computed in chunks (never the full image x caption matrix).

Ties. Data sets such as RSICD repeat caption strings across images; identical captions have
identical (or, across batches and kernels, rounding-close) embeddings, so an image's own
caption ties with another image's copy of it. A ranking cannot order tied items, so recall
is computed **in expectation over a uniformly random order of the tied items**: what an
evaluator that breaks ties arbitrarily (CLIP_benchmark's ``torch.topk``, an ``argsort``)
reports on average. ``ties="optimistic"`` counts every tie in the model's favour (the rule
of sclip-lightning before 0.2, which inflated image-to-text recall on RSICD) and
``"pessimistic"`` against it; both are kept for comparison only.

Two scores tie when they differ by at most ``tie_tol`` (default 1e-6): float32 similarities
of unit vectors carry rounding of that order (a D-term dot product accumulates up to
about ``sqrt(D) * 2^-24`` ~ 1e-6 for D = 512 in typical kernels), so the order of two
scores closer than that is decided by the kernel, not by the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

#: how tied scores count: in expectation (default), for the model or against it
Ties = Literal["expected", "optimistic", "pessimistic"]
TIE_TOL = 1e-6


def _chunk(n_other: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_other))


@torch.no_grad()
def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    max_elements: int = 1 << 24,
    images: tuple[int, int] | None = None,
    texts: tuple[int, int] | None = None,
    tie_tol: float = TIE_TOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the correct items land, for both retrieval directions, with ties kept apart.

    For each query, with ``best`` the score of its best-scoring correct item (image->text: the
    best of the image's captions; text->image: the caption's image), three counts:
    ``above`` wrong items scoring more than ``best + tie_tol``; ``tied`` wrong items within
    ``tie_tol`` of ``best``; ``tied_correct`` correct items within ``tie_tol`` of ``best``
    (>= 1; always 1 for text->image). :func:`recall_from_ranks` turns them into recall@k.
    Memory: at most ``max_elements`` similarities at a time.

    Args:
        image_features: (N, D) normalised image features.
        text_features: (M, D) normalised caption features.
        text_image: (M,) index of each caption's image in ``image_features``.
        max_elements: similarity-block budget.
        images, texts: ``(start, stop)`` of the queries to rank (default: all), each still
            ranked against every item of the other side; DDP ranks split the work this way.
        tie_tol: scores this close to ``best`` tie with it.

    Returns:
        ``(i2t, t2i)``: (n_images, 3) and (n_captions, 3) int64 tensors of
        ``[above, tied, tied_correct]`` for the queried images and captions.
    """
    n, m = image_features.shape[0], text_features.shape[0]
    i0, i1 = images or (0, n)
    t0, t1 = texts or (0, m)
    device = image_features.device
    text_image = text_image.to(device)
    i2t = torch.empty(i1 - i0, 3, dtype=torch.long, device=device)
    step = _chunk(m, max_elements)
    for s in range(i0, i1, step):
        sims = image_features[s : min(s + step, i1)] @ text_features.T  # (c, M)
        c = sims.shape[0]
        own = ((text_image >= s) & (text_image < s + c)).nonzero().squeeze(1)
        rows = text_image[own] - s
        own_sims = sims[rows, own]  # the scores of each image's own captions
        best = torch.full((c,), float("-inf"), device=device, dtype=sims.dtype)
        best = best.scatter_reduce(0, rows, own_sims, "amax")
        above = (sims > (best + tie_tol)[:, None]).sum(dim=1, dtype=torch.int32)
        near = (sims >= (best - tie_tol)[:, None]).sum(dim=1, dtype=torch.int32)
        good = own_sims >= best[rows] - tie_tol
        tied_correct = torch.zeros(c, dtype=torch.int32, device=device)
        tied_correct = tied_correct.scatter_add(0, rows, good.to(torch.int32))
        tied = near - above - tied_correct
        i2t[s - i0 : s - i0 + c] = torch.stack((above, tied, tied_correct), dim=1)
    t2i = torch.empty(t1 - t0, 3, dtype=torch.long, device=device)
    step = _chunk(n, max_elements)
    for s in range(t0, t1, step):
        sims = text_features[s : min(s + step, t1)] @ image_features.T  # (c, N)
        c = sims.shape[0]
        best = sims.gather(1, text_image[s : s + c, None])
        above = (sims > best + tie_tol).sum(dim=1, dtype=torch.int32)
        tied = (sims >= best - tie_tol).sum(dim=1, dtype=torch.int32) - above - 1
        t2i[s - t0 : s - t0 + c, 0] = above
        t2i[s - t0 : s - t0 + c, 1] = tied
        t2i[s - t0 : s - t0 + c, 2] = 1
    return i2t, t2i


def hit_rate(counts: torch.Tensor, k: int, ties: Ties = "expected") -> torch.Tensor:
    """Per query, the probability that a correct item is among the first ``k`` (float64).

    ``counts`` is (Q, 3) ``[above, tied, tied_correct]`` (:func:`retrieval_ranks`). In
    expectation over a random order of the ``tied + tied_correct`` tied items, the number
    ``X`` of tied wrong items before the first tied correct one has
    ``P(X >= j) = C(tied, j) / C(tied + tied_correct, j)``; a hit is ``above + X < k``.
    """
    above, tied, good = (counts[:, i].double() for i in range(3))
    if ties == "optimistic":
        return (above < k).double()
    if ties == "pessimistic":
        return (above + tied < k).double()
    if ties != "expected":
        raise ValueError(f"ties must be 'expected', 'optimistic' or 'pessimistic', got {ties!r}")
    j = (k - above).clamp(0.0, None)
    jc = torch.minimum(j, tied)  # P(X >= j) for j <= tied; j > tied is a sure hit
    log_p = (
        torch.lgamma(tied + 1)
        - torch.lgamma(tied - jc + 1)
        - torch.lgamma(tied + good + 1)
        + torch.lgamma(tied + good - jc + 1)
    )
    hit = 1.0 - log_p.exp()
    return torch.where(j > tied, torch.ones_like(hit), torch.where(j <= 0, 0.0, hit))


def recall_from_ranks(
    i2t: torch.Tensor,
    t2i: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    ties: Ties = "expected",
) -> dict[str, float]:
    """Recall@k in both directions (percent) and their mean ``"mean_R"``, from the counts of
    :func:`retrieval_ranks` (ties counted as ``ties`` says; see the module docstring)."""
    out: dict[str, float] = {}
    for name, counts in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * hit_rate(counts, k, ties).mean().item()
    out["mean_R"] = sum(out.values()) / len(out)
    return out


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    max_elements: int = 1 << 24,
    ties: Ties = "expected",
    tie_tol: float = TIE_TOL,
) -> dict[str, float]:
    """Recall@k in both directions (percent) and their mean ``"mean_R"``."""
    i2t, t2i = retrieval_ranks(
        image_features, text_features, text_image, max_elements, tie_tol=tie_tol
    )
    return recall_from_ranks(i2t, t2i, ks, ties)
