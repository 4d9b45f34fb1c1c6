"""2 CPU processes (gloo) with half the batch each == 1 process with the whole batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sclip_lightning.losses import SCLIPLoss

pytestmark = pytest.mark.ddp

BP, BU, K, D_IN, D = 8, 12, 5, 10, 6

# The two runs compute the towers on batches of different shapes (half batches, other kernels,
# other summation orders) and all-reduce the gradients. In float32 every feature would differ
# by rounding on any CPU, and multi-step comparisons would grow it. So the towers run in
# float64: the features of the two runs agree to ~1e-16 and round to the same float32 values
# inside SCLIPLoss (which computes in float32), whose loss and gradients are then bit-identical
# in both runs (same inputs, same shapes: the global batch on every rank); what is left is
# float64 rounding in the towers and the all-reduce, ~1e-15. The one other way to differ: a
# feature within ~1e-16 of a float32 rounding midpoint rounds the other way in one run (odds
# ~1e-9 per element). Rounding *every* feature and the scale to the other float32 neighbour
# moves the loss, gradients, 3-step weights and bank rows by at most 3.7e-6 (measured, both
# presets, 5 random directions), so TOL covers even that. Gradients that skip the other
# rank's rows move by 50% (3.7 absolute), a bank gathered in the wrong rank order by 1.6.
TOL = dict(atol=1e-5, rtol=1e-5)


def close(actual, expected, what, **tol):
    """assert_close whose message names the tensor and keeps the numbers."""
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return {
        "x": torch.randn(BP, D_IN, generator=g, dtype=f64),
        "y": torch.randn(BP, D_IN, generator=g, dtype=f64),
        "u": torch.randn(BU, D_IN, generator=g, dtype=f64),
        "k": torch.randn(K, D_IN, generator=g, dtype=f64),
        "cand": torch.rand(BP, K, generator=g) < 0.4,
    }


class Towers(torch.nn.Module):
    """float64 towers (see TOL)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.img = torch.nn.Linear(D_IN, D, dtype=torch.float64)
        self.txt = torch.nn.Linear(D_IN, D, dtype=torch.float64)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, x, y, u, k):
        n = lambda t: F.normalize(t, dim=-1)  # noqa: E731
        return (
            n(self.img(x)),
            n(self.txt(y)),
            n(self.img(u)),
            n(self.txt(k)),
            self.logit_scale.exp(),
        )


def loss_of(preset, towers, inp, gather):
    # linear keyword weighting is sensitive to tiny reorderings; keep the release's values
    xf, yf, uf, kf, s = towers(inp["x"], inp["y"], inp["u"], inp["k"])
    crit = (SCLIPLoss.released if preset == "released" else SCLIPLoss)(gather_distributed=gather)
    return sum(crit(xf, yf, s, uf, kf, inp["cand"]).values())


def _worker(rank, world, init_file, preset, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    full = make_inputs()
    local = {
        "x": full["x"].chunk(world)[rank],
        "y": full["y"].chunk(world)[rank],
        "u": full["u"].chunk(world)[rank],
        "k": full["k"],
        "cand": full["cand"].chunk(world)[rank],
    }
    towers = torch.nn.parallel.DistributedDataParallel(Towers())
    loss = loss_of(preset, towers, local, gather=True)
    loss.backward()
    if rank == 0:
        torch.save(
            {
                "loss": loss.detach(),
                "grads": {n: p.grad for n, p in towers.module.named_parameters()},
            },
            out_file,
        )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["released", "recommended"])
def test_two_process_gradients_equal_one_process(preset):
    towers = Towers()
    loss = loss_of(preset, towers, make_inputs(), gather=False)
    loss.backward()
    ref = {n: p.grad for n, p in towers.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), preset, out), nprocs=2, join=True)
        got = torch.load(out, weights_only=True)
    close(got["loss"], loss.detach(), "loss", **TOL)
    for name, g in ref.items():
        close(got["grads"][name], g, name, **TOL)


@pytest.mark.parametrize(
    "objective",
    # the released preset's DDP gradients are also checked without the Trainer above;
    # its Trainer run (37 s) is in `make test-slow`
    ["recommended", pytest.param("released", marks=pytest.mark.slow)],
)
def test_trainer_ddp_step_equals_single_device_step(objective, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "ddp_trainer_check.py"
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"w{devices}.pt"
        proc = subprocess.run(
            [sys.executable, str(script), str(out), str(devices), objective],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    for name, w in one["before"].items():
        assert torch.equal(two["before"][name], w), name  # same initialisation
    moved = [n for n, w in one["after"].items() if not torch.equal(w, one["before"][n])]
    assert any("visual" in n for n in moved) and any("transformer" in n for n in moved)
    assert one["grads"].keys() == two["grads"].keys()
    # float64 towers (see ddp_trainer_check.py), SCLIPLoss in float32 over the same global
    # batch in another row order: its sums run in other orders. A float32 inner product of
    # D = 64 terms is exact for factors perturbed by <= gamma_64 = 64 * 2^-24 relative, in
    # any order; perturbing every feature the loss gets by +-gamma_64 (10 sign patterns)
    # moves every gradient by <= 3e-5 of its largest element. The tolerance is 2e-4 of it
    # (measured: <= 9e-7 on 4 kernel sets); gradients not averaged over the ranks, or a rank's
    # half of the batch left out, change them by tens of percent.
    for name, g in one["grads"].items():
        close(two["grads"][name], g, name, rtol=0, atol=2e-4 * float(g.abs().max()))
    for name, w in one["after"].items():  # the SGD steps, likewise
        step, before = w - one["before"][name], one["before"][name]
        atol = 2e-4 * float(step.abs().max())
        close(two["after"][name] - before, step, f"step of {name}", rtol=0, atol=atol)


BANK_STEPS = 3


def _bank_run(towers, crit, world=1, rank=0):
    """BANK_STEPS SGD steps on fresh global batches (ids 8s..8s+7) with the bank on."""
    opt = torch.optim.SGD(towers.parameters(), lr=0.5)
    losses = []
    for step in range(BANK_STEPS):
        full = make_inputs(seed=step)
        ids = torch.arange(BP) + BP * step if step < 2 else torch.arange(BP)  # step 2 repeats
        part = {k: v if k == "k" else v.chunk(world)[rank] for k, v in full.items()}
        xf, yf, uf, kf, s = towers(part["x"], part["y"], part["u"], part["k"])
        loss = sum(
            crit(xf, yf, s, uf, kf, part["cand"], pair_index=ids.chunk(world)[rank]).values()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _bank_worker(rank, world, init_file, size, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    towers = torch.nn.parallel.DistributedDataParallel(Towers())
    crit = SCLIPLoss(support_bank_size=size, gather_distributed=True)
    crit.bank.set_capacity(2 * BP)
    losses = _bank_run(towers, crit, world, rank)
    torch.save(
        {
            "losses": losses,
            "weights": {n: p.detach() for n, p in towers.module.named_parameters()},
            "bank": crit.bank.state,
        },
        f"{out_file}.{rank}",
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("size", [-1, 12])
def test_two_process_support_bank_equals_one_process(size):
    """The bank holds the gathered global batch: identical on both ranks and equal to the
    bank, losses and weights of one process over BANK_STEPS steps."""
    towers = Towers()
    crit = SCLIPLoss(support_bank_size=size)
    crit.bank.set_capacity(2 * BP)
    ref_losses = _bank_run(towers, crit)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_bank_worker, args=(2, os.path.join(tmp, "init"), size, out), nprocs=2, join=True)
        got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for key, value in crit.bank.state.items():
        assert torch.equal(got[0]["bank"][key], got[1]["bank"][key]), key
        close(got[0]["bank"][key], value, key, **TOL)
    close(got[0]["losses"], ref_losses, "losses", **TOL)
    for name, w in towers.named_parameters():
        close(got[0]["weights"][name], w.detach(), name, **TOL)
