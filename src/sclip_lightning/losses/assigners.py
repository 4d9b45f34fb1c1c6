"""Pseudo-label assigners: which paired captions each unpaired image is taught.

An assigner maps the unpaired (query) features and the support (the paired images and
their captions, and the support bank's rows when it is on) to a plan ``Gamma`` of shape
(B_u, S) whose rows sum to 1. S-CLIP's caption loss teaches unpaired image ``j`` the mixture
of support captions with weights ``Gamma_j``; its keyword loss takes the candidate keywords of
the support caption with the largest weight. The plan carries whatever gradient the assigner
defines (the release's OT plan is not detached).

Built in: :class:`OTAssigner` (S-CLIP's balanced entropic OT, the default),
:class:`UnbalancedOTAssigner` (the support marginal relaxed by a KL penalty, POT),
:class:`SoftNNAssigner` (the paper's Soft-PL ablation), :class:`HardNNAssigner` (Hard-PL).

Write your own by subclassing :class:`Assigner` and overriding :meth:`Assigner.plan`; give
an instance to :class:`~sclip_lightning.losses.SCLIPLoss` (``assigner=``), or its class path
in YAML (``assigner: {class_path: mypkg.MyAssigner, init_args: {...}}``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sclip_lightning.losses.component import Component, check_choice
from sclip_lightning.losses.sinkhorn import SinkhornSolver, sinkhorn_plan

Support = Literal["image", "text"]


class Assigner(Component):
    """Base class: (unpaired, support) features -> row-stochastic plan (B_u, S).

    Args:
        assigner_support: compare unpaired images with the support's ``"image"`` features
            (S-CLIP) or with its captions' ``"text"`` features. (The release's text variants
            silently used image features; here ``"text"`` really uses the captions.)
        detach_plan: stop gradients through the plan (the release: False).
    """

    #: whether :meth:`plan` gives masked support rows no weight itself; False: :meth:`forward`
    #: zeroes them and renormalises the rows (set True in an assigner that handles the mask)
    handles_mask: bool = False

    def __init__(self, assigner_support: Support = "image", detach_plan: bool = False) -> None:
        super().__init__()
        check_choice("assigner_support", assigner_support, Support)
        self.assigner_support = assigner_support
        self.detach_plan = bool(detach_plan)

    def forward(
        self,
        unpaired: torch.Tensor,
        support_image: torch.Tensor,
        support_text: torch.Tensor,
        logit_scale: torch.Tensor,
        support_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The plan ``Gamma``.

        Args:
            unpaired: (B_u, D) L2-normalised unpaired image features (the queries).
            support_image: (S, D) support image features.
            support_text: (S, D) the support captions' features.
            logit_scale: the scale ``s`` (0-d tensor).
            support_mask: optional (S,) bool, False for support rows that must receive no
                weight (empty or duplicate support-bank slots). None: every row counts.

        Returns:
            (B_u, S) plan, rows summing to 1, zero where ``support_mask`` is False.
        """
        support = support_image if self.assigner_support == "image" else support_text
        if self.detach_plan:
            unpaired, support, logit_scale = (
                unpaired.detach(),
                support.detach(),
                logit_scale.detach(),
            )
        plan = self.plan(unpaired, support, logit_scale, support_mask)
        if support_mask is None or self.handles_mask:
            return plan
        plan = plan * support_mask  # a plan that ignored the mask: masked rows get nothing
        return plan / plan.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)

    def plan(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        logit_scale: torch.Tensor,
        support_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B_u, S) plan of ``query`` (B_u, D) over ``support`` (S, D); see :meth:`forward`."""
        raise NotImplementedError(f"{type(self).__name__} must override plan() or forward()")


def _masked(scores: torch.Tensor, support_mask: torch.Tensor | None) -> torch.Tensor:
    return scores if support_mask is None else scores.masked_fill(~support_mask, -math.inf)


def _column_mass(support_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Uniform mass over the valid support rows (no host sync: the count stays on device)."""
    if support_mask is None:
        return None
    mass = support_mask.to(dtype)
    return mass / mass.sum()


class EntropicAssigner(Assigner):
    """Base of the entropic OT assigners: the Sinkhorn iterations and regularisation.

    Args:
        sinkhorn_iters: iterations (release 10: not run to convergence), >= 1.
        sinkhorn_reg: fixed entropic regularisation > 0, or None for ``1/s`` (release).
        **kwargs: :class:`Assigner`'s options (``assigner_support``, ``detach_plan``).
    """

    handles_mask = True

    def __init__(
        self, sinkhorn_iters: int = 10, sinkhorn_reg: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        if sinkhorn_reg is not None and not sinkhorn_reg > 0:
            raise ValueError(f"sinkhorn_reg must be > 0 or None (= 1/s), got {sinkhorn_reg}")
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.sinkhorn_reg = sinkhorn_reg

    def regularisation(self, logit_scale: torch.Tensor) -> torch.Tensor | float:
        """``reg``: the fixed value, or ``1/s``."""
        return 1.0 / logit_scale if self.sinkhorn_reg is None else self.sinkhorn_reg


class OTAssigner(EntropicAssigner):
    """S-CLIP's caption-level assignment: balanced entropic optimal transport.

    Cost ``C = 1 - U S^T`` (cosine), uniform marginals, ``reg = 1/s``, 10 Sinkhorn iterations
    (not run to convergence), the plan's rows renormalised; gradients through the unrolled
    iterations into the features and ``s`` (as the release, unless ``detach_plan``).

    Args:
        sinkhorn_solver: ``"pot"`` (the release: POT's multiplicative updates in float64,
            exact for ``reg >= 1/350``) or ``"log"`` (log domain, exact in float32 for any reg).
        **kwargs: :class:`EntropicAssigner`'s and :class:`Assigner`'s options.
    """

    def __init__(self, sinkhorn_solver: SinkhornSolver = "pot", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("sinkhorn_solver", sinkhorn_solver, SinkhornSolver)
        self.sinkhorn_solver = sinkhorn_solver

    def plan(self, query, support, logit_scale, support_mask):
        cost = 1.0 - query @ support.T  # the release: float32 cost
        mass = _column_mass(support_mask, torch.float64)
        return sinkhorn_plan(
            cost, self.regularisation(logit_scale), self.sinkhorn_iters, self.sinkhorn_solver, mass
        )


class UnbalancedOTAssigner(EntropicAssigner):
    """Entropic OT with the support-side marginal relaxed (POT, unbalanced Sinkhorn).

    Every unpaired image still sends mass ``1/B_u`` (hard query marginal), but the support
    items need not receive equal mass: the penalty ``reg_m * KL(Gamma^T 1 | b)`` replaces the
    equality. ``reg_m -> inf`` gives the balanced plan of :class:`OTAssigner`; ``reg_m -> 0``
    gives ``softmax(-C / reg)``, i.e. :class:`SoftNNAssigner`. Useful when the paired support
    is small and its classes are skewed against the unpaired batch, where the balanced plan
    must send images to captions of other classes.

    Runs ``ot.unbalanced.sinkhorn_unbalanced`` (``method="sinkhorn"``, reference measure all
    ones so the kernel is ``exp(-C/reg)`` as in the balanced case) with POT's torch backend on
    the training device, in float64, with gradients through its iterations. POT checks for
    numerical errors after every iteration (a host sync each on a GPU); ``stopThr=0`` keeps
    the iteration count fixed.

    Args:
        reg_m: KL penalty on the support marginal, > 0.
        **kwargs: :class:`EntropicAssigner`'s and :class:`Assigner`'s options.
    """

    def __init__(self, reg_m: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not reg_m > 0:
            raise ValueError(f"reg_m must be > 0, got {reg_m}")
        self.reg_m = float(reg_m)

    def plan(self, query, support, logit_scale, support_mask):
        import ot

        cost = (1.0 - query @ support.T).double()
        n, m = cost.shape
        a = cost.new_full((n,), 1.0 / n)
        b = _column_mass(support_mask, torch.float64)
        if b is None:
            b = cost.new_full((m,), 1.0 / m)
        else:  # v = (b / K^T u)^f has an infinite derivative at b = 0 (NaN gradients):
            # masked rows get the smallest float64 mass instead and are zeroed below
            b = b.clamp_min(torch.finfo(torch.float64).tiny)
        reg = self.regularisation(logit_scale)
        reg = reg.double() if isinstance(reg, torch.Tensor) else reg
        plan = ot.unbalanced.sinkhorn_unbalanced(
            a,
            b,
            cost,
            reg,
            (math.inf, self.reg_m),
            method="sinkhorn",
            c=torch.ones_like(cost),
            numItermax=self.sinkhorn_iters,
            stopThr=0.0,
        )
        if support_mask is not None:
            plan = plan * support_mask
        return (plan / plan.sum(dim=-1, keepdim=True)).to(query.dtype)


class SoftNNAssigner(Assigner):
    """Soft-PL (the paper's ablation): ``softmax(s * U S^T)`` over the support."""

    handles_mask = True

    def plan(self, query, support, logit_scale, support_mask):
        return torch.softmax(_masked(logit_scale * (query @ support.T), support_mask), dim=-1)


class HardNNAssigner(Assigner):
    """Hard-PL (the paper's ablation): one-hot on the most similar support item (no gradient)."""

    handles_mask = True

    def plan(self, query, support, logit_scale, support_mask):
        nearest = _masked(query @ support.T, support_mask).argmax(dim=-1)
        return F.one_hot(nearest, support.shape[0]).to(query.dtype)


def assign(
    unpaired_features: torch.Tensor,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    assigner: Assigner | None = None,
) -> torch.Tensor:
    """One-call form: the (B_u, B_p) plan of ``assigner`` (default :class:`OTAssigner`) of
    unpaired features (B_u, D) over a paired support (B_p, D) at scale ``logit_scale``."""
    scale = torch.as_tensor(logit_scale, dtype=unpaired_features.dtype)
    module = assigner if assigner is not None else OTAssigner()
    return module(
        unpaired_features, image_features, text_features, scale.to(unpaired_features.device)
    )
