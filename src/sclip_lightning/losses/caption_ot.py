"""Caption-level pseudo-label loss: unpaired images learn the OT mixture of paired captions."""

from __future__ import annotations

import torch
import torch.nn as nn

from sclip_lightning.losses.functional import (
    ASSIGNERS,
    SINKHORN_SOLVERS,
    hard_nn_assign,
    ot_assign,
    soft_cross_entropy,
    soft_nn_assign,
)

SUPPORTS = ("image", "text")


def assign(
    unpaired_features: torch.Tensor,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    assigner: str = "ot",
    support: str = "image",
    sinkhorn_iters: int = 10,
    sinkhorn_reg: float | None = None,
    sinkhorn_solver: str = "pot",
    detach: bool = False,
) -> torch.Tensor:
    """Pseudo-label assignment ``Gamma`` (B_u, B_p) of unpaired images to paired captions.

    Args:
        unpaired_features: (B_u, D) L2-normalised unpaired image features (queries).
        image_features: (B_p, D) paired image features (support when ``support="image"``).
        text_features: (B_p, D) caption features (support when ``support="text"``).
        logit_scale: the scale ``s``; OT uses ``reg = 1/s`` unless ``sinkhorn_reg`` is set.
        assigner: ``"ot"`` (S-CLIP), ``"soft_nn"`` (Soft-PL) or ``"hard_nn"`` (Hard-PL).
        support: compare unpaired images to paired ``"image"`` features (S-CLIP) or to the
            ``"text"`` features of their captions. Unlike the release (whose hard/OT text
            variants silently used image features) ``"text"`` really uses the captions.
        sinkhorn_iters: Sinkhorn iterations for ``"ot"``.
        sinkhorn_reg: fixed entropic regularisation; ``None`` means ``1/s`` (release).
        sinkhorn_solver: ``"pot"`` (float64, as released; default) or ``"log"`` (float32-exact).
        detach: stop gradients through ``Gamma`` (release: False).

    Returns:
        (B_u, B_p) row-stochastic tensor.
    """
    if assigner not in ASSIGNERS:
        raise ValueError(f"assigner must be one of {ASSIGNERS}, got {assigner!r}")
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    query, keys = unpaired_features, image_features if support == "image" else text_features
    scale: torch.Tensor | float = logit_scale
    if detach:
        query, keys = query.detach(), keys.detach()
        scale = logit_scale.detach() if isinstance(logit_scale, torch.Tensor) else logit_scale
    if assigner == "ot":
        reg = 1.0 / scale if sinkhorn_reg is None else sinkhorn_reg
        gamma = ot_assign(query, keys, reg, sinkhorn_iters, sinkhorn_solver)
    elif assigner == "soft_nn":
        gamma = soft_nn_assign(query, keys, scale)
    else:
        gamma = hard_nn_assign(query, keys)
    return gamma


class CaptionOTLoss(nn.Module):
    """Caption-level pseudo-label loss (S-CLIP Sec. 3.1), usable alone.

    The target of unpaired image ``j`` is the mixture of the paired captions with weights
    ``Gamma_j`` (from :func:`assign`); the loss is the soft cross-entropy of
    ``s U Y^T`` against ``Gamma`` (unweighted: multiply by 1/2 for the paper's objective).

    Args:
        assigner: ``"ot" | "soft_nn" | "hard_nn"``.
        support: ``"image" | "text"``.
        sinkhorn_iters: >= 1.
        sinkhorn_reg: > 0 or None (= 1/s).
        sinkhorn_solver: ``"pot" | "log"``.
        detach_plan: stop gradients through the assignment.
    """

    def __init__(
        self,
        assigner: str = "ot",
        support: str = "image",
        sinkhorn_iters: int = 10,
        sinkhorn_reg: float | None = None,
        sinkhorn_solver: str = "pot",
        detach_plan: bool = False,
    ) -> None:
        super().__init__()
        if assigner not in ASSIGNERS:
            raise ValueError(f"assigner must be one of {ASSIGNERS}, got {assigner!r}")
        if support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
        if sinkhorn_solver not in SINKHORN_SOLVERS:
            raise ValueError(
                f"sinkhorn_solver must be one of {SINKHORN_SOLVERS}, got {sinkhorn_solver!r}"
            )
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        if sinkhorn_reg is not None and not sinkhorn_reg > 0:
            raise ValueError(f"sinkhorn_reg must be > 0 or None (= 1/s), got {sinkhorn_reg}")
        self.assigner = assigner
        self.support = support
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_reg = sinkhorn_reg
        self.sinkhorn_solver = sinkhorn_solver
        self.detach_plan = detach_plan

    def assign(
        self,
        unpaired_features: torch.Tensor,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """(B_u, B_p) assignment ``Gamma`` with this module's options."""
        return assign(
            unpaired_features,
            image_features,
            text_features,
            logit_scale,
            assigner=self.assigner,
            support=self.support,
            sinkhorn_iters=self.sinkhorn_iters,
            sinkhorn_reg=self.sinkhorn_reg,
            sinkhorn_solver=self.sinkhorn_solver,
            detach=self.detach_plan,
        )

    def forward(
        self,
        unpaired_features: torch.Tensor,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        plan: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Soft cross-entropy of ``s U Y^T`` against ``Gamma``.

        Args:
            unpaired_features: (B_u, D). image_features, text_features: (B_p, D).
            logit_scale: scalar ``s``.
            plan: optional precomputed (B_u, B_p) assignment.
        """
        if plan is None:
            plan = self.assign(unpaired_features, image_features, text_features, logit_scale)
        logits = logit_scale * unpaired_features @ text_features.T
        return soft_cross_entropy(logits, plan)
