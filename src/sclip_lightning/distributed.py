"""The one distributed helper: gather features across ranks with gradients.

Every rank computes the S-CLIP objective over the *global* batch (as the authors' release
and open_clip's ``ClipLoss(local_loss=False, gather_with_grad=True)`` do). The backward of
:func:`torch.distributed.nn.all_gather` sums the gradient contributions of every rank, so
after DDP's gradient averaging the parameter gradients equal those of one process holding
the whole global batch. Shapes must be equal on every rank (use ``drop_last=True``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping gradients.

    Args:
        tensor: (B, ...) local tensor; B must be the same on every rank.

    Returns:
        (world_size * B, ...) tensor, rank-major. Identity when not distributed.
    """
    if world_size() == 1:
        return tensor
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 without gradients.

    Boolean tensors are sent as uint8 (gloo cannot all-gather bool) and converted back.
    """
    n = world_size()
    if n == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    src = tensor.to(torch.uint8) if is_bool else tensor
    src = src.contiguous()
    out = [torch.empty_like(src) for _ in range(n)]
    dist.all_gather(out, src)
    cat = torch.cat(out, dim=0)
    return cat.bool() if is_bool else cat
