"""S-CLIP losses: pure PyTorch, no Lightning import."""

from sclip_lightning.losses.caption_ot import CaptionOTLoss, assign
from sclip_lightning.losses.contrastive import ContrastiveLoss, contrastive_loss
from sclip_lightning.losses.functional import (
    hard_nn_assign,
    ot_assign,
    sinkhorn_log,
    sinkhorn_pot,
    soft_cross_entropy,
    soft_nn_assign,
)
from sclip_lightning.losses.keyword_pll import KeywordPLLLoss, keyword_targets
from sclip_lightning.losses.sclip import PRESETS, RECOMMENDED, RELEASED, SCLIPLoss

__all__ = [
    "PRESETS",
    "RECOMMENDED",
    "RELEASED",
    "CaptionOTLoss",
    "ContrastiveLoss",
    "KeywordPLLLoss",
    "SCLIPLoss",
    "assign",
    "contrastive_loss",
    "hard_nn_assign",
    "keyword_targets",
    "ot_assign",
    "sinkhorn_log",
    "sinkhorn_pot",
    "soft_cross_entropy",
    "soft_nn_assign",
]
