"""The balanced entropic OT solver of S-CLIP's caption pseudo-labels (plain autograd).

Two forms of the same iterations (POT's ``sinkhorn_knopp`` update order: ``v`` first, then
``u``, starting from ``u = 1/n``), both differentiable by autograd through the unrolled
iterations, as the authors' release back-propagates through POT:

- :func:`sinkhorn_pot`: multiplicative updates, run in the dtype given (the release: float64).
  Exact while ``exp(-C / reg)`` does not underflow: for cosine costs (spread <= 2) and float64
  that is ``reg >= 1/350``, and CLIP clamps ``s = 1 / reg`` at 100.
- :func:`sinkhorn_log`: the same iterations on log-potentials, exact in float32 for any reg.

Why not ``ot.sinkhorn`` itself: POT's loop checks for numerical errors after every iteration
and for convergence every tenth (``if nx.any(...)``, ``if err < stopThr``), each a
device-to-host synchronisation on a GPU; the release's numbers come from exactly these
updates, so the project runs them in batched torch ops on the training device and tests
them against the POT call (``tests/losses/test_losses.py``). POT itself is used where it is
the field's tool: the unbalanced assigner (:class:`~sclip_lightning.losses.UnbalancedOTAssigner`).

Masses: ``a`` is uniform over the ``n`` queries; ``b`` is uniform over the ``m`` support items,
or given (``col_mass``, summing to 1; zero entries are support items that receive nothing:
the support bank's empty or duplicate slots).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from sclip_lightning.losses.component import check_choice

SinkhornSolver = Literal["pot", "log"]


def _col_mass(cost: torch.Tensor, col_mass: torch.Tensor | None) -> torch.Tensor | float:
    return 1.0 / cost.shape[-1] if col_mass is None else col_mass.to(cost.dtype)


def sinkhorn_pot(
    cost: torch.Tensor,
    reg: torch.Tensor | float,
    num_iters: int,
    col_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropic OT plan, POT's ``sinkhorn_knopp`` updates.

    Reproduces ``ot.bregman.sinkhorn(a, b, cost, reg, numItermax=num_iters)`` with uniform
    ``a``: ``K = exp(-cost / reg)``, ``u = 1/n``, then per iteration ``v = b / (K^T u)``
    followed by ``u = a / (K v)``. POT's convergence test and numerical-error exit are not
    reproduced (both need host syncs; neither triggers in 10 float64 iterations on cosine
    costs with reg >= 1/100).

    Args:
        cost: (n, m) cost matrix; the iterations run in its dtype (the release: float64).
        reg: entropic regularisation (float or 0-d tensor; gradients flow into it).
        num_iters: Sinkhorn iterations.
        col_mass: optional (m,) support masses ``b`` (default uniform ``1/m``).

    Returns:
        (n, m) transport plan ``diag(u) K diag(v)``.
    """
    n = cost.shape[-2]
    b = _col_mass(cost, col_mass)
    kernel = torch.exp(cost / (-reg))
    kernel_p = (1.0 / (1.0 / n)) * kernel  # POT's K / a, a = 1/n
    u = cost.new_full((n,), 1.0 / n)
    v = cost.new_full((cost.shape[-1],), 1.0 / cost.shape[-1])
    for _ in range(num_iters):
        v = b / (kernel.T @ u)
        u = 1.0 / (kernel_p @ v)
    return u[:, None] * kernel * v[None, :]


def sinkhorn_log(
    cost: torch.Tensor,
    reg: torch.Tensor | float,
    num_iters: int,
    col_mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain form of :func:`sinkhorn_pot` (same iterates in exact arithmetic).

    Args:
        cost: (n, m) cost matrix. reg, num_iters, col_mass: as :func:`sinkhorn_pot`.

    Returns:
        ``(log_kernel, log_v)``, (n, m) and (m,): the plan is
        ``exp(log_u_i + log_kernel_ij + log_v_j)``; its row-normalised form (all S-CLIP
        uses) is ``softmax(log_kernel + log_v, dim=-1)`` (``u`` cancels).
    """
    n = cost.shape[-2]
    b = _col_mass(cost, col_mass)
    log_b = torch.log(b) if isinstance(b, torch.Tensor) else math.log(b)
    log_a = -math.log(n)
    log_kernel = cost / (-reg)
    log_u = cost.new_full((n,), log_a)
    log_v = cost.new_zeros((cost.shape[-1],))
    for _ in range(num_iters):
        log_v = log_b - torch.logsumexp(log_kernel + log_u[:, None], dim=0)
        log_u = log_a - torch.logsumexp(log_kernel + log_v[None, :], dim=1)
    return log_kernel, log_v


def sinkhorn_plan(
    cost: torch.Tensor,
    reg: torch.Tensor | float,
    num_iters: int = 10,
    solver: str = "pot",
    col_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row-normalised Sinkhorn plan ``Gamma`` (rows sum to 1), in the cost's dtype.

    ``solver="pot"`` runs :func:`sinkhorn_pot` in float64 (the release); ``"log"`` runs
    :func:`sinkhorn_log` in the cost's dtype (float32 at least).
    """
    check_choice("sinkhorn_solver", solver, SinkhornSolver)
    if solver == "pot":
        reg64 = reg.double() if isinstance(reg, torch.Tensor) else float(reg)
        mass = None if col_mass is None else col_mass.double()
        plan = sinkhorn_pot(cost.double(), reg64, num_iters, mass)
        return (plan / plan.sum(dim=-1, keepdim=True)).to(cost.dtype)
    log_kernel, log_v = sinkhorn_log(cost, reg, num_iters, col_mass)
    return torch.softmax(log_kernel + log_v[None, :], dim=-1)
