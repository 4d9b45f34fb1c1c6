"""The combined S-CLIP objective, and its presets."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from sclip_lightning import distributed
from sclip_lightning.losses.assigners import build_assigner
from sclip_lightning.losses.bank import SupportBank
from sclip_lightning.losses.caption_ot import CaptionOTLoss
from sclip_lightning.losses.contrastive import ContrastiveLoss
from sclip_lightning.losses.keyword_pll import KeywordPLLLoss


@dataclass
class Assignment:
    """The plan of the last :class:`SCLIPLoss` call (what training used), for diagnostics.

    Attributes:
        plan: (B_u, S) detached plan (global batch under DDP gathering).
        support_labels: (S,) hidden labels of the support rows (-1 unknown), or None.
        support_mask: (S,) bool valid support rows, or None (all valid).
    """

    plan: torch.Tensor
    support_labels: torch.Tensor | None
    support_mask: torch.Tensor | None


class SCLIPLoss(nn.Module):
    """S-CLIP objective: contrastive + caption-level pseudo-labels + keyword-level PLL.

    ``total = contrastive_weight * L_clip + caption_weight * L_caption + keyword_weight * L_kw``
    (paper: 1, 1/2, 1/2). Every feature is L2-normalised; ``logit_scale`` is ``s`` itself.
    The terms are computed in float32 (the Sinkhorn in float64 with the ``pot`` solver) with
    autocast disabled, so they are safe under fp16/bf16 mixed precision. Each term is the one
    implementation in its file: :func:`~sclip_lightning.losses.contrastive.contrastive_loss`,
    :func:`~sclip_lightning.losses.caption_ot.caption_loss`,
    :func:`~sclip_lightning.losses.keyword_pll.keyword_loss`; the plan comes from
    :attr:`assigner` through :meth:`assign`. Reference: Mo et al., "S-CLIP: Semi-supervised
    Vision-Language Pre-training using Few Specialist Captions", NeurIPS 2023.

    The signature's defaults are the ``recommended`` preset (:data:`RECOMMENDED`);
    :meth:`as_released` builds the authors' release (:data:`RELEASED`).

    Args:
        contrastive_weight, caption_weight, keyword_weight: >= 0 loss weights.
        assigner: ``"ot"`` (S-CLIP), ``"unbalanced_ot"``, ``"soft_nn"`` (Soft-PL),
            ``"hard_nn"`` (Hard-PL), an import path of an
            :class:`~sclip_lightning.losses.Assigner` subclass, or an instance.
        assigner_support: match unpaired images to the support's ``"image"`` or ``"text"``
            features.
        sinkhorn_iters: Sinkhorn iterations (release 10).
        sinkhorn_reg: entropic regularisation; None = ``1/s`` (release).
        sinkhorn_solver: ``"pot"`` (release: POT's updates in float64, exact for
            ``reg >= 1/350``) or ``"log"`` (log domain, exact in float32 for any reg).
        detach_plan: stop gradients through the plan (release: False).
        keyword_weighting: ``"linear"`` (release ``sim/sum(sim)``) or ``"softmax"``.
        keyword_empty_rows_in_mean: count unpaired images without keyword candidates in the
            keyword-loss mean (release: True).
        unpaired_negatives: unpaired images as extra text->image candidates (release: True).
        support_bank_size: paired features kept across steps as extra OT/NN support
            (:class:`~sclip_lightning.losses.SupportBank`): 0 off (release), N > 0 the last
            N pairs, -1 one slot per paired image (needs ``paired_ids``).
        assigner_kwargs: extra constructor arguments of the assigner (``{"reg_m": 0.1}``).
        gather_distributed: all-gather features (with gradients), keyword candidates and ids
            across ranks, so every term runs over the global batch (the OT support too).

    Shapes (forward):
        image_features (B_p, D), text_features (B_p, D), logit_scale scalar,
        unpaired_features (B_u, D), keyword_features (K, D), keyword_candidates (B_p, K) bool,
        paired_ids (B_p,) long, paired_labels (B_p,) long (diagnostics only).

    Returns:
        ``{"contrastive_loss", "caption_loss", "keyword_loss"}``, each already weighted;
        missing inputs give a zero term. With ``output_dict=False`` their sum.
    """

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        caption_weight: float = 0.5,
        keyword_weight: float = 0.5,
        assigner: str | nn.Module = "ot",
        assigner_support: str = "image",
        sinkhorn_iters: int = 10,
        sinkhorn_reg: float | None = None,
        sinkhorn_solver: str = "pot",
        detach_plan: bool = False,
        keyword_weighting: str = "softmax",
        keyword_empty_rows_in_mean: bool = True,
        unpaired_negatives: bool = True,
        support_bank_size: int = 0,
        assigner_kwargs: dict[str, Any] | None = None,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        for name, w in (
            ("contrastive_weight", contrastive_weight),
            ("caption_weight", caption_weight),
            ("keyword_weight", keyword_weight),
        ):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        self.contrastive_weight = float(contrastive_weight)
        self.caption_weight = float(caption_weight)
        self.keyword_weight = float(keyword_weight)
        self.unpaired_negatives = unpaired_negatives
        self.gather_distributed = gather_distributed
        self.assigner = build_assigner(
            assigner,
            {
                "assigner_support": assigner_support,
                "sinkhorn_iters": sinkhorn_iters,
                "sinkhorn_reg": sinkhorn_reg,
                "sinkhorn_solver": sinkhorn_solver,
                "detach_plan": detach_plan,
                **(assigner_kwargs or {}),
            },
        )
        self.contrastive = ContrastiveLoss(unpaired_negatives)
        self.caption = CaptionOTLoss()
        self.keyword = KeywordPLLLoss(keyword_weighting, keyword_empty_rows_in_mean)
        # only an enabled bank is a submodule: its checkpoint entry is a dict, not a tensor
        self.bank = SupportBank(support_bank_size) if support_bank_size != 0 else None
        self.last_assignment: Assignment | None = None

    @classmethod
    def from_preset(cls, name: str = "recommended", **overrides: Any) -> SCLIPLoss:
        """Build from ``"released"`` or ``"recommended"``, overriding single options."""
        return cls(**preset_options(name, overrides))

    @classmethod
    def as_released(cls, **overrides: Any) -> SCLIPLoss:
        """The configuration that reproduces the authors' release (see ``RELEASED``)."""
        return cls.from_preset("released", **overrides)

    @property
    def uses_unpaired(self) -> bool:
        """Whether any term reads the unpaired images."""
        return self.unpaired_negatives or self.caption_weight > 0 or self.keyword_weight > 0

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        unpaired_features: torch.Tensor | None = None,
        keyword_features: torch.Tensor | None = None,
        keyword_candidates: torch.Tensor | None = None,
        paired_ids: torch.Tensor | None = None,
        paired_labels: torch.Tensor | None = None,
        output_dict: bool = True,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        _check_shapes(
            image_features,
            text_features,
            unpaired_features,
            keyword_features,
            keyword_candidates,
            paired_ids,
        )
        device = image_features.device
        with torch.autocast(device_type=device.type, enabled=False):
            losses = self._losses(
                image_features.float(),
                text_features.float(),
                torch.as_tensor(logit_scale, device=device).float(),
                None if unpaired_features is None else unpaired_features.float(),
                None if keyword_features is None else keyword_features.float(),
                None if keyword_candidates is None else keyword_candidates.bool(),
                paired_ids,
                paired_labels,
            )
        return losses if output_dict else sum(losses.values())  # type: ignore[return-value]

    def _losses(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        unpaired: torch.Tensor | None,
        keywords: torch.Tensor | None,
        candidates: torch.Tensor | None,
        ids: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if self.gather_distributed:
            image = distributed.gather_with_grad(image)
            text = distributed.gather_with_grad(text)
            if unpaired is not None:
                unpaired = distributed.gather_with_grad(unpaired)
            candidates, ids, labels = (
                None if t is None else distributed.gather_no_grad(t)
                for t in (candidates, ids, labels)
            )
        has_unpaired = unpaired is not None and unpaired.shape[0] > 0
        contrastive = self.contrastive(
            image, text, scale, unpaired if has_unpaired and self.unpaired_negatives else None
        )
        zero = scale * 0.0
        out = {
            "contrastive_loss": self.contrastive_weight * contrastive,
            "caption_loss": zero,
            "keyword_loss": zero,
        }
        use_keywords = (
            self.keyword_weight > 0
            and keywords is not None
            and candidates is not None
            and keywords.shape[0] > 0
        )
        self.last_assignment = None
        if has_unpaired and (self.caption_weight > 0 or use_keywords):
            assert unpaired is not None
            s_image, s_text, s_cand, mask, s_labels = (
                (image, text, candidates, None, labels)
                if self.bank is None
                else self.bank.support(image, text, candidates, ids, labels)
            )
            plan = self.assign(unpaired, s_image, s_text, scale, mask)
            if self.caption_weight > 0:
                out["caption_loss"] = self.caption_weight * self.caption(
                    unpaired, s_text, scale, plan, mask
                )
            if use_keywords:
                assert keywords is not None and s_cand is not None
                out["keyword_loss"] = self.keyword_weight * self.keyword(
                    unpaired, keywords, s_cand, plan, scale
                )
            self.last_assignment = Assignment(plan.detach(), s_labels, mask)
        if self.bank is not None and self.training:
            self.bank.push(image.detach(), text.detach(), candidates, ids, labels)
        return out

    def assign(
        self,
        unpaired: torch.Tensor,
        support_image: torch.Tensor,
        support_text: torch.Tensor,
        logit_scale: torch.Tensor,
        support_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (B_u, S) plan from :attr:`assigner` (the one place training gets it from).

        An assigner whose ``forward`` takes no ``support_mask`` still works with the support
        bank: its plan is zeroed on masked rows and renormalised.
        """
        if support_mask is None:
            plan = self.assigner(unpaired, support_image, support_text, logit_scale)
        elif _takes_mask(type(self.assigner)):  # type: ignore[arg-type]
            plan = self.assigner(
                unpaired, support_image, support_text, logit_scale, support_mask=support_mask
            )
        else:
            plan = self.assigner(unpaired, support_image, support_text, logit_scale)
            plan = plan * support_mask
            plan = plan / plan.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
        expected = (unpaired.shape[0], support_image.shape[0])
        if tuple(plan.shape) != expected:
            raise ValueError(
                f"{type(self.assigner).__name__} returned a plan of shape {tuple(plan.shape)}; "
                f"expected (B_u, S) = {expected}"
            )
        return plan


@functools.cache
def _takes_mask(cls: Any) -> bool:
    params = inspect.signature(cls.forward).parameters
    return "support_mask" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def _check_shapes(
    image: torch.Tensor,
    text: torch.Tensor,
    unpaired: torch.Tensor | None,
    keywords: torch.Tensor | None,
    candidates: torch.Tensor | None,
    ids: torch.Tensor | None,
) -> None:
    if image.ndim != 2 or text.shape != image.shape:
        raise ValueError(
            "image_features and text_features must both be (B_p, D); got "
            f"{tuple(image.shape)} and {tuple(text.shape)}"
        )
    dim = image.shape[1]
    if unpaired is not None and (unpaired.ndim != 2 or unpaired.shape[1] != dim):
        raise ValueError(f"unpaired_features must be (B_u, {dim}); got {tuple(unpaired.shape)}")
    if keywords is not None and (keywords.ndim != 2 or keywords.shape[1] != dim):
        raise ValueError(f"keyword_features must be (K, {dim}); got {tuple(keywords.shape)}")
    if candidates is not None:
        k = keywords.shape[0] if keywords is not None else candidates.shape[-1]
        if candidates.shape != (image.shape[0], k):
            raise ValueError(
                f"keyword_candidates must be (B_p, K) = ({image.shape[0]}, {k}); "
                f"got {tuple(candidates.shape)}"
            )
    if ids is not None and ids.shape != (image.shape[0],):
        raise ValueError(f"paired_ids must be (B_p,) = ({image.shape[0]},); got {tuple(ids.shape)}")


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A named set of :class:`SCLIPLoss` options (see ``docs/method.md``)."""

    name: str
    options: dict[str, Any]


#: The options that define the objective (the module exposes each under the same name).
OBJECTIVE_OPTIONS = (
    "contrastive_weight",
    "caption_weight",
    "keyword_weight",
    "assigner",
    "assigner_support",
    "sinkhorn_iters",
    "sinkhorn_reg",
    "sinkhorn_solver",
    "detach_plan",
    "keyword_weighting",
    "keyword_empty_rows_in_mean",
    "unpaired_negatives",
    "support_bank_size",
)

_SIGNATURE = inspect.signature(SCLIPLoss.__init__).parameters

#: This project's default, read off :class:`SCLIPLoss`'s signature (the one place defaults
#: live): the release's objective with bounded keyword weights (a softmax over the
#: candidates instead of sim / sum(sim), which explodes when similarities have mixed signs).
RECOMMENDED = Preset("recommended", {k: _SIGNATURE[k].default for k in OBJECTIVE_OPTIONS})

#: The authors' release (alinlab/s-clip), option by option.
RELEASED = Preset("released", dict(RECOMMENDED.options, keyword_weighting="linear"))

PRESETS = {p.name: p for p in (RELEASED, RECOMMENDED)}


def preset_options(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options of preset ``name`` with ``overrides`` applied (None values kept out)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    opts = dict(PRESETS[name].options)
    opts.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return opts
