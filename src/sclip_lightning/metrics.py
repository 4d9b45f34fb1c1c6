"""Retrieval recall computed in chunks (never the full image x caption matrix)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the correct items for both retrieval directions (0 = retrieved first).

    image->text: the rank of the best-ranked caption of each image; text->image: the rank of
    each caption's image. Ties count in the model's favour (strict ``>``). Memory: at most
    ``max_elements`` similarities at a time.

    Args:
        image_features: (N, D) normalised image features.
        text_features: (M, D) normalised caption features.
        text_image: (M,) index of each caption's image in ``image_features``.
        max_elements: similarity-block budget.
        images, texts: ``(start, stop)`` of the queries to rank (default: all), each still
            ranked against every item of the other side; DDP ranks split the work this way.

    Returns:
        ``(i2t_rank, t2i_rank)`` long tensors for the queried images and captions.
    """
    n, m = image_features.shape[0], text_features.shape[0]
    i0, i1 = images or (0, n)
    t0, t1 = texts or (0, m)
    text_image = text_image.to(image_features.device)
    i2t = torch.empty(i1 - i0, dtype=torch.long, device=image_features.device)
    step = _chunk(m, max_elements)
    for s in range(i0, i1, step):
        sims = image_features[s : min(s + step, i1)] @ text_features.T  # (c, M)
        c = sims.shape[0]
        own = (text_image >= s) & (text_image < s + c)
        pos = torch.full((c,), float("-inf"), device=sims.device, dtype=sims.dtype)
        rows = text_image[own] - s
        pos = pos.scatter_reduce(0, rows, sims[rows, own.nonzero().squeeze(1)], "amax")
        i2t[s - i0 : s - i0 + c] = (sims > pos[:, None]).sum(dim=1, dtype=torch.int32)
    t2i = torch.empty(t1 - t0, dtype=torch.long, device=image_features.device)
    step = _chunk(n, max_elements)
    for s in range(t0, t1, step):
        sims = text_features[s : min(s + step, t1)] @ image_features.T  # (c, N)
        c = sims.shape[0]
        pos = sims.gather(1, text_image[s : s + c, None])
        t2i[s - t0 : s - t0 + c] = (sims > pos).sum(dim=1, dtype=torch.int32)
    return i2t, t2i


def recall_from_ranks(
    i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions (percent) and their mean ``"mean_R"``, from the ranks."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t < k).float().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (t2i < k).float().mean().item()
    out["mean_R"] = sum(out.values()) / len(out)
    return out


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    max_elements: int = 1 << 24,
) -> dict[str, float]:
    """Recall@k in both directions (percent) and their mean ``"mean_R"``."""
    i2t, t2i = retrieval_ranks(image_features, text_features, text_image, max_elements)
    return recall_from_ranks(i2t, t2i, ks)
