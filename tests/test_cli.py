"""The `sclip` CLI: help, and every config in configs/ through fit + test (fast_dev_run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_overrides import TINY_RUN, data_overrides, model_overrides

from sclip_lightning.cli import build_cli, main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE = CONFIG_DIR / "paper" / "base.yaml"
DEMO = CONFIG_DIR / "demo.yaml"
#: every config as it is used: the paper's experiments on top of their shared base (S-CLIP,
#: and one with the baseline's one-line override), the demo, the rsicd-mini protocols
RUNS = {
    **{
        f"paper/{p.stem}": [BASE, p]
        for p in sorted((CONFIG_DIR / "paper").glob("*.yaml"))
        if p != BASE
    },
    "demo": [DEMO],
    "real/rsicd_mini_lit": [CONFIG_DIR / "real" / "rsicd_mini_lit.yaml"],
    "shards/rs_unpaired_shards": [
        BASE,
        CONFIG_DIR / "paper" / "rs_rsicd.yaml",
        CONFIG_DIR / "shards" / "rs_unpaired_shards.yaml",
    ],
    "real/rsicd_mini_finetune": [
        CONFIG_DIR / "real" / "rsicd_mini_lit.yaml",
        CONFIG_DIR / "real" / "rsicd_mini_finetune.yaml",
    ],
    # the objectives on top of an experiment: the baseline, the release, one small batch
    **{
        f"paper/rs_rsicd+objectives/{p.stem}": [BASE, CONFIG_DIR / "paper" / "rs_rsicd.yaml", p]
        for p in sorted((CONFIG_DIR / "objectives").glob("*.yaml"))
    },
}


def test_every_config_file_is_exercised():
    from test_semiclip_stages import FILES as SEMICLIP_FILES

    used = {p for files in RUNS.values() for p in files} | set(SEMICLIP_FILES)
    assert set(CONFIG_DIR.rglob("*.yaml")) == used


def test_sclip_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "sclip_lightning", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for cmd in ("fit", "validate", "test", "predict"):
        assert cmd in out.stdout


def test_model_help_documents_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.help", "SCLIPModule"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for arg in ("--model.criterion", "--model.lock_image", "--model.warmup_steps"):
        assert arg in text
    with pytest.raises(SystemExit) as e:  # an objective's options, documented once
        main(["fit", "--model.help", "SCLIPModule", "--model.criterion.help", "SCLIPLoss"])
    text = capsys.readouterr().out
    for arg in ("keyword_weighting", "support_bank_size", "assigner", "gather_distributed"):
        assert arg in text, text[-3000:]


@pytest.mark.parametrize("name", list(RUNS))
def test_every_config_fits_and_tests(name, tmp_path, tiny_lit):
    cfgs = RUNS[name]
    common = [
        *(arg for c in cfgs for arg in ("--config", str(c))),
        *model_overrides(cfgs, tiny_lit),
        *TINY_RUN,
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.results_dir={tmp_path / 'results'}",
        *data_overrides(cfgs, tmp_path),
    ]
    main(["fit", *common, "--trainer.fast_dev_run=2"])
    main(["test", *common, "--trainer.fast_dev_run=2"])
    assert (tmp_path / "results" / "results.md").is_file()


#: the paper's experiments alone (no objective on top), each on its fixture
PAPER_RUNS = [n for n in RUNS if n.startswith("paper/") and "+" not in n]


def _paper_cli(name: str, tmp_path: Path, *extra: str):
    """``name``'s config on its fixture at tiny size, built but not run; several paired
    batches per epoch (label_ratio 0.5), no validation."""
    cfgs = RUNS[name]
    args = [
        *(arg for c in cfgs for arg in ("--config", str(c))),
        *model_overrides(cfgs, None),
        *TINY_RUN,
        "--data.init_args.label_ratio=0.5",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        *extra,
        *data_overrides(cfgs, tmp_path),
    ]
    return build_cli(args, run=False)


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_paper_loaders_yield_every_batch_they_count(name, tmp_path):
    """A loader that stops early ends the epoch or the evaluation without an error (a
    StopIteration raised by a dataset reads as the end of the data): Fashion-ALL, whose
    products draw one of their photos per visit, once yielded no batch at all."""
    datamodule = _paper_cli(name, tmp_path).datamodule
    datamodule.setup("fit")
    for epoch in range(2):  # the order (and each product's photo) changes with the epoch
        loader = datamodule.train_dataloader()
        for inner in loader.flattened:
            inner.sampler.set_epoch(epoch)
        batches = sum(1 for _ in loader)
        assert batches == len(loader) > 0, (name, epoch)
    for loader in datamodule.val_dataloader():  # the retrieval sets read records the same way
        assert sum(1 for _ in loader) == len(loader) > 0, name


@pytest.mark.parametrize("name", ["paper/fashion", "paper/rs_rsicd"])
def test_paper_config_fit_takes_the_steps_asked_for(name, tmp_path):
    """A short fit takes the steps it was asked for (Fashion-ALL once took none: global_step
    0 after any fit, whatever max_steps or max_epochs, with 5 training batches counted)."""
    cli = _paper_cli(name, tmp_path, "--trainer.max_steps=3")
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3


def test_predict_writes_top_k_csv(synthetic_root, tmp_path):
    import csv

    folder = synthetic_root / "test" / "lake"
    main(
        [
            "predict",
            "--config",
            str(DEMO),
            "--model.init_args.model_name=sclip-tiny",
            "--model.init_args.predict_top_k=3",
            f"--model.init_args.results_dir={tmp_path}",
            "--data.init_args.num_workers=0",
            f"--data.init_args.predict_root={folder}",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == len(list(folder.glob("*.png")))
    from sclip_lightning.data.synthetic import CLASSES

    classes = set(CLASSES)
    assert {r["label_1"] for r in rows} <= classes and "label_3" in rows[0]
    assert all(float(r["score_1"]) >= float(r["score_2"]) >= float(r["score_3"]) for r in rows)


def test_fit_then_test_from_checkpoint(synthetic_root, tmp_path):
    """`sclip test --ckpt_path` honours the results_dir given now (the checkpoint holds the
    one of the fit run): options that describe a run are never read back from a checkpoint."""
    common = [
        "--config",
        str(DEMO),
        "--model.init_args.model_name=sclip-tiny",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8",
        "--data.init_args.unpaired_batch_size=8",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(
        [
            "fit",
            *common,
            f"--model.init_args.results_dir={tmp_path / 'res_fit'}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    main(
        [
            "test",
            *common,
            f"--model.init_args.results_dir={tmp_path / 'res_test'}",
            f"--ckpt_path={ckpts[0]}",
        ]
    )
    assert "zero-shot" in (tmp_path / "res_test" / "results.md").read_text()
    assert not (tmp_path / "res_fit").exists()
