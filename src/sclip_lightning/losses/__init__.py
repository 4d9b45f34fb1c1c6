"""Objectives, their terms and the pseudo-label assigners: pure PyTorch, no Lightning import.

An objective (:class:`Objective`: :class:`CLIPLoss`, :class:`SCLIPLoss`, or your own) turns
the features of a training batch into named loss terms. One implementation per paper term,
each in the file named after it: ``contrastive.py`` (CLIP loss with unpaired negatives),
``caption_ot.py`` (caption-level pseudo-labels), ``keyword_pll.py`` (keyword-level partial
labels); the plan comes from an assigner (``assigners.py``; balanced Sinkhorn in
``sinkhorn.py``), optionally over a support bank (``bank.py``); ``sclip.py`` combines them.
SemiCLIP's terms: ``concept.py`` (concept loss), ``trapezoid.py`` (trapezoidal consistency);
``semiclip.py`` combines them with the contrastive loss.
"""

from sclip_lightning.losses.assigners import (
    Assigner,
    EntropicAssigner,
    HardNNAssigner,
    OTAssigner,
    SoftNNAssigner,
    UnbalancedOTAssigner,
    assign,
)
from sclip_lightning.losses.bank import SupportBank
from sclip_lightning.losses.caption_ot import caption_loss
from sclip_lightning.losses.clip import CLIPLoss
from sclip_lightning.losses.component import Component, build_component
from sclip_lightning.losses.contrastive import contrastive_loss
from sclip_lightning.losses.functional import soft_cross_entropy
from sclip_lightning.losses.keyword_pll import keyword_loss, keyword_targets
from sclip_lightning.losses.objective import Features, Objective
from sclip_lightning.losses.sclip import RELEASED, Assignment, SCLIPLoss
from sclip_lightning.losses.semiclip import RELEASED_SEMICLIP, SemiCLIPLoss
from sclip_lightning.losses.sinkhorn import sinkhorn_log, sinkhorn_plan, sinkhorn_pot

__all__ = [
    "RELEASED",
    "Assigner",
    "Assignment",
    "CLIPLoss",
    "Component",
    "EntropicAssigner",
    "Features",
    "HardNNAssigner",
    "OTAssigner",
    "Objective",
    "SCLIPLoss",
    "SemiCLIPLoss",
    "RELEASED_SEMICLIP",
    "SoftNNAssigner",
    "SupportBank",
    "UnbalancedOTAssigner",
    "assign",
    "build_component",
    "caption_loss",
    "contrastive_loss",
    "keyword_loss",
    "keyword_targets",
    "sinkhorn_log",
    "sinkhorn_plan",
    "sinkhorn_pot",
    "soft_cross_entropy",
]
