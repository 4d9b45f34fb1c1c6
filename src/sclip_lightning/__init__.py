"""sclip-lightning: S-CLIP (semi-supervised CLIP from few captions) on PyTorch Lightning."""

from sclip_lightning.data.datamodule import SCLIPDataModule
from sclip_lightning.losses import SCLIPLoss
from sclip_lightning.module import SCLIPModule

__version__ = "0.2.0"

__all__ = ["SCLIPDataModule", "SCLIPLoss", "SCLIPModule", "__version__"]
