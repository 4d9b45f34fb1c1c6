"""S-CLIP's objective: contrastive + caption-level pseudo-labels + keyword-level PLL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sclip_lightning import distributed
from sclip_lightning.interfaces import TrainInfo
from sclip_lightning.losses.assigners import Assigner, OTAssigner
from sclip_lightning.losses.bank import SupportBank
from sclip_lightning.losses.caption_ot import caption_loss
from sclip_lightning.losses.component import check_choice
from sclip_lightning.losses.contrastive import contrastive_loss
from sclip_lightning.losses.keyword_pll import KeywordWeighting, keyword_loss
from sclip_lightning.losses.objective import Features, Objective

#: The authors' release (alinlab/s-clip) differs from :class:`SCLIPLoss`'s defaults only in
#: these options (``SCLIPLoss.released()``; YAML: ``init_args: {keyword_weighting: linear}``).
RELEASED: dict[str, Any] = {"keyword_weighting": "linear"}


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


class SCLIPLoss(Objective):
    """S-CLIP objective: contrastive + caption-level pseudo-labels + keyword-level PLL.

    ``total = contrastive_weight * L_clip + caption_weight * L_caption + keyword_weight * L_kw``
    (paper: 1, 1/2, 1/2). Each term is the one implementation in its file:
    :func:`~sclip_lightning.losses.contrastive.contrastive_loss`,
    :func:`~sclip_lightning.losses.caption_ot.caption_loss`,
    :func:`~sclip_lightning.losses.keyword_pll.keyword_loss`; the plan comes from
    :attr:`assigner` (:meth:`assign`). The Sinkhorn runs in float64 with the ``pot`` solver.
    Reference: Mo et al., "S-CLIP: Semi-supervised Vision-Language Pre-training using Few
    Specialist Captions", NeurIPS 2023.

    The defaults are this project's recommended objective; :meth:`released` (options
    :data:`RELEASED`) reproduces the authors' release.

    Args:
        contrastive_weight, caption_weight, keyword_weight: >= 0 loss weights.
        assigner: the pseudo-label assigner (:class:`~sclip_lightning.losses.Assigner`);
            None: :class:`~sclip_lightning.losses.OTAssigner` with its defaults (S-CLIP).
        keyword_weighting: keyword targets inside the candidate set: ``"linear"`` (release
            ``sim / sum(sim)``, explodes when similarities change sign) or ``"softmax"``.
        keyword_empty_rows_in_mean: count unpaired images without keyword candidates in the
            keyword-loss mean (release: True).
        unpaired_negatives: unpaired images as extra text->image candidates (release: True).
        support_bank_size: paired features kept across steps as extra assigner support
            (:class:`~sclip_lightning.losses.SupportBank`): 0 off (release), N > 0 the last
            N pairs, -1 one slot per paired image (one GPU, or a small per-GPU batch).
        **kwargs: :class:`~sclip_lightning.losses.Objective`'s options (``gather_distributed``).

    Returns (forward):
        ``{"contrastive_loss", "caption_loss", "keyword_loss"}``, each already weighted;
        a term whose inputs are missing is zero.
    """

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        caption_weight: float = 0.5,
        keyword_weight: float = 0.5,
        assigner: Assigner | None = None,
        keyword_weighting: KeywordWeighting = "softmax",
        keyword_empty_rows_in_mean: bool = True,
        unpaired_negatives: bool = True,
        support_bank_size: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, w in (
            ("contrastive_weight", contrastive_weight),
            ("caption_weight", caption_weight),
            ("keyword_weight", keyword_weight),
        ):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        check_choice("keyword_weighting", keyword_weighting, KeywordWeighting)
        if assigner is not None and not isinstance(assigner, Assigner):
            raise ValueError(f"assigner must be an Assigner, got {type(assigner).__name__}")
        self.contrastive_weight = float(contrastive_weight)
        self.caption_weight = float(caption_weight)
        self.keyword_weight = float(keyword_weight)
        self.assigner = assigner if assigner is not None else OTAssigner()
        self.keyword_weighting = keyword_weighting
        self.keyword_empty_rows_in_mean = keyword_empty_rows_in_mean
        self.unpaired_negatives = unpaired_negatives
        # only an enabled bank is a submodule: its checkpoint entry is a dict, not a tensor
        self.bank = SupportBank(support_bank_size) if support_bank_size != 0 else None
        self.last_assignment: Assignment | None = None

    @classmethod
    def released(cls, **overrides: Any) -> SCLIPLoss:
        """The authors' release (:data:`RELEASED`), with single options overridden."""
        return cls(**{**RELEASED, **overrides})

    @property
    def uses_unpaired(self) -> bool:
        return self.unpaired_negatives or self.caption_weight > 0 or self.keyword_weight > 0

    @property
    def uses_keywords(self) -> bool:
        return self.keyword_weight > 0

    def setup(self, info: TrainInfo) -> None:
        """A per-pair bank (``support_bank_size=-1``) gets one slot per paired image."""
        if self.bank is not None and self.bank.size == -1 and self.bank.capacity is None:
            self.bank.set_capacity(info.num_paired)

    def compute(self, f: Features) -> dict[str, torch.Tensor]:
        image, text, scale, unpaired = f.image, f.text, f.logit_scale, f.unpaired
        keywords, candidates = f.keywords, f.keyword_candidates
        has_unpaired = unpaired is not None and unpaired.shape[0] > 0
        contrastive = contrastive_loss(
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
                (image, text, candidates, None, f.label)
                if self.bank is None
                else self.bank.support(image, text, candidates, f.pair_index, f.label)
            )
            plan = self.assign(unpaired, s_image, s_text, scale, mask)
            if self.caption_weight > 0:
                out["caption_loss"] = self.caption_weight * caption_loss(
                    unpaired, s_text, scale, plan, mask
                )
            if use_keywords:
                assert keywords is not None and s_cand is not None
                out["keyword_loss"] = self.keyword_weight * keyword_loss(
                    unpaired,
                    keywords,
                    s_cand,
                    plan,
                    scale,
                    self.keyword_weighting,
                    self.keyword_empty_rows_in_mean,
                )
            self.last_assignment = Assignment(plan.detach(), s_labels, mask)
        if self.bank is not None and self.training:
            self.bank.push(image.detach(), text.detach(), candidates, f.pair_index, f.label)
        return out

    def assign(
        self,
        unpaired: torch.Tensor,
        support_image: torch.Tensor,
        support_text: torch.Tensor,
        logit_scale: torch.Tensor,
        support_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (B_u, S) plan from :attr:`assigner` (the one place training gets it from)."""
        plan = self.assigner(
            unpaired, support_image, support_text, logit_scale, support_mask=support_mask
        )
        expected = (unpaired.shape[0], support_image.shape[0])
        if tuple(plan.shape) != expected:
            raise ValueError(
                f"{type(self.assigner).__name__} returned a plan of shape {tuple(plan.shape)}; "
                f"expected (B_u, S) = {expected}"
            )
        return plan

    @torch.no_grad()
    def train_metrics(self, unpaired_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pseudo_label_acc``: the share of unpaired images whose assigned support item
        (plan argmax) has their class, from the plan the last step trained with (the same
        assigner, bank and global batch) and the support rows' hidden labels (-1: unknown)."""
        last = self.last_assignment
        if last is None or last.support_labels is None:
            return {}
        if self.gather_distributed:
            unpaired_labels = distributed.gather_no_grad(unpaired_labels)
        assigned = last.support_labels[last.plan.argmax(dim=-1)]
        known = (unpaired_labels >= 0).float()
        hit = (assigned == unpaired_labels).float() * known
        return {"pseudo_label_acc": hit.sum() / known.sum().clamp_min(1.0)}
