"""Shared fixtures: offline environment, tiny models, a cached synthetic domain."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Every test writes caches (the synthetic domain) into a per-session temp folder."""
    cache = tmp_path_factory.mktemp("sclip-cache")
    old = os.environ.get("SCLIP_CACHE")
    os.environ["SCLIP_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SCLIP_CACHE", None)
    else:
        os.environ["SCLIP_CACHE"] = old


@pytest.fixture(scope="session")
def synthetic_root(_cache):
    from sclip_lightning.data.synthetic import ensure_synthetic

    return ensure_synthetic()


@pytest.fixture
def rsicd_mini():
    path = SHARED / "data" / "rsicd-mini"
    if not (path / "dataset_rsicd.json").is_file():
        pytest.skip(f"real data not found at {path} (needs the shared/ folder beside the repo)")
    return path


@pytest.fixture(scope="session")
def tiny_lit(_cache):
    """Name and config folder of the tiny timm + Hugging Face model (registered)."""
    from fixtures import TINY_LIT, write_tiny_lit_model

    from sclip_lightning.models import register_model_configs

    folder = write_tiny_lit_model(_cache / "tiny-lit")
    register_model_configs(folder)
    return TINY_LIT, folder
