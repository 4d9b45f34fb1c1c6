"""Distributed evaluation: 2 DDP processes give exactly the single-process numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sclip_lightning import distributed
from sclip_lightning.evaluation import EvalSpec, Evaluation

HERE = Path(__file__).resolve().parent


@pytest.mark.ddp
def test_two_process_test_equals_one_process(synthetic_root, tmp_path):
    from fixtures import write_caption_table, write_class_folder

    classes = write_class_folder(tmp_path / "cls", per_class=3, classes=["lake", "forest", "farm"])
    table = write_caption_table(tmp_path / "tab", n=15)  # 3 test images
    rows = {}
    for devices in (1, 2):
        out = tmp_path / f"rows{devices}.json"
        proc = subprocess.run(
            [sys.executable, str(HERE / "ddp_eval_check.py"), str(out), str(devices),
             str(classes), str(table)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        rows[devices] = json.loads(out.read_text())
    assert [r["dataset"] for r in rows[1]] == [
        "synthetic", "class_folder", "synthetic", "caption_table"
    ]  # fmt: skip
    # Equal numbers, not close ones: recalls and accuracies are counts. The features are the
    # same float32 values in both runs (float64 towers, see ddp_eval_check.py); the float32
    # scores are not bit-identical (a rank's matrix product has other shapes and row orders:
    # up to 2e-7 apart on emulated AVX2/SSE kernel sets). For this fixture no metric moves
    # unless some score moves by >= 4.5e-7: every score that close to a decision boundary
    # (tie tolerance 1e-6, top-k) belongs to a query whose recall@1/5/10 it cannot change
    # (checked by enumerating both sides of every such boundary). The float32 worst case
    # (64 * 2^-24 = 3.8e-6 per score) is above that: a bound would need float64 scores, which
    # the evaluation does not offer (it casts features to float32).
    for one, two in zip(rows[1], rows[2], strict=True):
        assert one.keys() == two.keys()
        for k, v in one.items():
            if isinstance(v, float):
                assert two[k] == pytest.approx(v, abs=1e-6), (one["dataset"], k)
            else:
                assert two[k] == v


def _gather_worker(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    local = torch.arange(rank * 10, rank * 10 + 3 + 2 * rank).float()[:, None].repeat(1, 2)
    flags = local[:, 0] > 11
    torch.save((distributed.gather_rows(local), distributed.gather_rows(flags)), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_gather_rows_handles_ranks_of_different_sizes_and_bools(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "g")), nprocs=2)
    expected = torch.tensor([0.0, 1, 2, 10, 11, 12, 13, 14])
    for r in range(2):
        rows, flags = torch.load(tmp_path / f"g.{r}", weights_only=True)
        assert torch.equal(rows, expected[:, None].repeat(1, 2))
        assert flags.dtype == torch.bool and torch.equal(flags, expected > 11)


def test_evaluation_without_a_trainer_counts_repeated_samples_once():
    """Features from your own loop: a sample added twice (as a padded sampler repeats it)
    with its captions is counted once."""
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat(2, 1) + 0.1 * torch.randn(10, 8, generator=g))
    owner = torch.arange(10) % 5
    once = Evaluation([EvalSpec("a", "retrieval")])
    once.add_retrieval(0, img, torch.arange(5), txt, owner)
    twice = Evaluation([EvalSpec("a", "retrieval")])
    twice.add_retrieval(0, img[:3], torch.arange(3), txt[owner < 3], owner[owner < 3])
    twice.add_retrieval(0, img[2:], torch.arange(2, 5), txt[owner >= 2], owner[owner >= 2])
    assert once.compute() == twice.compute()
