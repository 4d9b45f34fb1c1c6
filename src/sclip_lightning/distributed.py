"""Distributed helpers: gather features across ranks with gradients (training), gather
evaluation rows with tensor collectives, and check that ranks agree on their settings.

Every rank computes the S-CLIP objective over the *global* batch (as the authors' release
and open_clip's ``ClipLoss(local_loss=False, gather_with_grad=True)`` do). The backward of
:func:`torch.distributed.nn.all_gather` sums the gradient contributions of every rank, so
after DDP's gradient averaging the parameter gradients equal those of one process holding
the whole global batch. Shapes must be equal on every rank (use ``drop_last=True``).
"""

from __future__ import annotations

from typing import Any

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


def gather_rows(rows: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Every rank's rows (rank-major) by tensor collectives, when ranks hold different
    numbers of rows: the sizes are all-gathered, one result is allocated, this rank's rows
    are copied into their place and every rank's block is broadcast into it. No padded
    copies per rank, no pickling.

    Args:
        rows: a tensor, or a list of row chunks (as collected batch by batch). A list is
            emptied as its chunks are copied, so the chunks are freed on the way: a rank then
            holds the result plus one chunk at most, as one process holding everything would.

    Returns:
        The gathered rows, on the device and with the dtype of the input (bool travels as
        uint8; CPU tensors under gloo, CUDA under NCCL, moved there and back). Without a
        process group: the rows concatenated.
    """
    chunks = rows if isinstance(rows, list) else [rows]
    if not chunks:
        raise ValueError("gather_rows needs at least one chunk (an empty tensor is fine)")
    like = chunks[0]
    world = world_size()
    nccl = world > 1 and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else like.device
    wire = torch.uint8 if like.dtype == torch.bool else like.dtype
    local = sum(int(c.shape[0]) for c in chunks)
    sizes = [local]
    if world > 1:
        count = torch.tensor([local], device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
    out = torch.empty((sum(sizes), *like.shape[1:]), dtype=wire, device=device)
    start = sum(sizes[: rank()])
    while chunks:  # this rank's rows into their block, each chunk freed once copied
        chunk = chunks.pop(0)
        out[start : start + chunk.shape[0]] = chunk.to(device, wire)
        start += chunk.shape[0]
    del chunk
    if world > 1:
        start = 0
        for r, n in enumerate(sizes):
            if n:
                dist.broadcast(out[start : start + n], src=r)  # a contiguous row block
            start += n
    out = out.to(like.device)
    return out.bool() if like.dtype == torch.bool else out


def check_rank_agreement(values: list[dict]) -> None:
    """Raise if the ranks of a DDP run disagree on a setting that fixes a gathered shape.

    Features (and keyword candidates) are all-gathered every step; different batch sizes or
    keyword vocabularies per rank would hang or crash inside the collective, mid-training.
    """
    keys = [k for k in values[0] if any(v[k] != values[0][k] for v in values)]
    if keys:
        per_rank = "; ".join(
            f"{k}: " + ", ".join(f"rank {r}={v[k]}" for r, v in enumerate(values)) for k in keys
        )
        raise ValueError(
            f"the DDP ranks disagree on {', '.join(keys)} ({per_rank}). Every rank must use the "
            "same batch sizes, keyword vocabulary and method: give all processes the same config "
            "(batch sizes are per device; the global batch is batch_size x devices x nodes)."
        )


def all_ranks(value: dict) -> list[dict]:
    """Every rank's copy of a small settings dict (for :func:`check_rank_agreement`)."""
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def check_fit_settings(trainer: Any, keywords: int, objective: Any) -> None:
    """Before the first step of a DDP fit: every rank has the same batch sizes, keyword
    vocabulary size, gathering and objective (or a ValueError naming what differs)."""
    if world_size() < 2:
        return
    data_hp = getattr(getattr(trainer, "datamodule", None), "hparams", {})
    check_rank_agreement(
        all_ranks(
            {
                "batch_size": data_hp.get("batch_size"),
                "unpaired_batch_size": data_hp.get("unpaired_batch_size"),
                "keywords": keywords,
                "gather_distributed": objective.gather_distributed,
                "objective": type(objective).__name__,
            }
        )
    )
