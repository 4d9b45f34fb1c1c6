"""Two runs with the same seed give identical metrics; different seeds differ."""

from __future__ import annotations

import lightning as L
import torch
from helpers import quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule


def run(seed: int, tmp_path) -> tuple[list[dict], torch.Tensor]:
    L.seed_everything(seed, workers=True, verbose=False)
    dm = SCLIPDataModule(
        num_workers=1, batch_size=8, unpaired_batch_size=8, split_seed=seed, eval_batch_size=64
    )
    m = SCLIPModule(
        model_name="sclip-tiny", lr=1e-3, warmup_steps=2, results_dir=str(tmp_path / f"r{seed}")
    )
    t = quiet_cpu_trainer(max_steps=6, deterministic=True, limit_test_batches=2)
    t.fit(m, dm)
    t.test(m, dm, verbose=False)
    return m.test_results, m.model.visual.conv1.weight.detach().clone()


def test_same_seed_same_results_other_seed_differs(synthetic_root, tmp_path):
    a_rows, a_w = run(0, tmp_path)
    b_rows, b_w = run(0, tmp_path)
    c_rows, c_w = run(1, tmp_path)
    assert a_rows == b_rows and torch.equal(a_w, b_w)
    assert not torch.equal(a_w, c_w) and a_rows != c_rows
