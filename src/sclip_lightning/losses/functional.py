"""Small functional pieces shared by the S-CLIP losses: soft cross-entropy and the
pseudo-label assigners (entropic OT, soft nearest neighbour, hard nearest neighbour).

Everything here is pure tensor code: no Lightning, no host synchronisation, no Python loop
over batch elements. Shapes use ``B_u`` for unpaired (query) images and ``B_p`` for the
paired support.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ASSIGNERS = ("ot", "soft_nn", "hard_nn")
SINKHORN_SOLVERS = ("log", "pot")


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over rows.

    Args:
        logits: (N, C) unnormalised scores.
        targets: (N, C) target distributions (rows may be all-zero: they add 0).
        row_weight: optional (N,) weights; the result is ``sum(w * ce) / sum(w)`` (0 when
            every weight is 0). ``None`` is the plain mean over all N rows (the release).

    Returns:
        Scalar loss.
    """
    per_row = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if row_weight is None:
        return per_row.mean()
    return (per_row * row_weight).sum() / row_weight.sum().clamp_min(1.0)


def sinkhorn_pot(cost: torch.Tensor, reg: torch.Tensor | float, num_iters: int) -> torch.Tensor:
    """Entropic OT plan with uniform marginals, POT's ``sinkhorn_knopp`` update order.

    Reproduces ``ot.bregman.sinkhorn(a, b, cost, reg, numItermax=num_iters)`` (uniform
    ``a``, ``b``): ``K = exp(-cost / reg)``, start ``u = 1/n``, then per iteration
    ``v = b / (K^T u)`` followed by ``u = a / (K v)``. POT's convergence test (every 10th
    iteration, threshold 1e-9) and its numerical-error early exit are not reproduced: both
    need a host sync; neither triggers for cosine costs in float64 with reg >= 1/100.
    Differentiable (gradients flow into ``cost`` and ``reg``).

    Args:
        cost: (..., n, m) cost matrix. Runs in the dtype given (the release: float64).
        reg: entropic regularisation (scalar or 0-d tensor).
        num_iters: number of Sinkhorn iterations.

    Returns:
        (..., n, m) transport plan ``diag(u) K diag(v)``.
    """
    n, m = cost.shape[-2], cost.shape[-1]
    kernel = torch.exp(cost / (-reg))
    a = 1.0 / n
    b = 1.0 / m
    kernel_p = (1.0 / a) * kernel
    u = cost.new_full(cost.shape[:-1], 1.0 / n)
    v = cost.new_full(cost.shape[:-2] + (m,), 1.0 / m)
    for _ in range(num_iters):
        v = b / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        u = 1.0 / (kernel_p @ v.unsqueeze(-1)).squeeze(-1)
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


def sinkhorn_log(
    cost: torch.Tensor, reg: torch.Tensor | float, num_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn with the same update order as :func:`sinkhorn_pot`.

    Exact in float32 for any ``reg`` (no ``exp(-cost/reg)`` underflow). In exact arithmetic
    the plan equals :func:`sinkhorn_pot`'s after the same number of iterations.

    Args:
        cost: (..., n, m) cost matrix.
        reg: entropic regularisation.
        num_iters: number of iterations (v then u, as POT).

    Returns:
        ``(log_kernel, log_v)`` with shapes (..., n, m) and (..., m): the plan is
        ``exp(log_u_i + log_kernel_ij + log_v_j)``; its row-normalised form, which is all
        S-CLIP uses, is ``softmax(log_kernel + log_v, dim=-1)`` (``u`` cancels).
    """
    n, m = cost.shape[-2], cost.shape[-1]
    log_kernel = cost / (-reg)
    log_a = -math.log(n)
    log_b = -math.log(m)
    log_kernel_t = log_kernel.transpose(-1, -2).contiguous()  # both reductions contiguous
    log_u = cost.new_full(cost.shape[:-1], log_a)
    log_v = cost.new_zeros(cost.shape[:-2] + (m,))
    for _ in range(num_iters):
        log_v = log_b - _logsumexp_owned(log_kernel_t + log_u.unsqueeze(-2))
        log_u = log_a - _logsumexp_owned(log_kernel + log_v.unsqueeze(-2))
    return log_kernel, log_v


def _logsumexp_owned(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp(x, dim=-1)`` for a temporary ``x`` this module owns (may be overwritten).

    The stabiliser is detached (it cancels in value and gradient). Without autograd the
    work is done in place: about 8x faster than ``torch.logsumexp`` on CPU for 512 x 512.
    """
    m = x.detach().amax(dim=-1, keepdim=True)
    if x.requires_grad:
        return (x - m).exp().sum(dim=-1).log() + m.squeeze(-1)
    return x.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))


def ot_assign(
    query: torch.Tensor,
    support: torch.Tensor,
    reg: torch.Tensor | float,
    num_iters: int = 10,
    solver: str = "log",
) -> torch.Tensor:
    """Caption-level pseudo-labels by entropic optimal transport (S-CLIP, eq. of Sec. 3.1).

    Cost ``C = 1 - query @ support^T``; uniform marginals; the plan's rows renormalised to
    sum to one.

    Args:
        query: (B_u, D) L2-normalised unpaired image features.
        support: (B_p, D) L2-normalised support features (paired images or captions).
        reg: entropic regularisation (the release: ``1 / logit_scale``).
        num_iters: Sinkhorn iterations (the release: 10, not run to convergence).
        solver: ``"log"`` (log-domain, float32 or the input dtype if wider) or ``"pot"``
            (POT's multiplicative updates in float64, as released).

    Returns:
        (B_u, B_p) row-stochastic assignment ``Gamma`` in the dtype of ``support``.
    """
    if solver not in SINKHORN_SOLVERS:
        raise ValueError(f"solver must be one of {SINKHORN_SOLVERS}, got {solver!r}")
    if solver == "pot":
        cost = (1.0 - query @ support.T).double()  # as released: float cost, cast to float64
        reg_ = reg.double() if isinstance(reg, torch.Tensor) else float(reg)
        plan = sinkhorn_pot(cost, reg_, num_iters)
        gamma = plan / plan.sum(dim=-1, keepdim=True)
    else:
        dtype = torch.promote_types(query.dtype, torch.float32)
        cost = 1.0 - (query.to(dtype) @ support.to(dtype).T)
        reg_ = reg.to(dtype) if isinstance(reg, torch.Tensor) else float(reg)
        log_kernel, log_v = sinkhorn_log(cost, reg_, num_iters)
        gamma = torch.softmax(log_kernel + log_v.unsqueeze(-2), dim=-1)
    return gamma.to(support.dtype)


def soft_nn_assign(
    query: torch.Tensor, support: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Soft-PL ablation: ``softmax(s * query @ support^T)`` over the support, (B_u, B_p)."""
    return torch.softmax(logit_scale * (query @ support.T), dim=-1)


def hard_nn_assign(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Hard-PL ablation: one-hot on the most similar support item, (B_u, B_p)."""
    idx = (query @ support.T).argmax(dim=-1)
    return F.one_hot(idx, support.shape[0]).to(support.dtype)
