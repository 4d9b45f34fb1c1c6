"""SemiCLIP's two stages as users run them: `sclip fit` stage 1 (writes the concept logits),
`sclip fit` stage 2 from its checkpoint, resume inside stage 2, `sclip test`, and the
errors for a stage-1 file that does not belong to the run; on open_clip's own text tower
(paper configs) and on the Hugging Face tower with cached frozen towers (rsicd-mini)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_overrides import TINY_RUN, data_overrides, model_overrides

from sclip_lightning.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SEMICLIP = CONFIG_DIR / "semiclip"
#: (protocol files, stage files, run folder)
SETUPS = {
    "open_clip_text": (
        [CONFIG_DIR / "paper" / "base.yaml", CONFIG_DIR / "paper" / "rs_rsicd.yaml"],
        [SEMICLIP / "rs_stage1.yaml", SEMICLIP / "rs_stage2.yaml"],
        "runs/semiclip_rs",
    ),
    "fashion": (
        [CONFIG_DIR / "paper" / "base.yaml", CONFIG_DIR / "paper" / "fashion.yaml"],
        [SEMICLIP / "fashion_stage1.yaml", SEMICLIP / "fashion_stage2.yaml"],
        "runs/semiclip_fashion",
    ),
    "hf_text_cached": (
        [CONFIG_DIR / "real" / "rsicd_mini_lit.yaml"],
        [SEMICLIP / "rsicd_mini_stage1.yaml", SEMICLIP / "rsicd_mini_stage2.yaml"],
        "runs/semiclip_rsicd_mini",
    ),
}
#: every SemiCLIP config a test runs (tests/test_cli.py checks that each file is used)
FILES = [p for protocol, stages, _ in SETUPS.values() for p in (*protocol, *stages)]
FILES += [SEMICLIP / "released.yaml"]


def _args(cfgs, tmp_path, tiny_lit, *extra):  # noqa: D103
    return [
        *(arg for c in cfgs for arg in ("--config", str(c))),
        *model_overrides(cfgs, tiny_lit),
        *TINY_RUN,
        *data_overrides(cfgs, tmp_path / "data"),
        "--trainer.limit_val_batches=0",
        f"--model.init_args.results_dir={tmp_path / 'results'}",
        *extra,
    ]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_two_stages_resume_test_and_wrong_pairing(setup, tmp_path, tiny_lit, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write under runs/ (relative)
    protocol, (stage1, stage2), run = SETUPS[setup]
    s1 = [*protocol, stage1]
    main(["fit", *_args(s1, tmp_path, tiny_lit, "--trainer.max_steps=2")])
    first = Path(run) / "stage1" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 2
    # resume inside stage 1: one more step, then the logits of the final weights
    main(["fit", *_args(s1, tmp_path, tiny_lit, "--trainer.max_steps=3", f"--ckpt_path={first}")])
    logits_file = Path(run) / "stage1" / "concept_logits.pt"
    record = torch.load(logits_file, weights_only=True)
    stage1_ckpt = torch.load(first, weights_only=True)
    assert stage1_ckpt["global_step"] == 3
    k = stage1_ckpt["state_dict"]["criterion.concept_embeddings"]
    n_unpaired = len(record["unpaired_keys"])
    assert n_unpaired > 0 and record["logits"].shape == (n_unpaired, k.shape[0])
    assert torch.isfinite(record["logits"]).all()
    assert record["view"] == "eval"

    s2 = [*protocol, stage2]
    main(["fit", *_args(s2, tmp_path, tiny_lit, "--trainer.max_steps=3")])
    last = Path(run) / "stage2" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3  # a fresh schedule: stage 2 counts from 0
    state = ckpt["state_dict"]
    assert state["criterion.context"].numel() > 0
    moved = (state["criterion.concept_embeddings"] - k).abs().max()
    assert moved > 0  # stage 2 trained the concept head it started from

    resume = ("--trainer.max_steps=5", f"--ckpt_path={last}")
    main(["fit", *_args(s2, tmp_path, tiny_lit, *resume)])
    assert torch.load(last, weights_only=True)["global_step"] == 5  # resumed inside stage 2

    main(["test", *_args(s2, tmp_path, tiny_lit, f"--ckpt_path={last}")])
    assert (tmp_path / "results" / "results.md").is_file()

    # another split: other unpaired images (or other concepts) than the stage-1 file's
    with pytest.raises(SystemExit, match="stage 2 must"):
        main(["fit", *_args(s2, tmp_path, tiny_lit, "--data.init_args.split_seed=1")])
    # a logits file of another stage-1 run than the checkpoint stage 2 starts from
    record["embedding_digest"] = "0" * 16
    torch.save(record, logits_file)
    with pytest.raises(SystemExit, match="same stage-1 run"):
        main(["fit", *_args(s2, tmp_path, tiny_lit, "--trainer.max_steps=1")])


def test_released_semiclip_config_builds_the_released_preset(tmp_path):
    from sclip_lightning.losses import SemiCLIPLoss

    cli_cfg = [
        "--config", str(CONFIG_DIR / "paper" / "base.yaml"),
        "--config", str(CONFIG_DIR / "paper" / "rs_rsicd.yaml"),
        "--config", str(SEMICLIP / "rs_stage1.yaml"),
        "--config", str(SEMICLIP / "released.yaml"),
        "--print_config",
    ]  # fmt: skip
    import contextlib
    import io

    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *cli_cfg])
    init = yaml.safe_load(out.getvalue())["model"]["init_args"]["criterion"]["init_args"]
    expected = SemiCLIPLoss.released(stage=1).config()["init_args"]
    for key, value in expected.items():
        assert init[key] == value, key
