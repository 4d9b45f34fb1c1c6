"""SemiCLIP's terms against the release's arithmetic (bench/semiclip_reference.py), the
objective's stages, its released preset and its options."""

from __future__ import annotations

import math

import pytest
import semiclip_reference as ref
import torch
import torch.nn.functional as F

from sclip_lightning.losses import SemiCLIPLoss
from sclip_lightning.losses.concept import (
    concept_logits,
    concept_loss,
    multi_hot_targets,
    top_k_targets,
)
from sclip_lightning.losses.semiclip import RELEASED_SEMICLIP
from sclip_lightning.losses.trapezoid import trapezoid_losses

# Tolerances. float64 comparisons keep assert_close's float64 defaults (errors < 1e-12).
# SemiCLIPLoss computes in float32 whatever its inputs; the reference (the release's
# arithmetic) runs on the same float32 inputs in another order (s multiplied in and divided
# out, other reductions). Products of D = 16 unit-vector components are exact for factors
# perturbed by gamma_16 = 16 * 2^-24 ~ 1e-6 relative in any summation order (Higham Sec. 3.1);
# the logits are at most exp(c) <= 100 so their rounding is <= 1e-4 absolute before the
# log-softmax, which is 1-Lipschitz, and the trapezoid terms are sums of squares of
# differences of such products divided by N^2. The 1e-5 relative to the loss (at
# least 1) and to the largest gradient element covers these bounds (measured: <= 1e-6).
REL = 1e-5


def close_f32(actual, expected, what=""):
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=REL * scale, msg=lambda m: f"{what}: {m}"
    )


def unit(*shape, g, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ----------------------------------------------------------------- terms, float64
@pytest.mark.parametrize("n,k", [(6, 5), (9, 12)])
def test_concept_terms_equal_the_release_in_float64(n, k):
    g = torch.Generator().manual_seed(n + k)
    f, e = unit(n, 8, g=g, dtype=torch.float64), unit(k, 8, g=g, dtype=torch.float64)
    c = torch.tensor(math.log(30.0), dtype=torch.float64)
    y = (torch.rand(n, k, generator=g) < 0.3).double()
    y[0] = 0  # an image without a concept
    torch.testing.assert_close(concept_logits(f, e, c), ref.concept_logits(f, e, c))
    torch.testing.assert_close(multi_hot_targets(y, 1e-8), ref.normalised_multi_hot(y))
    z = concept_logits(f, e, c)
    torch.testing.assert_close(
        concept_loss(z, multi_hot_targets(y, 1e-8), True),
        ref.soft_cross_entropy(z, ref.normalised_multi_hot(y)),
    )
    q = top_k_targets(z, 3, 1e-8)
    torch.testing.assert_close(q, ref.topk_uniform_targets(z, k, 3).to(q))


def test_concept_loss_without_empty_rows_averages_over_images_with_concepts():
    z = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.float64)
    t = multi_hot_targets(y)
    assert torch.equal(t[0], torch.tensor([0.5, 0, 0.5], dtype=torch.float64))
    logp = F.log_softmax(z, dim=1)
    per_row = -(t * logp).sum(1)
    torch.testing.assert_close(concept_loss(z, t, False), (per_row[0] + per_row[2]) / 2)
    torch.testing.assert_close(concept_loss(z, t, True), per_row.sum() / 3)


def test_top_k_targets_are_uniform_over_the_k_best():
    z = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    assert torch.equal(top_k_targets(z, 3), torch.tensor([[0, 1 / 3, 1 / 3, 0, 1 / 3]]))


@pytest.mark.parametrize("bp,bu,ratio", [(6, 10, 0.3), (4, 4, 0.5), (5, 3, 0.0)])
def test_trapezoid_terms_equal_the_release_in_float64(bp, bu, ratio):
    g = torch.Generator().manual_seed(bp * bu)
    x, t = unit(bp, 8, g=g, dtype=torch.float64), unit(bp, 8, g=g, dtype=torch.float64)
    u, ts = unit(bu, 8, g=g, dtype=torch.float64), unit(bu, 8, g=g, dtype=torch.float64)
    s = torch.tensor(37.0, dtype=torch.float64)
    mask, _ = (
        ref.select_surrogates(ts, u, ratio)
        if int(bu * ratio)
        else (torch.zeros(bu, dtype=torch.bool), None)
    )
    expected = ref.trapezoid_losses(x, t, u, ts, mask, s, bs=1)
    got = trapezoid_losses(torch.cat([x, u[mask]]), torch.cat([t, ts[mask]]))
    torch.testing.assert_close(got[0], expected["inmodal_cyclic_loss"])
    torch.testing.assert_close(got[1], expected["crossmodal_cyclic_loss"])


def test_trapezoid_terms_vanish_for_identical_structure_and_reject_mismatched_rows():
    z = unit(5, 4, g=torch.Generator().manual_seed(0), dtype=torch.float64)
    in_modal, cross = trapezoid_losses(z, z)
    assert float(in_modal) == 0.0 and float(cross) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        trapezoid_losses(z, z[:4])


# ----------------------------------------------------------------- the objective
def bare(loss: SemiCLIPLoss, e, labels=None, table=None, surrogates=None) -> SemiCLIPLoss:
    """A SemiCLIPLoss set up by hand (what setup() does from data and the text tower)."""
    loss.concept_embeddings.data = e.clone()
    loss.concept_names = [f"c{i}" for i in range(e.shape[0])]
    if labels is not None:
        loss.concept_labels = labels
    if table is not None:
        loss.stage1_table = table
    loss.surrogates = surrogates
    return loss


class ToySurrogates:
    """Stands in for SurrogatePrompts: features of (top concepts, context) with gradient into
    the context (a linear map of the context's mean plus the concepts' rows)."""

    def __init__(self, k, d, width, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randn(k, d, generator=g, dtype=torch.float64)
        self.proj = torch.randn(width, d, generator=g, dtype=torch.float64)

    def __call__(self, top, context):
        z = self.rows.to(context)[top].sum(1) + context.mean(0) @ self.proj.to(context)
        return F.normalize(z, dim=-1)


def stage2_inputs(bp, bu, k, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": unit(bp, d, g=g, dtype=dtype),
        "t": unit(bp, d, g=g, dtype=dtype),
        "uw": unit(bu, d, g=g, dtype=dtype),
        "us": unit(bu, d, g=g, dtype=dtype),
        "e": unit(k, d, g=g, dtype=dtype),
        "table": torch.randn(bu + 3, k, generator=g, dtype=dtype) * 3,
        "index": torch.randperm(bu + 3, generator=g)[:bu],
        "y": (torch.rand(bp, k, generator=g) < 0.3).to(dtype),
        "surrogate": unit(bu, d, g=g, dtype=dtype),
    }


@pytest.mark.parametrize("bp,k,s", [(8, 5, 14.0), (12, 9, 100.0)])
def test_released_stage1_matches_the_release_values_and_grads(bp, k, s):
    inp = stage2_inputs(bp, 4, k, seed=bp)
    inp["y"][1] = 0
    leaves = [inp["x"].clone().requires_grad_(), inp["t"].clone().requires_grad_()]
    e = inp["e"].clone().requires_grad_()
    c = torch.tensor(math.log(50.0), requires_grad=True)
    scale = torch.tensor(s, requires_grad=True)
    expected = ref.stage1_losses(*leaves, scale, e, c, inp["y"])
    ref_grads = torch.autograd.grad(sum(expected.values()), [*leaves, scale, e, c])

    loss = bare(SemiCLIPLoss.released(stage=1), inp["e"], labels=inp["y"])
    loss.concept_log_scale.data.fill_(math.log(50.0))
    leaves2 = [inp["x"].clone().requires_grad_(), inp["t"].clone().requires_grad_()]
    scale2 = torch.tensor(s, requires_grad=True)
    got = loss(*leaves2, scale2, pair_index=torch.arange(bp))
    close_f32(got["contrastive_loss"], expected["contrastive_loss"], "contrastive")
    close_f32(got["concept_loss"], expected["soft_loss"], "concept")
    params = [loss.concept_embeddings, loss.concept_log_scale]
    grads = torch.autograd.grad(sum(got.values()), [*leaves2, scale2, *params])
    for name, a, b in zip(["x", "t", "s", "E", "c"], grads, ref_grads, strict=True):
        close_f32(a, b, f"grad {name}")


@pytest.mark.parametrize("bp,bu,k,s", [(8, 10, 6, 14.0), (6, 16, 9, 100.0), (4, 3, 5, 1.0)])
def test_released_stage2_matches_the_release_values_and_grads(bp, bu, k, s):
    inp = stage2_inputs(bp, bu, k, seed=bu)
    names = ["x", "t", "uw", "us", "surrogate"]
    leaves = {n: inp[n].clone().requires_grad_() for n in names}
    e = inp["e"].clone().requires_grad_()
    c = torch.tensor(math.log(20.0), requires_grad=True)
    scale = torch.tensor(s, requires_grad=True)
    stage1 = inp["table"][inp["index"]]
    expected, info = ref.stage2_losses(
        leaves["x"], leaves["t"], scale, leaves["uw"], leaves["us"], e, c, stage1,
        leaves["surrogate"],
    )  # fmt: skip
    order = [*names, "s", "E", "c"]
    ref_grads = torch.autograd.grad(
        sum(expected.values()), [*leaves.values(), scale, e, c], allow_unused=True
    )

    loss = bare(
        SemiCLIPLoss.released(stage=2, stage1_logits="unused.pt"), inp["e"], table=inp["table"]
    )
    loss.concept_log_scale.data.fill_(math.log(20.0))
    leaves2 = {n: inp[n].clone().requires_grad_() for n in names}
    loss.surrogates = lambda top, ctx: leaves2["surrogate"]
    scale2 = torch.tensor(s, requires_grad=True)
    got = loss(
        leaves2["x"], leaves2["t"], scale2, leaves2["uw"],
        unpaired_strong_features=leaves2["us"], unpaired_index=inp["index"],
    )  # fmt: skip
    mapping = {
        "contrastive_loss": "contrastive_loss",
        "concept_loss": "softu_loss",
        "in_modal_loss": "inmodal_cyclic_loss",
        "cross_modal_loss": "crossmodal_cyclic_loss",
    }
    assert set(got) == set(mapping)
    for ours, theirs in mapping.items():
        close_f32(got[ours], expected[theirs], ours)
    params = [loss.concept_embeddings, loss.concept_log_scale]
    grads = torch.autograd.grad(
        sum(got.values()), [*leaves2.values(), scale2, *params], allow_unused=True
    )
    for name, a, b in zip(order, grads, ref_grads, strict=True):
        if name == "s":  # the release's s cancels up to rounding; ours is exactly s-free
            continue
        close_f32(a, b, f"grad {name}")
    assert int(info["mask_num"]) == int(bu * 0.3)


def test_default_trapezoid_weight_does_not_grow_with_the_batch_and_released_does():
    inp = stage2_inputs(8, 10, 6, seed=3)

    def terms(loss, n):
        loss = bare(loss, inp["e"], table=inp["table"])
        loss.surrogates = lambda top, ctx: inp["surrogate"][: len(top)]
        return loss(
            inp["x"][:n], inp["t"][:n], 10.0, inp["uw"],
            unpaired_strong_features=inp["us"], unpaired_index=inp["index"],
        )  # fmt: skip

    rel = SemiCLIPLoss.released(stage=2, stage1_logits="x.pt")
    default = SemiCLIPLoss(stage=2, stage1_logits="x.pt", in_modal_weight=1.0)
    a, b = terms(default, 8), terms(rel, 8)
    torch.testing.assert_close(b["in_modal_loss"], 8 * a["in_modal_loss"])
    assert default.trapezoid_scaling == "none" and SemiCLIPLoss().weights[2] == 128.0


def test_released_preset_differs_from_the_defaults_only_by_documented_options():
    rel = SemiCLIPLoss.released().config()["init_args"]
    default = SemiCLIPLoss().config()["init_args"]
    differ = {k for k in rel if rel[k] != default.get(k)}
    assert differ == set(RELEASED_SEMICLIP) | {"concepts"}


def test_concept_scale_is_clamped_after_a_step_only_by_default():
    default, rel = SemiCLIPLoss(), SemiCLIPLoss.released()
    for loss in (default, rel):
        loss.concept_log_scale.data.fill_(math.log(1000.0))
        loss.after_step()
    assert math.isclose(float(default.concept_log_scale.exp()), 100.0, rel_tol=1e-6)
    assert math.isclose(float(rel.concept_log_scale.exp()), 1000.0, rel_tol=1e-6)


def test_optimizer_groups_put_the_scale_without_decay_unless_asked():
    loss = SemiCLIPLoss(stage=2, stage1_logits="x.pt", lr=1e-3)
    loss.concept_embeddings.data = torch.zeros(3, 4)
    loss.context.data = torch.zeros(2, 4)
    main, scale = loss.optimizer_groups(5e-5, 0.2)
    assert main["lr"] == 1e-3 and main["weight_decay"] == 0.2 and len(main["params"]) == 2
    assert scale["weight_decay"] == 0.0
    stage1 = SemiCLIPLoss(concept_scale_decay=True).optimizer_groups(5e-5, 0.2)
    assert len(stage1[0]["params"]) == 1  # no context in stage 1
    assert stage1[1]["weight_decay"] == 0.2 and stage1[1]["lr"] == 5e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stage": 3}, "stage must be one of"),
        ({"stage": 2}, "stage1_logits"),
        ({"trapezoid_scaling": "gpus"}, "trapezoid_scaling"),
        ({"concept_tokens": "some"}, "concept_tokens"),
        ({"selection_ratio": 1.5}, "selection_ratio"),
        ({"top_k": 0}, "top_k"),
        ({"concept_weight": -1.0}, "concept_weight"),
        ({"concept_prompt": "a photo"}, "concept_prompt"),
    ],
)
def test_bad_options_are_rejected_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SemiCLIPLoss(**kwargs)


def test_stage2_without_unpaired_inputs_names_them():
    loss = bare(SemiCLIPLoss(stage=2, stage1_logits="x.pt"), torch.zeros(3, 4))
    x = unit(4, 4, g=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unpaired_strong_features"):
        loss(x, x, 10.0, x)


def test_checkpoint_state_round_trips_the_concept_head():
    loss = bare(SemiCLIPLoss(), unit(5, 8, g=torch.Generator().manual_seed(1)))
    state = loss.state_dict()
    fresh = SemiCLIPLoss()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.concept_embeddings, loss.concept_embeddings)
    assert fresh.concept_names == loss.concept_names
    assert fresh.embedding_digest() == loss.embedding_digest()
