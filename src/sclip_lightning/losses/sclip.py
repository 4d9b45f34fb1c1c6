"""The combined S-CLIP objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sclip_lightning import distributed
from sclip_lightning.losses.caption_ot import CaptionOTLoss
from sclip_lightning.losses.core import CoreOptions, SCLIPCore
from sclip_lightning.losses.functional import ColumnCrossEntropy, fast_backward_applies
from sclip_lightning.losses.keyword_pll import KeywordPLLLoss


@dataclass(frozen=True)
class Preset:
    """A named set of :class:`SCLIPLoss` options (see ``docs/method.md``)."""

    name: str
    options: dict[str, Any]


#: The authors' release (alinlab/s-clip), option by option.
RELEASED = Preset(
    "released",
    dict(
        contrastive_weight=1.0,
        caption_weight=0.5,
        keyword_weight=0.5,
        assigner="ot",
        assigner_support="image",
        sinkhorn_iters=10,
        sinkhorn_reg=None,
        sinkhorn_solver="pot",
        detach_plan=False,
        keyword_weighting="linear",
        keyword_empty_rows_in_mean=True,
        unpaired_negatives=True,
    ),
)

#: This project's default: the release's objective with bounded keyword weights (a softmax
#: over the candidates instead of sim / sum(sim), which explodes when similarities have
#: mixed signs). The Sinkhorn is the release's (POT's updates in float64: exact for
#: s <= 350, and CLIP clamps s at 100); the log-domain solver gives the same plan and is
#: kept for fixed regularisations below 1/350. Gradients still flow through the plan:
#: detaching it cost 1.5 (lr 1e-4) to 6.0 (lr 1e-3) zero-shot points on rsicd-mini
#: (docs/results.md).
RECOMMENDED = Preset(
    "recommended",
    dict(
        RELEASED.options,
        keyword_weighting="softmax",
    ),
)

PRESETS = {p.name: p for p in (RELEASED, RECOMMENDED)}


class SCLIPLoss(nn.Module):
    """S-CLIP objective: contrastive + caption-level OT + keyword-level PLL.

    ``total = contrastive_weight * L_clip + caption_weight * L_caption + keyword_weight * L_kw``
    (paper: 1, 1/2, 1/2). Every feature is L2-normalised; ``logit_scale`` is ``s`` itself.
    The losses are computed in float32 (float64 for the POT solver) with autocast disabled,
    so they are safe under fp16/bf16 mixed precision. Reference: Mo et al., "S-CLIP:
    Semi-supervised Vision-Language Pre-training using Few Specialist Captions", NeurIPS 2023.

    Args:
        contrastive_weight, caption_weight, keyword_weight: >= 0 loss weights.
        assigner: ``"ot"`` (S-CLIP), ``"soft_nn"`` (Soft-PL), ``"hard_nn"`` (Hard-PL).
        assigner_support: match unpaired images to paired ``"image"`` or ``"text"`` features.
        sinkhorn_iters: Sinkhorn iterations (release 10).
        sinkhorn_reg: entropic regularisation; None = ``1/s`` (release).
        sinkhorn_solver: ``"pot"`` (release and default: POT's multiplicative updates in
            float64, exact for ``reg >= 1/350``) or ``"log"`` (log-domain, exact in float32
            for any reg; about 2 ms slower at 512 x 512 on a 2-core CPU).
        detach_plan: stop gradients through the assignment (release: False).
        keyword_weighting: ``"linear"`` (release ``sim/sum(sim)``) or ``"softmax"``.
        keyword_empty_rows_in_mean: count unpaired images without keyword candidates in
            the keyword-loss mean (release: True).
        unpaired_negatives: unpaired images as extra text->image candidates (release: True).
        gather_distributed: all-gather features (with gradients) and candidate labels across
            ranks, so every term runs over the global batch (the OT support too).

    Shapes (forward):
        image_features (B_p, D), text_features (B_p, D), logit_scale scalar,
        unpaired_features (B_u, D), keyword_features (K, D), keyword_candidates (B_p, K) bool.

    Returns:
        ``{"contrastive_loss", "caption_loss", "keyword_loss"}``, each already weighted;
        missing inputs give a zero term. With ``output_dict=False`` their sum.
    """

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        caption_weight: float = 0.5,
        keyword_weight: float = 0.5,
        assigner: str = "ot",
        assigner_support: str = "image",
        sinkhorn_iters: int = 10,
        sinkhorn_reg: float | None = None,
        sinkhorn_solver: str = "pot",
        detach_plan: bool = False,
        keyword_weighting: str = "softmax",
        keyword_empty_rows_in_mean: bool = True,
        unpaired_negatives: bool = True,
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
        self.caption = CaptionOTLoss(
            assigner=assigner,
            support=assigner_support,
            sinkhorn_iters=sinkhorn_iters,
            sinkhorn_reg=sinkhorn_reg,
            sinkhorn_solver=sinkhorn_solver,
            detach_plan=detach_plan,
        )
        self.keyword = KeywordPLLLoss(
            weighting=keyword_weighting, empty_rows_in_mean=keyword_empty_rows_in_mean
        )

    @classmethod
    def from_preset(cls, name: str = "recommended", **overrides: Any) -> SCLIPLoss:
        """Build from ``"released"`` or ``"recommended"``, overriding single options."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name].options, **overrides})

    @classmethod
    def as_released(cls, **overrides: Any) -> SCLIPLoss:
        """The configuration that reproduces the authors' release (see ``RELEASED``)."""
        return cls.from_preset("released", **overrides)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        unpaired_features: torch.Tensor | None = None,
        keyword_features: torch.Tensor | None = None,
        keyword_candidates: torch.Tensor | None = None,
        output_dict: bool = True,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        _check_shapes(
            image_features, text_features, unpaired_features, keyword_features, keyword_candidates
        )
        device_type = image_features.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            losses = self._losses(
                image_features.float(),
                text_features.float(),
                torch.as_tensor(logit_scale, device=image_features.device).float(),
                None if unpaired_features is None else unpaired_features.float(),
                None if keyword_features is None else keyword_features.float(),
                keyword_candidates,
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
    ) -> dict[str, torch.Tensor]:
        if self.gather_distributed:
            image = distributed.gather_with_grad(image)
            text = distributed.gather_with_grad(text)
            if unpaired is not None:
                unpaired = distributed.gather_with_grad(unpaired)
            if candidates is not None:
                candidates = distributed.gather_no_grad(candidates)
        has_unpaired = unpaired is not None and unpaired.shape[0] > 0
        uses_unpaired = has_unpaired and (
            self.unpaired_negatives or self.caption_weight > 0 or self.keyword_weight > 0
        )
        needs_plan = has_unpaired and (self.caption_weight > 0 or self.keyword_weight > 0)
        caption_on = self.caption_weight > 0
        use_keywords = (
            self.keyword_weight > 0
            and keywords is not None
            and candidates is not None
            and keywords.shape[0] > 0
        )
        if needs_plan and self._fused_plan():
            assert unpaired is not None
            # the main configuration: one autograd node (losses/core.py), same numbers
            contrastive, caption, keyword = SCLIPCore.apply(
                image,
                text,
                unpaired,
                keywords if use_keywords else None,
                candidates.bool() if use_keywords else None,  # type: ignore[union-attr]
                scale,
                self._core_options(),
            )
            return {
                "contrastive_loss": contrastive,
                "caption_loss": caption,
                "keyword_loss": keyword,
            }
        zero = scale * 0.0
        out = {"contrastive_loss": zero, "caption_loss": zero, "keyword_loss": zero}
        contrastive, caption, plan = self._composed(
            image, text, scale, unpaired if uses_unpaired else None, needs_plan
        )
        if needs_plan and use_keywords:
            assert unpaired is not None and keywords is not None and candidates is not None
            out["keyword_loss"] = self.keyword_weight * self.keyword(
                unpaired, keywords, candidates.bool(), plan, scale
            )
        out["contrastive_loss"] = self.contrastive_weight * contrastive
        if caption_on:
            out["caption_loss"] = self.caption_weight * caption
        return out

    def _core_options(self) -> CoreOptions:
        caption = self.caption
        return CoreOptions(
            num_iters=caption.sinkhorn_iters,
            solver=caption.sinkhorn_solver,
            reg=caption.sinkhorn_reg,
            caption=self.caption_weight > 0,
            negatives=self.unpaired_negatives,
            plan_grad=not caption.detach_plan,
            keyword_weighting=self.keyword.weighting,
            keyword_empty_rows_in_mean=self.keyword.empty_rows_in_mean,
            weights=(self.contrastive_weight, self.caption_weight, self.keyword_weight),
        )

    def _fused_plan(self) -> bool:
        """Whether :class:`SCLIPCore` covers this configuration (OT over paired images)."""
        caption = self.caption
        return (
            caption.assigner == "ot"
            and caption.support == "image"
            and fast_backward_applies(caption.sinkhorn_reg)
        )

    def _composed(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        unpaired: torch.Tensor | None,
        needs_plan: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Contrastive and caption terms from the composable pieces (every assigner)."""
        n_p = image.shape[0]
        # one matmul gives every caption logit: s Y [X; U]^T holds the text->image logits, its
        # first block transposed the image->text logits, its second block transposed the
        # caption logits of the unpaired images (s U Y^T)
        candidates_img = image if unpaired is None else torch.cat([image, unpaired])
        logits_text = (scale * text) @ candidates_img.T  # scale the smaller operand
        labels = torch.arange(n_p, device=image.device)
        per_text = logits_text if self.unpaired_negatives else logits_text[:, :n_p]
        plan = None
        if needs_plan:
            assert unpaired is not None
            plan = self.caption.assign(unpaired, image, text, scale)
        # image->text CE and the caption soft CE both run down the columns: one fused pass
        if plan is not None and self.caption_weight > 0:
            i2t, caption = ColumnCrossEntropy.apply(logits_text, plan, n_p)
        else:
            i2t, caption = ColumnCrossEntropy.apply(logits_text[:, :n_p], None, n_p)
        contrastive = (i2t + F.cross_entropy(per_text, labels)) / 2
        return contrastive, caption, plan


def _check_shapes(
    image: torch.Tensor,
    text: torch.Tensor,
    unpaired: torch.Tensor | None,
    keywords: torch.Tensor | None,
    candidates: torch.Tensor | None,
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
