"""SemiCLIP: 2 CPU processes (gloo) with half the batch each == 1 process with the whole
batch (loss, tower gradients and the objective's own parameters: E, c, the context)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from losses.test_semiclip import ToySurrogates, bare

from sclip_lightning.losses import SemiCLIPLoss

pytestmark = pytest.mark.ddp

BP, BU, K, D_IN, D, W = 8, 12, 6, 10, 16, 5

# As tests/losses/test_ddp.py: the towers run in float64, so both runs hand SemiCLIPLoss
# (float32) the same rounded features; its loss and gradients then agree up to float64
# rounding in the towers and the all-reduce (~1e-15), or, for a feature within ~1e-16 of a
# float32 rounding midpoint, one float32 ulp of a feature, which moves the loss and the
# gradients by < 1e-5 (the S-CLIP DDP test measured 3.7e-6 for rounding every feature the
# other way). Skipping the other rank's rows in a gradient moves it by tens of percent.
TOL = dict(atol=1e-5, rtol=1e-5)


def make_inputs():
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    return {
        "x": torch.randn(BP, D_IN, generator=g, dtype=f64),
        "t": torch.randn(BP, D_IN, generator=g, dtype=f64),
        "uw": torch.randn(BU, D_IN, generator=g, dtype=f64),
        "us": torch.randn(BU, D_IN, generator=g, dtype=f64),
        "index": torch.randperm(BU + 4, generator=g)[:BU],
        "pair_index": torch.arange(BP),
    }


class Model(torch.nn.Module):
    """float64 towers and the objective, as the LightningModule holds them."""

    def __init__(self, stage):
        super().__init__()
        torch.manual_seed(1)
        self.img = torch.nn.Linear(D_IN, D, dtype=torch.float64)
        self.txt = torch.nn.Linear(D_IN, D, dtype=torch.float64)
        g = torch.Generator().manual_seed(2)
        e = F.normalize(torch.randn(K, D, generator=g), dim=-1)
        loss = (
            SemiCLIPLoss(stage=1, in_modal_weight=1.0)
            if stage == 1
            else SemiCLIPLoss(stage=2, stage1_logits="unused.pt", in_modal_weight=3.0)
        )
        self.criterion = bare(
            loss,
            e,
            labels=(torch.rand(BP, K, generator=g) < 0.4).float(),
            table=torch.randn(BU + 4, K, generator=g) * 3,
            surrogates=ToySurrogates(K, D, W),
        )
        self.criterion.context.data = torch.randn(3, W, generator=g)
        self.criterion.concept_log_scale.data.fill_(math.log(20.0))

    def forward(self, inp):
        n = lambda t: F.normalize(t, dim=-1)  # noqa: E731
        return self.criterion(
            n(self.img(inp["x"])),
            n(self.txt(inp["t"])),
            torch.tensor(14.0, dtype=torch.float64),
            n(self.img(inp["uw"])),
            pair_index=inp["pair_index"],
            unpaired_strong_features=n(self.img(inp["us"])),
            unpaired_index=inp["index"],
        )


def _worker(rank, world, init_file, stage, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    local = {k: v.chunk(world)[rank] for k, v in make_inputs().items()}
    model = torch.nn.parallel.DistributedDataParallel(Model(stage))
    loss = sum(model(local).values())
    loss.backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_two_process_semiclip_equals_one_process(stage):
    model = Model(stage)
    loss = sum(model(make_inputs()).values())
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {"img.weight", "txt.weight", "criterion.concept_embeddings"}
    expected |= {"criterion.concept_log_scale"} | ({"criterion.context"} if stage == 2 else set())
    assert expected <= set(ref)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), stage, out), nprocs=2, join=True)
        got = torch.load(out, weights_only=True)
    torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
    assert got["grads"].keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got["grads"][name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")
