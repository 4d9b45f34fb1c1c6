"""The tower-output cache: same training and evaluation as the uncached path, clear errors,
files keyed by everything they depend on, and the same numbers under 2-process DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import SGDModule, quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.towers import image_split, text_split

ROOT = Path(__file__).resolve().parents[1]


def _run(model_name, cache, steps=6, cache_dir=None, seed=0, **module_kw):
    """``fit`` a few steps then ``test``; returns (module, state before, state after, rows)."""
    L.seed_everything(seed, verbose=False)
    dm = SCLIPDataModule(
        model_name=model_name,
        batch_size=8,
        unpaired_batch_size=8,
        eval_batch_size=32,
        num_workers=0,
        augment=False,
        label_ratio=0.1,
    )
    kw = dict(lock_image=True, lock_text=True, lr=0.5, warmup_steps=1) | module_kw
    m = SGDModule(model_name=model_name, tower_cache=cache, tower_cache_dir=cache_dir, **kw)
    before = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
    trainer = quiet_cpu_trainer(max_steps=steps, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(m, dm)
    trainer.test(m, dm, verbose=False)
    after = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
    return m, before, after, m.test_results


@pytest.mark.parametrize(
    "cache,unlocked",
    [("both", 0), ("image", 0), ("text", 0), ("both", 2)],
    ids=["both", "image", "text", "image_top_blocks_unlocked"],
)
def test_cached_training_equals_uncached(synthetic_root, tiny_lit, cache, unlocked):
    """Values equal to 1e-5 after a few steps: weights (the trainable heads moved, the frozen
    parts did not), the test metrics, and the frozen part never ran on pixels in training."""
    name, _ = tiny_lit
    kw = dict(lock_image_unlocked_groups=unlocked)
    _, before, plain, plain_rows = _run(name, None, **kw)
    m, before2, cached, cached_rows = _run(name, cache, **kw)
    assert before.keys() == before2.keys()
    # with top blocks unlocked their BatchNorm uses batch statistics, whose float rounding
    # follows how the frozen part's outputs were batched (cache pass vs training step)
    rtol = 1e-4 if unlocked else 1e-5
    for k in before:
        torch.testing.assert_close(before2[k], before[k])  # same initialisation
        torch.testing.assert_close(cached[k], plain[k], atol=1e-5, rtol=rtol)
    moved = {k for k in before if not torch.equal(before[k], plain[k])}
    assert any(k.startswith("visual.head") for k in moved)
    assert any(k.startswith("text.proj") for k in moved)
    assert not any(k.startswith("text.transformer") for k in moved)
    if unlocked:  # the unlocked top blocks trained (through the block-boundary cut)
        assert any(k.startswith("visual.trunk.blocks") for k in moved)
        assert "module" in m.towers.splits["image"].boundary
    else:
        assert not any(k.startswith("visual.trunk") for k in moved)
    for a, b in zip(plain_rows, cached_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=1e-3), key


def test_cache_errors_name_the_setting(synthetic_root, tiny_lit):
    name, _ = tiny_lit
    with pytest.raises(ValueError, match="tower_cache must be one of"):
        SCLIPModule(model_name=name, tower_cache="images")
    dm = SCLIPDataModule(model_name=name, num_workers=0, batch_size=8, unpaired_batch_size=8)
    m = SCLIPModule(model_name=name, lock_image=True, lock_text=True, tower_cache="both")
    with pytest.raises(ValueError, match="augment: false"):  # random crops: not cacheable
        quiet_cpu_trainer(max_steps=1).fit(m, dm)
    dm = SCLIPDataModule(model_name=name, num_workers=0, augment=False)
    m = SCLIPModule(model_name=name, lock_text=True, tower_cache="image")
    with pytest.raises(ValueError, match="lock_image: true"):  # image tower not locked
        quiet_cpu_trainer(max_steps=1).fit(m, dm)
    m = SCLIPModule(model_name=name, lock_image=True, tower_cache="text")
    with pytest.raises(ValueError, match="lock_text: true"):
        quiet_cpu_trainer(max_steps=1).fit(m, dm)
    m = SCLIPModule(model_name="sclip-tiny", lock_image=True, lock_image_unlocked_groups=1)
    with pytest.raises(ValueError, match="not fully locked"):
        image_split(m.model)
    m = SCLIPModule(model_name="sclip-tiny", lock_text=True)
    assert text_split(m.model).boundary == "open_clip text transformer"


def test_cache_files_are_reused_and_never_stale(synthetic_root, tiny_lit, tmp_path):
    name, _ = tiny_lit
    cache_dir = tmp_path / "outputs"
    _, _, first, _ = _run(name, "both", steps=2, cache_dir=str(cache_dir))
    files = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt")}
    assert len(files) >= 4  # train images + captions, val and test sets
    _, _, again, _ = _run(name, "both", steps=2, cache_dir=str(cache_dir))
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt")} == files  # read
    for k in first:
        torch.testing.assert_close(again[k], first[k])
    # other frozen weights (another seed's random tower): other files, nothing reused
    _run(name, "both", steps=2, cache_dir=str(cache_dir), seed=1)
    assert len(list(cache_dir.glob("*.pt"))) == 2 * len(files)


@pytest.mark.ddp
def test_two_process_cached_run_equals_uncached(synthetic_root, tiny_lit, tmp_path):
    """2 gloo processes: cached and uncached fits end with the same weights; the cache pass
    is split across the ranks and gathered."""
    name, folder = tiny_lit
    script = ROOT / "tests" / "ddp_cache_check.py"
    out = {}
    for cache in ("none", "both"):
        path = tmp_path / f"{cache}.pt"
        proc = subprocess.run(
            [sys.executable, str(script), str(path), cache, str(folder), str(synthetic_root)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[cache] = torch.load(path)
    for k, w in out["none"].items():
        torch.testing.assert_close(out["both"][k], w, atol=1e-5, rtol=1e-5, msg=k)
