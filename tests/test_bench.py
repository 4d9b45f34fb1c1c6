"""The loss benchmark runs end to end at a tiny size (its numbers are for bench runs only)."""

from __future__ import annotations

import loss as loss_bench  # bench/loss.py (conftest puts bench/ on sys.path)
import pytest


def test_loss_bench_table(capsys):
    loss_bench.main(["--sizes", "8", "--reps", "1", "--dim", "16", "--keywords", "3"])
    out = capsys.readouterr().out
    row = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| 8 |")]
    assert len(row) == 1 and len(row[0]) == 11, out  # B, six times, four ratios
    assert all(float(v) > 0 for v in row[0][1:]), out


def test_real_benchmark_orchestrates_the_product_at_tiny_size(tmp_path, tiny_lit):
    """bench/real_benchmark.py end to end on the rsicd protocol config with the tiny towers and
    fixture data in RSICD's layout: the grid is scored on val, the chosen rate is the best
    val score, every seed is tested, and the tables, json and chart are written. A class
    folder given as a zero-shot set (no val split of its own: its val images are its test
    images) is left out of the selection and evaluated at test only."""
    import json

    import real_benchmark  # bench/real_benchmark.py
    from fixtures import write_class_folder, write_rsicd

    _, folder = tiny_lit
    root = write_rsicd(tmp_path / "rsicd", {"train": 60, "val": 8, "test": 8})
    whu = write_class_folder(tmp_path / "whu", per_class=2)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        "trainer:\n  accelerator: cpu\n  precision: 32-true\n"
        "model:\n  init_args:\n    model_name: sclip-tiny-lit\n"
        f"    model_config_dir: {folder}\n    image_size: null\n    pretrained: null\n"
        "    tower_cache_dir: null\n    warmup_steps: 1\n"
        f"data:\n  init_args:\n    root: {root}\n    keywords: mine\n    num_keywords: 5\n"
        "    batch_size: 4\n    unpaired_batch_size: 4\n    eval_batch_size: 16\n"
    )
    out = tmp_path / "out"
    methods = ["CLIP 10%", "S-CLIP 10%, 32+32, bank all pairs"]
    argv = [
        "--config", str(real_benchmark.LIT), str(tiny), "--steps", "2",
        "--lrs", "1e-3", "1e-4", "--seeds", "0", "1", "--methods", *methods, "--out", str(out),
        "--zeroshot", f"rsicd={root}", f"whu_rs19={whu}",
    ]  # fmt: skip
    real_benchmark.main(argv)
    saved = json.loads((out / "results_lit.json").read_text())
    assert list(saved["results"]) == methods
    for name in methods:
        grid = [g for g in saved["grid"] if g["method"] == name]
        assert [float(g["lr"]) for g in grid] == [1e-3, 1e-4]
        assert all("zero-shot rsicd" in g and "zero-shot whu_rs19" not in g for g in grid)
        assert all("zero-shot whu_rs19" in r for r in saved["per_seed"][name])
        best = max(grid, key=lambda g: g["val score"])
        assert saved["chosen_lr"][name] == float(best["lr"])
        assert len(saved["per_seed"][name]) == 2
        mean, _ = saved["results"][name]["zero-shot rsicd"]
        assert 0.0 <= mean <= 100.0
    assert "pseudo-label acc (train)" in saved["results"][methods[1]]
    table = (out / "results_lit.md").read_text()
    assert f"evaluated at test only: ['whu_rs19={whu}']" in table
    for name in methods:  # one test-table row per method, at its chosen rate
        assert f"| {name} | {saved['chosen_lr'][name]:g} |" in table
    png = out / "results_lit.png"
    png.unlink()
    real_benchmark.main([*argv, "--replot"])
    assert png.is_file()


def test_real_benchmark_diagnostics_refuse_an_unknown_variant_naming_the_known(tmp_path):
    import real_benchmark  # bench/real_benchmark.py

    argv = ["--protocol", "finetune", "--diagnostics", "--variants", "nope", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"unknown variants \['nope'\]; known: .*SemiCLIP 32\+32"):
        real_benchmark.main(argv)
    assert not list(tmp_path.iterdir())  # nothing ran


def test_sync_counter_attributes_each_sync_to_its_phase_and_caller():
    """bench/throughput.py's host-sync counter (part (c) of make gpu-check), without CUDA:
    warnings with the sync-debug message, raised from the forward and from an optimiser
    hook, are counted per step and phase with their caller; logging steps apart; other
    warnings still reach the original handler; the warning state is restored."""
    import warnings

    import lightning as L
    import throughput  # bench/throughput.py
    from helpers import quiet_cpu_trainer

    from sclip_lightning import SCLIPModule

    message = f"{throughput.SYNC_MESSAGE} (simulated)"

    class Syncing(SCLIPModule):
        def compute_losses(self, batch):
            warnings.warn(message, stacklevel=1)
            return super().compute_losses(batch)

    class OptimizerSync(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            warnings.warn(message, stacklevel=1)
            warnings.warn(message, stacklevel=1)

    keywords = ["lake", "forest", "river"]
    module = Syncing(model_name="sclip-tiny", keyword_vocabulary=keywords, warmup_steps=0)
    counter = throughput.SyncCounter(start=2, steps=4, log_every=2)
    data = throughput.make_datamodule(module, 4, 4, steps=7, keywords=keywords, pairs=20)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = quiet_cpu_trainer(max_steps=7, callbacks=[counter.callback(), OptimizerSync()])
        trainer.fit(module, data)
        warnings.warn("an unrelated warning", stacklevel=1)
    assert any("unrelated" in str(w.message) for w in seen)
    assert warnings.filters == filters and not counter.active
    summary = counter.summary()
    assert counter.logging_steps == [3, 5] and summary["sync_steps"] == 4  # (n + 1) % 2 == 0
    assert summary["syncs_per_step"] == 3 and summary["syncs_per_logging_step"] == 3
    assert summary["syncs_by_phase"]["plain"] == {
        "forward (training_step)": 1.0,
        "optimizer + guard": 2.0,
    }
    sites = summary["sync_sites"]
    assert sites and all("test_bench.py" in site for site in sites), sites
    assert any("compute_losses" in s for s in sites)
    assert any("on_before_optimizer_step" in s for s in sites)


def test_loader_throughput_and_prepared_images(tmp_path):
    """bench/throughput.py's loader measurement over an RSICD-layout folder made by its
    prepare-images, at tiny size."""
    import json

    import throughput  # bench/throughput.py
    from fixtures import write_rsicd

    source = write_rsicd(tmp_path / "rsicd", {"train": 12, "val": 2, "test": 2})
    small = tmp_path / "small"
    throughput.prepare_images(argparse_namespace(source=str(source), n=10, to=str(small)))
    assert len(list((small / "RSICD_images").iterdir())) == 10
    out = tmp_path / "loader.jsonl"
    throughput.main(
        ["loader", "--images", str(small), "--model", "sclip-tiny", "--batch", "4",
         "--workers", "0", "--warmup", "1", "--batches", "3", "--json", str(out)]
    )  # fmt: skip
    rec = json.loads(out.read_text())
    assert rec["images_per_s"] > 0 and rec["workers"] == 0
    assert "10 JPEGs" in rec["images"] and "listed" in rec["images"]


def argparse_namespace(**kw):
    import argparse

    return argparse.Namespace(**kw)


def test_tower_cache_bench_compares_the_passes(tmp_path, capsys):
    """bench/tower_cache.py end to end with the offline towers (the real EfficientNet-lite0
    weights: its BatchNorm folding is what the new pass rests on) on fixture images in RSICD's
    layout: both passes timed, a ratio per part, and the new pass agrees with a float64
    computation of the frozen part as closely as the old one does (float32 rounding)."""
    import tower_cache as bench  # bench/tower_cache.py
    from fixtures import write_rsicd

    root = write_rsicd(tmp_path / "rsicd", {"train": 40, "val": 2, "test": 2})
    result = bench.main(["--root", str(root), "--n", "40", "--repeats", "1", "--reference", "40"])
    out = capsys.readouterr().out
    assert result is not None, out
    assert set(result["ratio"]) == {"images", "captions", "whole"}
    assert all(r > 0 for r in result["ratio"].values())
    scale, error = result["scale"], result["error"]
    # float32 through ~20 layers: each pass is off float64 by ~1e-6 of the output scale
    # (measured here: 6.3e-6 of 5.55); a wrong fold is off by far more (BatchNorm's eps
    # doubled in the fold: 0.66 of 5.55, 12%). 1e-4 of the scale separates the two on any CPU.
    assert error["old"] < 1e-4 * scale and error["new"] < 1e-4 * scale, error
    assert error["captions new - old"] == 0.0  # captions take the same path in both
    assert "| images (images/s) |" in out
