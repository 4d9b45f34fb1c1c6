"""The device against the CPU (``pytest -m gpu``; part (a) of ``make gpu-check``).

Every test runs the same computation from the same inputs on the device under test and on
the CPU and compares them, or checks on the device a behaviour the CPU suite checks on the
CPU. The device is CUDA when present; without it every test skips with the reason.
``SCLIP_GPU_TEST_DEVICE=cpu`` makes the CPU the device under test (``make gpu-check
DEVICE=cpu``): the comparisons then run end to end, CPU against CPU, so their own logic is
tested where no GPU is.

Tolerances. Both sides compute in float32 with TF32 off (:func:`full_float32`): the
remaining differences come from the order in which the kernels sum. For the losses and
assigners the tolerance is measured, not guessed: the same computation runs in float64 on
the CPU, and the device may differ from the CPU's float32 by at most ``FACTOR`` times the
CPU float32's own distance to float64 (plus a floor of 1e-6 of the tensor's scale). Both
float32 results carry rounding errors of the same kind (a few ulps per reduction, times the
conditioning of the computation: the release's ``sim / sum(sim)`` keyword weights or a
Sinkhorn plan at s = 100 amplify them, and the measured bound grows with them); a factor of
10 covers two independent summation orders with room to spare, and a real bug (a wrong
mask, a lost gradient path, a float16 downcast) is off by orders of magnitude more.
Trainer-level tests use fixed tolerances, justified where they are used.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import SGDModule, quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.callbacks import NonFiniteGuard
from sclip_lightning.losses import (
    CLIPLoss,
    HardNNAssigner,
    OTAssigner,
    SCLIPLoss,
    SoftNNAssigner,
    UnbalancedOTAssigner,
)
from sclip_lightning.losses.objective import Features


def _device() -> str | None:
    forced = os.environ.get("SCLIP_GPU_TEST_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _device()
ACCELERATOR = "gpu" if DEVICE and DEVICE.startswith("cuda") else "cpu"
FACTOR = 10.0

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE is None,
        reason="no CUDA device (SCLIP_GPU_TEST_DEVICE=cpu runs these comparisons on the CPU)",
    ),
]


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in full precision (no TF32) inside the block.

    torch >= 2.9 has one switch (``torch.backends.fp32_precision``); mixing it with the legacy
    ``allow_tf32`` flags raises, so the legacy flags are used only on older torch.
    """
    if hasattr(torch.backends, "fp32_precision"):
        parts = [
            torch.backends,
            torch.backends.cuda.matmul,
            torch.backends.cudnn,
            torch.backends.cudnn.conv,
            torch.backends.cudnn.rnn,
        ]
        saved = [(p, p.fp32_precision) for p in parts]
        torch.backends.fp32_precision = "ieee"  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for p, value in saved:
                p.fp32_precision = value
        return
    legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy


@pytest.fixture(autouse=True)
def _no_tf32():
    with full_float32():
        yield


def assert_close_measured(
    got: torch.Tensor, cpu: torch.Tensor, exact: torch.Tensor, what: str
) -> None:
    """``got`` (device) against ``cpu`` (float32), within FACTOR x the CPU float32's distance
    to ``exact`` (float64) plus 1e-6 of the scale; the message names the numbers."""
    got, cpu, exact = got.detach().cpu().double(), cpu.detach().double(), exact.detach().double()
    rounding = (cpu - exact).abs().max().item() if cpu.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    bound = FACTOR * rounding + 1e-6 * max(scale, 1e-3)
    diff = (got - cpu).abs().max().item() if got.numel() else 0.0
    assert torch.isfinite(got).all(), f"{what}: non-finite on the device"
    assert diff <= bound, (
        f"{what}: device vs CPU max |diff| {diff:.3g} > bound {bound:.3g} "
        f"(CPU float32 vs float64 {rounding:.3g}, scale {scale:.3g})"
    )


def features(n: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def loss_inputs(bp: int = 24, bu: int = 20, k: int = 12, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 1000)
    return {
        "image": features(bp, seed=seed),
        "text": features(bp, seed=seed + 1),
        "unpaired": features(bu, seed=seed + 2),
        "keywords": features(k, seed=seed + 3),
        "candidates": torch.rand(bp, k, generator=g) < 0.3,
        "ids": torch.randperm(2 * bp, generator=g)[:bp],
    }


def run_loss(
    loss: SCLIPLoss, inputs: dict[str, Any], scale: float, device: str, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The loss terms and the gradients of their sum w.r.t. every feature and ``s``."""
    leaves = [
        inputs[k].to(device, dtype).requires_grad_(True)
        for k in ("image", "text", "unpaired", "keywords")
    ]
    s = torch.tensor(scale, device=device, dtype=dtype, requires_grad=True)
    candidates, ids = inputs["candidates"].to(device), inputs["ids"].to(device)
    if dtype == torch.float64:  # forward() casts to float32 (by design): its body, in float64
        out = loss.compute(Features(*leaves[:2], s, leaves[2], leaves[3], candidates, ids))
    else:
        out = loss.to(device)(
            *leaves[:2],
            s,
            unpaired_features=leaves[2],
            keyword_features=leaves[3],
            keyword_candidates=candidates,
            pair_index=ids,
        )
    grads = torch.autograd.grad(sum(out.values()), [*leaves, s], allow_unused=True)
    pairs = zip([*leaves, s], grads, strict=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in pairs]


def compare_loss(make_loss, scale: float, steps: int = 1, **inputs_kw: Any) -> None:
    """One loss object per side (device, CPU float32, CPU float64), ``steps`` calls each (the
    support bank fills between calls); every call's terms and gradients compared."""
    sides = {"device": (DEVICE, torch.float32), "cpu": ("cpu", torch.float32)}
    sides["exact"] = ("cpu", torch.float64)
    losses = {name: make_loss() for name in sides}
    for step in range(steps):
        inputs = loss_inputs(seed=step, **inputs_kw)
        res = {n: run_loss(losses[n], inputs, scale, *sides[n]) for n in sides}
        for term in res["exact"][0]:
            assert_close_measured(
                res["device"][0][term], res["cpu"][0][term], res["exact"][0][term],
                f"step {step} {term}",
            )  # fmt: skip
        names = ("image", "text", "unpaired", "keywords", "logit_scale")
        for i, name in enumerate(names):
            assert_close_measured(
                res["device"][1][i], res["cpu"][1][i], res["exact"][1][i],
                f"step {step} d(total)/d({name})",
            )  # fmt: skip


# ------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("preset", ["released", "recommended"])
@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_sclip_loss_values_and_gradients_match_cpu(preset, scale):
    """S-CLIP's objective (both presets) at the initial and the maximal logit scale."""
    compare_loss(SCLIPLoss.released if preset == "released" else SCLIPLoss, scale)


ASSIGNERS = {
    "ot": lambda: OTAssigner(),
    "ot_log": lambda: OTAssigner(sinkhorn_solver="log"),
    "unbalanced_ot": lambda: UnbalancedOTAssigner(),
    "soft_nn": lambda: SoftNNAssigner(),
    "hard_nn": lambda: HardNNAssigner(),
}


@pytest.mark.parametrize("name", sorted(ASSIGNERS))
@pytest.mark.parametrize("masked", [False, True], ids=["all_support", "masked_support"])
def test_assigner_plans_and_gradients_match_cpu(name, masked):
    """Every built-in assigner, with and without a support mask: the plan and the gradient
    of a fixed linear function of it w.r.t. queries, support and ``s``."""
    bu, s_rows = 20, 28
    query, support_img, support_txt = features(bu, seed=1), features(s_rows, seed=2), None
    support_txt = features(s_rows, seed=3)
    weights = torch.randn(
        bu, s_rows, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    mask = torch.ones(s_rows, dtype=torch.bool)
    if masked:
        mask[[3, 7, 20, 21]] = False
    results = {}
    for side, (device, dtype) in {
        "device": (DEVICE, torch.float32),
        "cpu": ("cpu", torch.float32),
        "exact": ("cpu", torch.float64),
    }.items():
        assigner = ASSIGNERS[name]().to(device)
        q = query.to(device, dtype).requires_grad_(True)
        si = support_img.to(device, dtype).requires_grad_(True)
        st = support_txt.to(device, dtype)
        s = torch.tensor(30.0, device=device, dtype=dtype, requires_grad=True)
        kw = {"support_mask": mask.to(device)} if masked else {}
        plan = assigner(q, si, st, s, **kw)
        objective = (plan * weights.to(device, dtype)).sum()
        grads = (
            torch.autograd.grad(objective, [q, si, s], allow_unused=True)
            if plan.requires_grad
            else (None, None, None)
        )
        results[side] = (plan, grads, q @ si.T)
    if name == "hard_nn":  # a one-hot argmax: equal wherever the top two are not near-tied
        sims = results["exact"][2].detach()
        if masked:
            sims = sims.masked_fill(~mask, -2.0)
        top2 = sims.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(results["device"][0].cpu()[clear], results["cpu"][0][clear])
        return
    assert_close_measured(results["device"][0], results["cpu"][0], results["exact"][0], "plan")
    if masked:
        assert not results["device"][0][:, ~mask.to(DEVICE)].any(), "masked support got weight"
    for i, what in enumerate(("queries", "support", "logit_scale")):
        dev, cpu, exact = (results[k][1][i] for k in ("device", "cpu", "exact"))
        assert (dev is None) == (cpu is None), what
        if dev is not None:
            assert_close_measured(dev, cpu, exact, f"d(plan)/d({what})")


@pytest.mark.parametrize(
    "bank,assigner",
    [(-1, OTAssigner), (-1, UnbalancedOTAssigner), (40, OTAssigner)],
    ids=["all", "all_unbalanced", "fifo40"],
)
def test_support_bank_over_steps_matches_cpu(bank, assigner):
    """The support bank on the device: four steps whose batches share pairs (in-batch bank
    copies masked), the same terms and gradients as the CPU at every step, the bank's rows
    the same, and its tensors on the device."""

    def make() -> SCLIPLoss:
        loss = SCLIPLoss(support_bank_size=bank, assigner=assigner())
        assert loss.bank is not None
        loss.bank.set_capacity(48)
        return loss

    compare_loss(make, 14.3, steps=4)
    loss = make()
    for step in range(3):
        run_loss(loss, loss_inputs(seed=step), 14.3, DEVICE, torch.float32)
    assert loss.bank is not None
    for key, value in loss.bank.state.items():
        assert value.device.type == torch.device(DEVICE).type, key


# ------------------------------------------------------------------- through the Trainer
@pytest.fixture(scope="module")
def small_rsicd(tmp_path_factory):
    """A small data set in RSICD's layout: the Trainer tests need no generated domain, and
    the tower cache's pass over every image stays short on a CPU."""
    from fixtures import write_rsicd

    return write_rsicd(tmp_path_factory.mktemp("rsicd"), {"train": 64, "val": 8, "test": 32})


def _data(root: Any, **kw: Any) -> SCLIPDataModule:
    """Its data module: half of the images paired, 8 keywords mined from the captions."""
    kw = {
        "label_ratio": 0.5,
        "batch_size": 8,
        "unpaired_batch_size": 8,
        "num_workers": 0,
        "keywords": "mine",
        "num_keywords": 8,
    } | kw
    return SCLIPDataModule(dataset="rsicd", root=str(root), **kw)


def _trainer(**kw: Any) -> L.Trainer:
    return quiet_cpu_trainer(accelerator=ACCELERATOR, devices=1, **kw)


class NaNAtStep(SCLIPModule):
    """The caption loss is NaN at training step 3."""

    def compute_losses(self, batch):
        losses = super().compute_losses(batch)
        if self.trainer.global_step == 3:
            losses["caption_loss"] = losses["caption_loss"] * float("nan")
        return losses


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = {
            n: p.detach().clone() for n, p in module.named_parameters()
        }


def test_nonfinite_guard_cancels_the_step_inside_fused_adamw(small_rsicd):
    """A NaN loss at step 3 on the device: fused AdamW (the module's optimiser) skips that
    update in its kernel (found_inf), the weights of step 3 are exactly those of step 4,
    AdamW's step count leaves it out, training goes on, the guard's record is on the device."""
    module = NaNAtStep(model_name="sclip-tiny", lr=1e-3, warmup_steps=0, nonfinite="skip")
    snaps = Snapshots()
    trainer = _trainer(max_steps=6, callbacks=[snaps])
    trainer.fit(module, datamodule=_data(small_rsicd))
    opt = trainer.optimizers[0]
    assert opt.defaults.get("fused"), "the module's AdamW is not fused on this device"
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.steps.device.type == torch.device(DEVICE).type
    assert int(guard.steps) == 1 and int(guard.first_step) == 3
    for n, p in snaps.before[3].items():
        assert torch.equal(p, snaps.before[4][n]), n
    assert any(not torch.equal(snaps.before[4][n], snaps.before[5][n]) for n in snaps.before[4])
    assert {int(s["step"]) for s in opt.state.values()} == {5}
    assert all(torch.isfinite(p).all() for p in module.parameters())


TINY_TIMM = "sclip-gpu-timm"


@pytest.fixture(scope="module")
def timm_tower_model(tmp_path_factory) -> str:
    """An open_clip model JSON: a tiny timm EfficientNet image tower (BatchNorm, block
    boundaries: the tower cache's cut) + open_clip's own text tower; no weights package."""
    from sclip_lightning.models import register_model_configs

    folder = tmp_path_factory.mktemp("gpu-models")
    (folder / f"{TINY_TIMM}.json").write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {
                    "timm_model_name": "test_efficientnet",
                    "timm_model_pretrained": False,
                    "timm_pool": "avg",
                    "timm_proj": "linear",
                    "image_size": 32,
                },
                "text_cfg": {
                    "context_length": 32,
                    "vocab_size": 49408,
                    "width": 64,
                    "heads": 2,
                    "layers": 2,
                },
            }
        )
    )
    register_model_configs(folder)
    return TINY_TIMM


def _cached_run(model_name: str, root: Any, cache: str | None, unlocked: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    dm = _data(root, model_name=model_name, eval_batch_size=16, augment=False)
    m = SGDModule(
        model_name=model_name,
        tower_cache=cache,
        lock_image=True,
        lock_image_unlocked_groups=unlocked,
        lr=0.5,
        warmup_steps=1,
    )
    initial = {k: v.detach().cpu().clone() for k, v in m.model.state_dict().items()}
    trainer = _trainer(max_steps=6, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(m, dm)
    trainer.test(m, dm, verbose=False)
    return {
        "initial": initial,
        "weights": {k: v.detach().cpu().clone() for k, v in m.model.state_dict().items()},
        "rows": m.test_results,
        "cut": {k: split.boundary for k, split in (m.towers.splits if m.towers else {}).items()},
    }


@pytest.mark.parametrize("unlocked", [0, 2], ids=["locked", "top_blocks_unlocked"])
def test_tower_cache_equals_the_uncached_path(small_rsicd, timm_tower_model, unlocked):
    """Image tower locked (or its top blocks trainable through the block-boundary cut), on
    the device: cached and uncached training end with the same weights and test metrics.

    Tolerance 1e-4: the cache pass runs the frozen part in batches of 16, training in
    batches of 8; the kernels chosen per shape sum in another order (float32 rounding,
    1e-7 relative per reduction), carried through 6 SGD steps at lr 0.5 and BatchNorm batch
    statistics in the unlocked blocks; the CPU suite needs 1e-5 / 1e-4 for the same reason.
    A cache serving wrong or stale rows moves weights by 1e-2 and more."""
    plain = _cached_run(timm_tower_model, small_rsicd, None, unlocked)
    cached = _cached_run(timm_tower_model, small_rsicd, "image", unlocked)
    assert list(cached["cut"]) == ["image"] and not plain["cut"]
    if unlocked:
        assert "module" in cached["cut"]["image"]  # cut at a block boundary
    head = [k for k in plain["weights"] if k.startswith("visual.head")]
    assert any(not torch.equal(plain["weights"][k], plain["initial"][k]) for k in head)
    for k, w in plain["weights"].items():
        torch.testing.assert_close(cached["weights"][k], w, atol=1e-4, rtol=1e-4, msg=k)
    # metrics (percent of 32 test images): on the CPU the two paths give the same ranks; on
    # a GPU, features that differ by rounding can swap near-tied neighbours (random-init
    # features crowd the similarities together), so two of the 32 images may change rank
    tol = 1e-3 if torch.device(DEVICE).type == "cpu" else 2 * 100 / 32
    for a, b in zip(plain["rows"], cached["rows"], strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, abs=tol), key


@pytest.mark.parametrize(
    "criterion",
    [
        SCLIPLoss,
        lambda: SCLIPLoss(support_bank_size=-1, assigner=UnbalancedOTAssigner()),
        lambda: SCLIPLoss.released(keyword_weighting="softmax"),
        CLIPLoss,
    ],
    ids=["sclip", "sclip_bank_unbalanced", "sclip_released_ot", "clip"],
)
def test_bf16_mixed_steps_are_finite(small_rsicd, criterion):
    """bf16-mixed on the device: finite losses, no non-finite step, float32 master weights
    that moved and stayed finite (the losses run in float32/float64 inside autocast)."""
    L.seed_everything(0, verbose=False)
    module = SCLIPModule(model_name="sclip-tiny", criterion=criterion(), lr=1e-3, warmup_steps=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer(max_steps=3, precision="bf16-mixed", log_every_n_steps=1)
    trainer.fit(module, datamodule=_data(small_rsicd))
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert int(guard.steps) == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for n, p in module.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), n
    assert any(not torch.equal(p.cpu(), before[n].cpu()) for n, p in module.named_parameters())


def module_batch(module: SCLIPModule, bp: int = 8, bu: int = 8, seed: int = 0) -> dict:
    """A fixed training batch for ``module`` (random pixels, captions naming keywords)."""
    g = torch.Generator().manual_seed(seed)
    size = module.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    words = ["lake", "forest", "river", "beach"]
    tokens = module.tokenizer([f"a photo of a {words[i % 4]} number {i}" for i in range(bp)])
    return {
        "paired": {
            "image": torch.randn(bp, 3, size, size, generator=g),
            "text": tokens,
            "keywords": torch.rand(bp, len(words), generator=g) < 0.5,
        },
        "unpaired": {"image": torch.randn(bu, 3, size, size, generator=g)},
    }


def test_module_step_losses_and_gradients_match_cpu():
    """The whole S-CLIP step of the module (towers + objective), same weights and batch on
    the device and on the CPU: the loss terms and every parameter's gradient.

    Tolerance: loss terms rtol 1e-4; gradients atol 1e-4 of the largest gradient plus rtol
    1e-3. Measured on the CPU for this model and batch: the float32 step against the same
    step with float64 towers differs by 2.3e-7 relative on the loss terms and by 7.7e-7 of
    the largest gradient (1 against 2 threads: 2e-8), so the bounds leave a margin of 100x
    for the device's other summation orders (attention and convolution kernels). A broken
    path (a term missing on one device, a detached plan) differs by 1e-2 and more."""
    vocab = ["lake", "forest", "river", "beach"]
    torch.manual_seed(0)
    cpu_module = SCLIPModule(model_name="sclip-tiny", keyword_vocabulary=vocab)
    dev_module = SCLIPModule(model_name="sclip-tiny", keyword_vocabulary=vocab)
    dev_module.load_state_dict(cpu_module.state_dict())
    for m in (cpu_module, dev_module):
        m.setup("fit")
    dev_module.to(DEVICE)
    batch = module_batch(cpu_module)

    def to(obj: Any, device: str) -> Any:
        if isinstance(obj, dict):
            return {k: to(v, device) for k, v in obj.items()}
        return obj.to(device)

    results = {}
    for side, module, device in (("cpu", cpu_module, "cpu"), ("device", dev_module, DEVICE)):
        module.train()
        losses = module.compute_losses(to(batch, device))
        sum(losses.values()).backward()
        grads = {
            n: p.grad.detach().cpu() for n, p in module.named_parameters() if p.grad is not None
        }
        results[side] = ({k: v.detach().cpu() for k, v in losses.items()}, grads)
    for k, v in results["cpu"][0].items():
        torch.testing.assert_close(results["device"][0][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert results["cpu"][1].keys() == results["device"][1].keys()
    largest = max(g.abs().max().item() for g in results["cpu"][1].values())
    for n, g in results["cpu"][1].items():
        torch.testing.assert_close(
            results["device"][1][n], g, rtol=1e-3, atol=1e-4 * largest, msg=n
        )
