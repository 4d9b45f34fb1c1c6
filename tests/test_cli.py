"""The `sclip` CLI: help, and every config in configs/ through fit + test (fast_dev_run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import (
    write_class_folder,
    write_fashion200k,
    write_fashiongen,
    write_karpathy,
    write_polyvore,
    write_rsicd,
    write_scicap,
)

from sclip_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
    for arg in (
        "--model.objective",
        "--model.keyword_weighting",
        "--model.lock_image",
        "--model.warmup_steps",
    ):
        assert arg in text
    assert "Sinkhorn" in text or "sinkhorn" in text


def _data_overrides(cfg: Path, tmp_path: Path) -> list[str]:
    """Write fixture data in the config's native layout; return the root overrides."""
    text = cfg.read_text()
    big = {"train": 60, "val": 8, "test": 8}
    out: list[str] = []
    if "dataset: rsicd" in text:
        out.append(f"--data.init_args.root={write_rsicd(tmp_path / 'rsicd', big)}")
    if "dataset: rs_all" in text:
        root = tmp_path / "rs"
        write_rsicd(root / "RSICD", big)
        write_karpathy(root / "UCM_captions")
        write_karpathy(root / "Sydney_captions")
        out.append(f"--data.init_args.root={root}")
    if "unpaired_dataset: resisc45" in text:
        res = write_class_folder(tmp_path / "resisc45", per_class=3, classes=["airport", "lake"])
        out.append(f"--data.init_args.unpaired_root={res}")
    if "dataset: fashion_all" in text:
        root = tmp_path / "fashion"
        write_fashion200k(root / "fashion200k", items_per_cat=8)
        write_fashiongen(root / "FashionGen")
        write_polyvore(root / "PolyvoreOutfits")
        out.append(f"--data.init_args.root={root}")
    if "dataset: simpsons" in text:
        from fixtures import write_simpsons

        out.append(f"--data.init_args.root={write_simpsons(tmp_path / 'simpsons', n=50)}")
    if "unpaired_dataset: class_folder" in text:
        chars = write_class_folder(tmp_path / "chars", per_class=3, classes=["homer", "marge"])
        out.append(f"--data.init_args.unpaired_root={chars}")
    if "dataset: scicap" in text:
        out.append(f"--data.init_args.root={write_scicap(tmp_path / 'scicap', n=45)}")
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_fits_and_tests(cfg, tmp_path):
    common = [
        "--config",
        str(cfg),
        "--model.init_args.model_name=sclip-tiny",
        "--model.init_args.pretrained=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--data.init_args.unpaired_batch_size=4",
        "--data.init_args.eval_batch_size=16",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.results_dir={tmp_path / 'results'}",
        *_data_overrides(cfg, tmp_path),
    ]
    main(["fit", *common, "--trainer.fast_dev_run=2"])
    main(["test", *common, "--trainer.fast_dev_run=2"])
    assert (tmp_path / "results" / "results.md").is_file()


def test_predict_writes_top_k_csv(synthetic_root, tmp_path):
    import csv

    folder = synthetic_root / "test" / "lake"
    main(
        [
            "predict",
            "--config",
            str(CONFIGS[0].parent / "demo_sclip.yaml"),
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
    common = [
        "--config",
        str(CONFIGS[0].parent / "demo_sclip.yaml"),
        "--model.init_args.model_name=sclip-tiny",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8",
        "--data.init_args.unpaired_batch_size=8",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.results_dir={tmp_path / 'res'}",
    ]
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    main(["test", *common, f"--ckpt_path={ckpts[0]}"])
    assert "zero-shot" in (tmp_path / "res" / "results.md").read_text()
