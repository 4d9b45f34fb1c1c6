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


class ColumnCrossEntropy(torch.autograd.Function):
    """Cross-entropies down the columns of one logit matrix, fused (forward and backward).

    ``logits`` is ``s Y [X; U]^T`` (B_p, B_p + B_u): column ``j < B_p`` holds image ``j``'s
    logits over the captions (image->text CE, target ``j``), column ``B_p + u`` unpaired image
    ``u``'s caption logits (soft CE against ``Gamma[u]``). One column log-sum-exp serves both;
    the backward is one pass over the kept exponentials instead of two log-softmax backward
    passes over strided views. Gradients flow into the logits and into ``Gamma``.

    ``apply(logits, gamma, n_p)`` -> ``(mean image->text CE, mean caption soft CE)``;
    ``gamma`` may be None when ``logits`` has only the ``n_p`` paired columns (the second
    value is then 0).
    """

    @staticmethod
    def forward(ctx, logits, gamma, n_p: int):  # type: ignore[override]
        n_u = 0 if gamma is None else gamma.shape[0]
        if logits.shape[1] != n_p + n_u:
            raise ValueError(f"logits must have {n_p} + {n_u} columns, got {logits.shape[1]}")
        top = logits.amax(dim=0)
        expd = torch.sub(logits, top).exp_()
        colsum = expd.sum(dim=0)
        lse = colsum.log() + top
        i2t = (lse[:n_p] - logits[:, :n_p].diagonal()).mean()
        cap = logits.new_zeros(())
        gamma_sum = None
        if gamma is not None:
            block = logits[:, n_p:]  # (B_p, B_u): caption logits, transposed
            gamma_sum = gamma.sum(dim=1)  # the target mass of each unpaired image
            cap = (lse[n_p:] * gamma_sum - (gamma.T * block).sum(dim=0)).mean()
        ctx.n_p = n_p
        ctx.save_for_backward(logits, gamma, gamma_sum, expd, colsum, lse)
        return i2t, cap

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_i2t, g_cap):  # type: ignore[override]
        cols, gamma, gamma_sum, expd, colsum, lse = ctx.saved_tensors
        n_p = ctx.n_p
        coef = torch.empty_like(colsum)
        coef[:n_p] = g_i2t / n_p
        d_gamma = None
        if gamma is not None:
            n_u = gamma.shape[0]
            coef[n_p:] = gamma_sum * (g_cap / n_u)
        d_cols = expd.mul_(coef / colsum)  # softmax down each column, times its weight
        d_cols[:, :n_p].diagonal().sub_(g_i2t / n_p)
        if gamma is not None:
            d_cols[:, n_p:].sub_(gamma.T * (g_cap / n_u))
            d_gamma = (lse[n_p:, None] - cols[:, n_p:].T) * (g_cap / n_u)
        return d_cols, d_gamma, None


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


#: Largest ``(max cost - min cost) / reg`` for which :class:`SinkhornAssign`'s float64
#: backward cannot overflow (exp(700) < float64 max). Cosine costs span at most 2, so this
#: holds for ``reg >= 1/350`` (CLIP clamps ``s = 1/reg`` at 100).
FAST_BACKWARD_MAX_SPREAD = 700.0


def fast_backward_applies(reg: torch.Tensor | float | None) -> bool:
    """Whether the low-rank float64 backward is exact for this regularisation: a tensor
    ``reg = 1/s`` or None (= 1/s; CLIP clamps s at 100), or a fixed float with
    ``2 / reg <= FAST_BACKWARD_MAX_SPREAD`` (cosine costs span at most 2)."""
    return reg is None or isinstance(reg, torch.Tensor) or 2.0 / reg <= FAST_BACKWARD_MAX_SPREAD


def sinkhorn_forward(
    cost: torch.Tensor,
    reg: torch.Tensor | float,
    num_iters: int,
    solver: str,
    overwrite_cost: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Forward half of :class:`SinkhornAssign` (no autograd), shared with the fused loss.

    Returns ``(gamma, gamma64, log_u, log_v)``: the row-normalised plan in the cost's dtype,
    the same plan in float64 for ``"pot"`` (None for ``"log"``: the backward rebuilds it),
    and the potentials of every iteration, (T+1, n) and (T, m) in float64.
    ``overwrite_cost``: the caller no longer needs ``cost``; its buffer then holds
    ``gamma`` (one large allocation fewer).
    """
    n, m = cost.shape
    log_a, log_b = -math.log(n), -math.log(m)
    lus = cost.new_empty((num_iters + 1, n), dtype=torch.float64)
    lvs = cost.new_empty((num_iters, m), dtype=torch.float64)
    if solver == "pot":
        # as POT: K = exp(C / -reg) in float64 (one buffer, in place)
        kernel = cost.to(torch.float64, copy=True)
        # (times -1/reg: an in-place float64 multiply is ~3x cheaper than a divide on CPU)
        kernel.mul_(-1.0 / (reg.double() if isinstance(reg, torch.Tensor) else reg)).exp_()
        kernel_t = kernel.T  # a transposed BLAS matvec beats a transposing copy
        lus[0] = 1.0 / n
        u_rows, v_rows = lus.unbind(0), lvs.unbind(0)
        col, row = lvs.new_empty(m), lus.new_empty(n)
        for t in range(num_iters):
            torch.div(1.0 / m, torch.mv(kernel_t, u_rows[t], out=col), out=v_rows[t])
            torch.div(1.0 / n, torch.mv(kernel, v_rows[t], out=row), out=u_rows[t + 1])
        # the plan with rows renormalised: K_ij v_j / (K v_T)_i (= u_T K v_T / a); `row`
        # still holds K v_T
        gamma64 = kernel.mul_(v_rows[-1]).mul_(row.reciprocal_().unsqueeze(-1))
        lus.log_()
        lvs.log_()
        gamma = cost.copy_(gamma64) if overwrite_cost else gamma64.to(cost.dtype)
        return gamma, gamma64, lus, lvs
    log_kernel = cost.div_(-reg) if overwrite_cost else cost / (-reg)
    log_kernel_t = log_kernel.T.contiguous()  # contiguous column reductions
    lus[0] = log_a
    lu = log_kernel.new_full((n,), log_a)
    lv = log_kernel.new_zeros((m,))
    for t in range(num_iters):
        lv = log_b - _logsumexp_owned(log_kernel_t + lu)
        lu = log_a - _logsumexp_owned(log_kernel + lv)
        lvs[t] = lv
        lus[t + 1] = lu
    return torch.softmax(log_kernel.add_(lv), dim=-1), None, lus, lvs


def sinkhorn_backward(
    cost: torch.Tensor | None,
    reg: torch.Tensor | float,
    gamma64: torch.Tensor | None,
    lus: torch.Tensor,
    lvs: torch.Tensor,
    grad_gamma: torch.Tensor,
    grad_owned: bool = False,
) -> torch.Tensor:
    """Exact gradient of the unrolled iterations with respect to ``L = -C / reg``.

    See :class:`SinkhornAssign` for the derivation. ``grad_gamma`` is the gradient with
    respect to the row-normalised plan; ``gamma64`` the float64 plan (None: rebuilt from
    ``cost``, ``reg`` and the final potentials; ``cost`` is only read then). Every (n, m)
    pass runs in float64 with a single dtype (mixed float32/float64 elementwise products
    are several times slower on CPU). Returns ``dL`` (n, m) in float64; with
    ``grad_owned`` (a float64 ``grad_gamma`` the caller no longer needs) it is computed in
    ``grad_gamma``'s buffer.
    """
    n, m = grad_gamma.shape
    num_iters = lvs.shape[0]
    a, b = 1.0 / n, 1.0 / m
    if gamma64 is None:  # log solver: Gamma = exp(L + lu_T (+) lv_T) / a in float64
        assert cost is not None, "the log solver's backward rebuilds the plan from the cost"
        reg64 = reg.double() if isinstance(reg, torch.Tensor) else reg
        gamma64 = cost.to(torch.float64, copy=True).div_(-reg64)
        gamma64.add_(lvs[-1]).add_((lus[-1] - math.log(a)).unsqueeze(-1)).exp_()
    gamma = gamma64
    owned = grad_owned and grad_gamma.dtype == torch.float64
    g = grad_gamma if owned else grad_gamma.to(torch.float64, copy=True)
    # Walking the iterations backwards, each step adds one rank-1 term to
    # dL = Gamma * (g - sum_k left_k right_k^T) and costs one matrix-vector product:
    #   v-step t (v_{t+1} = b / (K^T u_t)):     left = e^{x_t - x_T},  right = w2_t
    #   u-step t (u_{t+1} = a / (K v_{t+1})):   left = w1_t,           right = e^{y_t - y_T}
    # with w2_{T-1} = (a/b) dv_T, w1_t = -e^{2(x_{t+1} - x_T)} (Gamma w2_{t+1}) and
    # w2_t = -(a/b) e^{2(y_t - y_T)} (Gamma^T w1_t) (the exp factors of the unrolled chain).
    # Rows of `left` / `right`: 0 the softmax's own term (row_dot, 1); 1 + t the v-steps;
    # T + 1 + t the u-steps (the order of a sum of rank-1 terms is free). Every factor is
    # written straight into its row: few operator calls, each costs more than its work here.
    left = gamma.new_empty(2 * num_iters, n)
    right = gamma.new_empty(2 * num_iters, m)
    left_rows, right_rows = left.unbind(0), right.unbind(0)
    gg = gamma * g
    row_dot = torch.sum(gg, dim=-1, out=left_rows[0])  # softmax backward: Gamma * (g - row_dot)
    right_rows[0].fill_(1.0)
    # w2_{T-1} = (a/b) dv_T, dv_T = colsum(Gamma * g) - Gamma^T row_dot (u_T cancels)
    torch.addmv(
        gg.sum(dim=0), gamma.T, row_dot, beta=a / b, alpha=-a / b, out=right_rows[num_iters]
    )
    del gg
    ex = torch.sub(lus[:num_iters], lus[-1], out=left[1 : num_iters + 1]).exp_()  # e^{x_t - x_T}
    ey = torch.sub(lvs[:-1], lvs[-1], out=right[num_iters + 1 :]).exp_()  # e^{y_t - y_T}, t < T-1
    neg_ex2 = ex[1:].square().neg_()  # row t: -e^{2(x_{t+1} - x_T)}
    neg_ey2 = ey.square().mul_(-a / b)  # row t: -(a/b) e^{2(y_t - y_T)}
    ex2_rows, ey2_rows = neg_ex2.unbind(0), neg_ey2.unbind(0)
    gamma_t = gamma.T
    col = gamma.new_empty(n)
    row = gamma.new_empty(m)
    for t in range(num_iters - 2, -1, -1):
        w1 = left_rows[num_iters + 1 + t]
        torch.mul(torch.mv(gamma, right_rows[t + 2], out=col), ex2_rows[t], out=w1)
        torch.mul(torch.mv(gamma_t, w1, out=row), ey2_rows[t], out=right_rows[t + 1])
    return g.addmm_(left.T, right, alpha=-1.0).mul_(gamma)  # in g's buffer: no new pages


class SinkhornAssign(torch.autograd.Function):
    """Row-normalised Sinkhorn plan ``Gamma`` for a cost ``C`` and regularisation ``reg``.

    Same iterates as :func:`sinkhorn_pot` / :func:`sinkhorn_log` (uniform marginals, POT's
    order: ``v`` then ``u``, starting from ``u = 1/n``), and the *exact* gradient of the
    unrolled iterations (into ``C`` and ``reg``), but without storing or recomputing one
    (n, m) matrix per iteration: every matrix the unrolled backward touches is
    ``exp(L + x_t (+) y_t)`` with ``L = -C/reg`` and potentials ``x_t, y_t`` saved in the
    forward (vectors), i.e. ``Gamma`` rescaled by ``diag(exp(x_t - x_T))`` and
    ``diag(exp(y_t - y_T))``. The backward therefore runs 2T - 1 matrix-vector products with
    ``Gamma`` and one rank-2T update ``dL = Gamma * (g - A B^T)`` in float64, instead
    of back-propagating 2T exp/log-sum-exp passes.

    Forward solvers: ``"pot"`` multiplicative updates in float64 (the release);
    ``"log"`` log-domain updates in the cost's dtype (exact in float32 for any reg).
    The backward's float64 factors cannot overflow while ``spread(C) / reg <=
    FAST_BACKWARD_MAX_SPREAD``; :func:`ot_assign` falls back to plain autograd beyond.

    ``apply(cost, reg, num_iters, solver)``: cost (n, m) with n, m >= 1; reg a 0-d tensor
    or a float. Returns (n, m) ``Gamma`` in the cost's dtype.
    """

    @staticmethod
    def forward(ctx, cost, reg, num_iters: int, solver: str):  # type: ignore[override]
        gamma, gamma64, lus, lvs = sinkhorn_forward(cost, reg, num_iters, solver)
        ctx.save_for_backward(cost, reg if isinstance(reg, torch.Tensor) else None, gamma64)
        ctx.reg = reg
        ctx.potentials = (lus, lvs)
        return gamma

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gamma: torch.Tensor):  # type: ignore[override]
        cost, reg_t, gamma64 = ctx.saved_tensors
        lus, lvs = ctx.potentials
        reg = ctx.reg if reg_t is None else reg_t.double()
        d_log_kernel = sinkhorn_backward(cost, reg, gamma64, lus, lvs, grad_gamma)
        d_reg = None
        if reg_t is not None and ctx.needs_input_grad[1]:  # L = -C / reg
            d_reg = (torch.dot(d_log_kernel.reshape(-1), cost.double().reshape(-1)) / reg**2).to(
                reg_t.dtype
            )
        d_cost = d_log_kernel.div_(-reg).to(cost.dtype) if ctx.needs_input_grad[0] else None
        return d_cost, d_reg, None, None


def ot_assign(
    query: torch.Tensor,
    support: torch.Tensor,
    reg: torch.Tensor | float,
    num_iters: int = 10,
    solver: str = "log",
) -> torch.Tensor:
    """Caption-level pseudo-labels by entropic optimal transport (S-CLIP, eq. of Sec. 3.1).

    Cost ``C = 1 - query @ support^T``; uniform marginals; the plan's rows renormalised to
    sum to one. Gradients flow through the unrolled iterations into both features and
    ``reg`` (the release's behaviour), via :class:`SinkhornAssign`'s low-rank backward
    when ``2 / reg <= FAST_BACKWARD_MAX_SPREAD`` (always for a tensor ``reg = 1/s``: keep
    ``s <= 350``; CLIP clamps it at 100) and plain autograd otherwise.

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
    dtype = torch.promote_types(query.dtype, torch.float32)
    cost = 1.0 - (query.to(dtype) @ support.to(dtype).T)  # the release: float32 cost
    if fast_backward_applies(reg) and cost.numel() > 0:
        reg_ = reg.to(dtype) if isinstance(reg, torch.Tensor) else float(reg)
        gamma = SinkhornAssign.apply(cost, reg_, num_iters, solver)
    elif solver == "pot":
        reg_ = reg.double() if isinstance(reg, torch.Tensor) else float(reg)
        plan = sinkhorn_pot(cost.double(), reg_, num_iters)
        gamma = plan / plan.sum(dim=-1, keepdim=True)
    else:
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
