"""Bad configuration ends with one clear message before any training step."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sclip_lightning import SCLIPDataModule
from sclip_lightning.cli import main
from sclip_lightning.distributed import check_rank_agreement

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("--data.init_args.dataset=nope", "unknown data set 'nope'; known: ["),
        ("--model.init_args.model_name=nope", "unknown open_clip model 'nope'"),
        ("--model.init_args.pretrained=/no/such/weights.pt", "pretrained weights file not found"),
        ("--data.init_args.dataset=rsicd", "RSICD root not found: /no/such/root"),
        (
            "--model.init_args.criterion.init_args.support_bank_size=-5",
            "support_bank_size must be -1, 0 or > 0, got -5",
        ),
    ],
)
def test_bad_setting_gives_one_message(override, expected, tmp_path, synthetic_root):
    args = ["fit", "--config", DEMO, override, f"--trainer.default_root_dir={tmp_path}"]
    if "rsicd" in override:
        args.append("--data.init_args.root=/no/such/root")
    with pytest.raises(SystemExit) as err:
        main(args)
    message = str(err.value.code)
    assert message.startswith("sclip: configuration error: ") and expected in message
    assert "Traceback" not in message and "Namespace(" not in message
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before training


def test_ranks_that_disagree_on_shapes_are_named():
    same = {"batch_size": 32, "unpaired_batch_size": 32, "keywords": 45}
    check_rank_agreement([same, dict(same)])
    with pytest.raises(
        ValueError, match=r"disagree on batch_size \(batch_size: rank 0=32, rank 1=16\)"
    ):
        check_rank_agreement([same, {**same, "batch_size": 16}])


def test_keyword_vocabulary_without_any_match_warns_with_counts(synthetic_root, tmp_path, caplog):
    vocab = tmp_path / "kw.txt"
    vocab.write_text("volcano\nglacier\n")
    dm = SCLIPDataModule(dataset="synthetic", keywords=str(vocab), num_workers=0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "none of the 2 keywords occurs in any of the" in caplog.text
