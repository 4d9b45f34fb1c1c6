"""Export: a checkpoint becomes weights plain open_clip loads with identical features."""

from __future__ import annotations

import json

import lightning as L
import open_clip
import pytest
import torch
from helpers import quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.export import export, main


def test_exported_weights_give_the_same_features(synthetic_root, tmp_path, capsys):
    L.seed_everything(0)
    dm = SCLIPDataModule(num_workers=0, batch_size=8, unpaired_batch_size=8)
    module = SCLIPModule(model_name="sclip-tiny", lr=1e-3)
    trainer = quiet_cpu_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    main([str(ckpt), str(tmp_path / "exported.pt")])
    assert "open_clip.create_model('sclip-tiny'" in capsys.readouterr().out
    meta = json.loads((tmp_path / "exported.json").read_text())
    assert meta["model_name"] == "sclip-tiny" and meta["model_config"]["embed_dim"] == 64

    plain = open_clip.create_model("sclip-tiny", pretrained=str(tmp_path / "exported.pt"))
    plain.eval()
    module.eval()
    images = torch.randn(4, 3, 32, 32)
    tokens = module.tokenizer(["a lake", "a forest seen from above"])
    with torch.no_grad():
        torch.testing.assert_close(
            plain.encode_image(images, normalize=True), module.encode_images(images)
        )
        torch.testing.assert_close(
            plain.encode_text(tokens, normalize=True), module.encode_texts(tokens)
        )
        torch.testing.assert_close(plain.logit_scale, module.model.logit_scale)
    trained = module.model.visual.conv1.weight
    fresh = SCLIPModule(model_name="sclip-tiny").model.visual.conv1.weight
    assert not torch.equal(trained, fresh)


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export(tmp_path / "none.ckpt", tmp_path / "o.pt")
    torch.save({"weights": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match="not a Lightning checkpoint"):
        export(tmp_path / "bad.ckpt", tmp_path / "o.pt")


def test_export_refuses_a_checkpoint_holding_pickled_objects(tmp_path):
    """weights_only loading: a checkpoint that would run code when unpickled is refused."""

    from collections import OrderedDict
    from fractions import Fraction  # any class outside torch's allow-list stands for a payload

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": OrderedDict({"model.w": torch.zeros(1)}), "x": Fraction(1, 3)}, ckpt)
    with pytest.raises(ValueError, match="refusing to load .*evil.ckpt.*pickled Python objects"):
        export(ckpt, tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()
