"""S-CLIP losses: pure PyTorch, no Lightning import.

One implementation per paper term, each in the file named after it:
``contrastive.py`` (CLIP loss with unpaired negatives), ``caption_ot.py`` (caption-level
pseudo-labels), ``keyword_pll.py`` (keyword-level partial labels); the plan comes from an
assigner (``assigners.py``; balanced Sinkhorn in ``sinkhorn.py``), optionally over a support
bank (``bank.py``); ``sclip.py`` combines them.
"""

from sclip_lightning.losses.assigners import (
    ASSIGNERS,
    Assigner,
    HardNNAssigner,
    OTAssigner,
    SoftNNAssigner,
    UnbalancedOTAssigner,
    assign,
    build_assigner,
)
from sclip_lightning.losses.bank import SupportBank
from sclip_lightning.losses.caption_ot import CaptionOTLoss, caption_loss
from sclip_lightning.losses.contrastive import ContrastiveLoss, contrastive_loss
from sclip_lightning.losses.functional import soft_cross_entropy
from sclip_lightning.losses.keyword_pll import KeywordPLLLoss, keyword_loss, keyword_targets
from sclip_lightning.losses.sclip import (
    OBJECTIVE_OPTIONS,
    PRESETS,
    RECOMMENDED,
    RELEASED,
    Assignment,
    SCLIPLoss,
    preset_options,
)
from sclip_lightning.losses.sinkhorn import sinkhorn_log, sinkhorn_plan, sinkhorn_pot

__all__ = [
    "ASSIGNERS",
    "OBJECTIVE_OPTIONS",
    "PRESETS",
    "RECOMMENDED",
    "RELEASED",
    "Assigner",
    "Assignment",
    "CaptionOTLoss",
    "ContrastiveLoss",
    "HardNNAssigner",
    "KeywordPLLLoss",
    "OTAssigner",
    "SCLIPLoss",
    "SoftNNAssigner",
    "SupportBank",
    "UnbalancedOTAssigner",
    "assign",
    "build_assigner",
    "caption_loss",
    "contrastive_loss",
    "keyword_loss",
    "keyword_targets",
    "preset_options",
    "sinkhorn_log",
    "sinkhorn_plan",
    "sinkhorn_pot",
    "soft_cross_entropy",
]
