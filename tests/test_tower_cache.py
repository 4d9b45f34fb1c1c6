"""The tower-output cache: same training and evaluation as the uncached path, clear errors,
files keyed by everything they depend on, and the same numbers under 2-process DDP.

Cached and uncached runs compare in float64 (``precision="64-true"``). The two paths compute
the same values in different orders (the cache pass batches the frozen part otherwise, in
channels-last layout, with BatchNorm folded into the convolutions), so in float32 they
differ by rounding that depends on the CPU's kernels; in float64 that rounding is 2^-53 =
1.1e-16 per operation, and a comparison at 1e-10 has room for it while any wrong computation
(a wrong cut, a stale or mis-folded weight) moves values by far more.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import SGDModule, quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.towers import fold_batchnorm, image_split, text_split

ROOT = Path(__file__).resolve().parents[1]
#: cached vs uncached weights after a few float64 steps. Each path's values carry rounding of
#: a few units of 2^-53 = 1.1e-16 per operation, accumulated over the towers' sums (fewer than
#: 10^3 terms) and grown by the SGD steps (lr 0.5). The losses take float32 features
#: (losses/sclip.py): where a feature's float32 rounding differs between the paths (1 of the
#: 4,896 loss inputs of the top-blocks case below) the weights move apart by ~1e-12. Measured
#: on this CPU: at most 1.6e-15 with the towers locked, 8.6e-13 with top blocks training (a
#: BatchNorm running variance of 4.4). 1e-10 is 100x above that, and far below what a wrong
#: computation does: a block cached by mistake does not train (its weights off by 0.1-1.5), a
#: BatchNorm folded without its eps moves the heads by 7e-6. atol, not only rtol: entries that
#: are 0 in exact arithmetic (a BatchNorm bias before another batch-statistics BatchNorm gets no
#: gradient) hold rounding noise (~1e-16).
F64 = dict(rtol=1e-10, atol=1e-10)


def _differing(got: dict, want: dict) -> str:
    """The entries of two state dicts that differ beyond :data:`F64`, one a line ("" if none)."""
    assert got.keys() == want.keys()
    return "\n".join(
        f"{k}: {got[k].dtype} vs {want[k].dtype}, "
        f"max |diff| {(got[k].double() - want[k].double()).abs().max():.3g}"
        for k in want
        if got[k].dtype != want[k].dtype
        or (want[k].is_floating_point() and not torch.allclose(got[k], want[k], **F64))
        or (not want[k].is_floating_point() and not torch.equal(got[k], want[k]))
    )


def _run(model_name, cache, steps=6, cache_dir=None, seed=0, precision="64-true", **module_kw):
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
    trainer = quiet_cpu_trainer(
        max_steps=steps, limit_val_batches=2, num_sanity_val_steps=0, precision=precision
    )
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
    """float64: weights equal to 1e-10 after a few steps (the trainable heads moved, the
    frozen parts did not) and identical test metrics."""
    name, _ = tiny_lit
    kw = dict(lock_image_unlocked_groups=unlocked)
    _, before, plain, plain_rows = _run(name, None, **kw)
    m, before2, cached, cached_rows = _run(name, cache, **kw)
    assert before.keys() == before2.keys()
    for k in before:
        assert torch.equal(before2[k], before[k]), k  # same initialisation, bit for bit
    differing = _differing(cached, plain)
    assert not differing, "cached != uncached:\n" + differing
    moved = {k for k in before if not torch.equal(before[k], plain[k])}
    assert any(k.startswith("visual.head") for k in moved)
    assert any(k.startswith("text.proj") for k in moved)
    assert not any(k.startswith("text.transformer") for k in moved)
    if unlocked:  # the unlocked top blocks trained (through the block-boundary cut)
        assert any(k.startswith("visual.trunk.blocks") for k in moved)
        assert "module" in m.towers.splits["image"].boundary
    else:
        assert not any(k.startswith("visual.trunk") for k in moved)
    # the metrics are ranks of similarities of features that agree to ~1e-13 (evaluation
    # rounds them to float32 first): they could differ only through a near-tie that the
    # rounding splits, so they must be equal, not close
    assert plain_rows and [a.keys() for a in plain_rows] == [b.keys() for b in cached_rows]
    assert plain_rows == cached_rows


@pytest.mark.parametrize("unlocked", [0, 2], ids=["trunk", "top_blocks_unlocked"])
def test_inference_copy_equals_the_frozen_part(tiny_lit, unlocked):
    """The cache pass's copy of the frozen image part (BatchNorm folded, channels-last, CPU
    batches) computes what the frozen part computes: float64, BatchNorm statistics and
    affine parameters made non-trivial first (a fresh BatchNorm folds to the identity), a
    batch larger than the CPU batch; the model's own modules are left untouched."""
    name, _ = tiny_lit
    torch.manual_seed(0)
    m = SCLIPModule(model_name=name, lock_image=True, lock_image_unlocked_groups=unlocked)
    model = m.model.double()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.2, 3)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)
    split = image_split(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = split.frozen(x)
        assert split.inference is not None
        got = split.inference()(x)
    assert got.shape == want.shape and got.is_contiguous()
    # float64, a few layers of sums of fewer than 10^3 terms: rounding ~1e-14 of the scale
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # folded on a copy
    # every BatchNorm of the trunk folds in eval mode (what the cache pass's speed rests on);
    # a training-mode one (an unlocked block's batch statistics) never does
    trunk = copy.deepcopy(model.visual.trunk).train()
    norms = sum(isinstance(b, torch.nn.BatchNorm2d) for b in trunk.modules())
    assert fold_batchnorm(trunk) == 0
    assert fold_batchnorm(trunk.eval()) == norms > 0


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
    """float32 (the files most runs use): a second run reads the files and trains to the same
    weights bit for bit (the same computation on the same stored values); other frozen
    weights or another precision of the frozen weights write other files."""
    name, _ = tiny_lit
    cache_dir = tmp_path / "outputs"
    run = dict(steps=2, cache_dir=str(cache_dir), precision="32-true")
    _, _, first, _ = _run(name, "both", **run)
    files = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt")}
    assert len(files) >= 4  # train images + captions, val and test sets
    _, _, again, _ = _run(name, "both", **run)
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt")} == files  # read
    for k in first:
        assert torch.equal(again[k], first[k]), k
    # other frozen weights (another seed's random tower): other files, nothing reused
    _run(name, "both", **{**run, "seed": 1})
    assert len(list(cache_dir.glob("*.pt"))) == 2 * len(files)
    # float64 frozen weights compute other outputs: not the float32 files
    _run(name, "both", **{**run, "precision": "64-true"})
    assert len(list(cache_dir.glob("*.pt"))) == 3 * len(files)


@pytest.mark.ddp
def test_two_process_cached_run_equals_uncached(synthetic_root, tiny_lit, tmp_path):
    """2 gloo processes, float64: cached and uncached fits end with the same weights (to 1e-10,
    see F64); the cache pass is split across the ranks and gathered."""
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
    differing = _differing(out["both"], out["none"])
    assert not differing, "cached != uncached:\n" + differing
