"""Data sets in their native layouts, keyword vocabularies and the S-CLIP DataModule."""

from sclip_lightning.data.base import (
    SPLITS,
    CaptionedDataset,
    ConcatCaptioned,
    ImageRecords,
    LabelledRecords,
    split_name,
)
from sclip_lightning.data.comics import SimpsonsCaptions
from sclip_lightning.data.datamodule import SCLIPDataModule
from sclip_lightning.data.datasets import split_labeled
from sclip_lightning.data.fashion import (
    Fashion200k,
    Fashion200kClasses,
    FashionGen,
    FashionGenClasses,
    Polyvore,
    PolyvoreClasses,
)
from sclip_lightning.data.generic import CaptionTable, ClassFolder, ImageFolderUnpaired
from sclip_lightning.data.images import CorruptImageError, load_image
from sclip_lightning.data.keywords import KeywordMatcher, load_keywords, mine_keywords
from sclip_lightning.data.names import clean_class_name
from sclip_lightning.data.registry import SOURCES, Source, register_source
from sclip_lightning.data.remote_sensing import RSICD, RSICDClasses, SydneyCaptions, UCMCaptions
from sclip_lightning.data.scientific import SciCap

__all__ = [
    "RSICD",
    "SOURCES",
    "SPLITS",
    "ConcatCaptioned",
    "ImageRecords",
    "LabelledRecords",
    "split_name",
    "CaptionTable",
    "CaptionedDataset",
    "ClassFolder",
    "CorruptImageError",
    "Fashion200k",
    "Fashion200kClasses",
    "FashionGen",
    "FashionGenClasses",
    "Polyvore",
    "PolyvoreClasses",
    "SciCap",
    "SimpsonsCaptions",
    "SydneyCaptions",
    "UCMCaptions",
    "ImageFolderUnpaired",
    "KeywordMatcher",
    "RSICDClasses",
    "SCLIPDataModule",
    "Source",
    "clean_class_name",
    "load_image",
    "load_keywords",
    "mine_keywords",
    "register_source",
    "split_labeled",
]
