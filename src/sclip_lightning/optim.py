"""The module's optimiser: AdamW over parameter groups, linear warm-up, cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))


def adamw_with_schedule(
    module: torch.nn.Module,
    own_groups: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    scheduler: str,
    total_steps: int,
) -> dict[str, Any]:
    """AdamW over ``module``'s trainable parameters and the step-wise LR schedule.

    Parameters in ``own_groups`` (an objective's, with their own ``lr`` / ``weight_decay``)
    keep those groups; the others get ``weight_decay`` except norms, biases, 1-d tensors and
    logit scales (open_clip's rule). The schedule multiplies each group's lr by a linear
    warm-up over ``warmup_steps`` then a cosine to 0 at ``total_steps`` (or 1 with
    ``scheduler="constant"``).
    """
    own = {id(p) for g in own_groups for p in g["params"]}
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rest = [(n, p) for n, p in params if id(p) not in own]
    groups = [
        {"params": [p for n, p in rest if not _no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in rest if _no_decay(n, p)], "weight_decay": 0.0},
        *[{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in own_groups],
    ]
    groups = [g for g in groups if g["params"]]
    # fused AdamW takes the guard's device-side non-finite flag (NonFiniteGuard)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in params)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
