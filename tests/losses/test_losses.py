"""Each loss against a naive loop reference, the release parity, and numerical edge cases."""

from __future__ import annotations

import math

import ot
import pytest
import torch
import torch.nn.functional as F
from release_reference import release_loss

from sclip_lightning.losses import (
    RELEASED,
    Assigner,
    HardNNAssigner,
    OTAssigner,
    SCLIPLoss,
    SoftNNAssigner,
    UnbalancedOTAssigner,
    assign,
    caption_loss,
    contrastive_loss,
    keyword_loss,
    keyword_targets,
    sinkhorn_log,
    sinkhorn_plan,
    sinkhorn_pot,
)

# Tolerances. Comparisons in float64 keep assert_close's float64 defaults (rtol 1e-7, atol 1e-7):
# their errors are below 1e-12. SCLIPLoss computes in float32 whatever its inputs (it casts
# them), so its comparisons with a reference or with itself on another support stay float32,
# and their tolerance comes from the float32 inner products, the largest rounding source: a
# D-term product of unit vectors is exact for factors perturbed by at most gamma_D = D * 2^-24
# relative each, in any summation order, i.e. on any CPU (Higham, Accuracy and Stability of
# Numerical Algorithms, Sec. 3.1). Perturbing every feature by +-gamma_D (D = 16, 20 random
# sign patterns, in float64) moves the released preset's loss terms by at most 6e-5 (s = 100)
# and its gradients by at most 3e-5 of their largest element; the other float32 steps (sums of
# <= 20 softmax terms) err less. F32_LOSS allows 2e-4 of the loss (at least of 1) and of a
# gradient's largest element: 3x that estimate (measured: <= 1e-6 on 4 kernel sets), and 5x
# below the smallest change a wrong option makes here (3e-3 on a caption loss of 2.7: 9
# Sinkhorn iterations instead of 10 at s = 14).
F32_LOSS = 2e-4


def assert_close_f32_loss(actual, expected, grad=False, msg=None):
    """``actual`` within F32_LOSS of ``expected`` (a loss value, absolute up to 1, relative
    above) or of the largest element of ``expected`` (a gradient, ``grad=True``), elementwise:
    the rounding of a gradient scales with its largest terms (an element that is a difference
    of large terms carries their error), not with the element itself."""
    biggest = float(expected.detach().abs().max()) if expected.numel() else 0.0
    scale = biggest if grad else max(1.0, biggest)
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        rtol=0,
        atol=F32_LOSS * scale,
        msg=None if msg is None else lambda m: f"{msg}: {m}",
    )


def feats(n, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def batch(bp=8, bu=6, k=5, d=16, seed=0, dtype=torch.float64, p_kw=0.35):
    g = torch.Generator().manual_seed(seed + 100)
    x, y, u, kw = (feats(n, d, seed + i, dtype) for i, n in enumerate((bp, bp, bu, k)))
    cand = torch.rand(bp, k, generator=g) < p_kw
    return x, y, u, kw, cand


# ----------------------------------------------------------------- contrastive
def naive_contrastive(x, y, s, u=None):
    cands = x if u is None else torch.cat([x, u])
    total = 0.0
    for i in range(x.shape[0]):
        li = s * torch.stack([x[i] @ y[j] for j in range(y.shape[0])])
        lt = s * torch.stack([y[i] @ cands[j] for j in range(cands.shape[0])])
        total = total + (-li[i] + torch.logsumexp(li, 0)) + (-lt[i] + torch.logsumexp(lt, 0))
    return total / (2 * x.shape[0])


@pytest.mark.parametrize("bp,bu", [(1, 0), (4, 3), (7, 11)])
@pytest.mark.parametrize("s", [1.0, 14.3, 100.0])
def test_contrastive_matches_loop(bp, bu, s):
    x, y, u, _, _ = batch(bp, max(bu, 1))
    u = u[:bu]
    got = contrastive_loss(x, y, torch.tensor(s, dtype=x.dtype), u)
    torch.testing.assert_close(got, naive_contrastive(x, y, s, u if bu else None))
    plain = contrastive_loss(x, y, s)
    torch.testing.assert_close(plain, naive_contrastive(x, y, s))


def test_contrastive_without_unpaired_equals_open_clip():
    from open_clip import ClipLoss

    # float64: both are plain autograd in the input's dtype; float32 would hold only while both
    # multiply in the same order with the same kernels (errors ~1e-13 here, tolerance 1e-7)
    x, y, *_ = batch(9, 3)
    s = torch.tensor(20.0, dtype=x.dtype)
    torch.testing.assert_close(contrastive_loss(x, y, s), ClipLoss()(x, y, s))


# ----------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("n,m", [(3, 3), (6, 9), (12, 5)])
@pytest.mark.parametrize("s", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("iters", [1, 10])
def test_sinkhorn_pot_matches_pot_library(n, m, s, iters):
    cost = 1 - feats(n, seed=1) @ feats(m, seed=2).T
    a = torch.ones(n, dtype=torch.double) / n
    b = torch.ones(m, dtype=torch.double) / m
    ref = ot.bregman.sinkhorn(a, b, cost, reg=1 / s, numItermax=iters)
    # float64, the same updates as POT's: a few ulps (~1e-15) per update, <= 20 updates, and
    # Sinkhorn's updates do not amplify relative errors of the scalings
    torch.testing.assert_close(sinkhorn_pot(cost, 1 / s, iters), ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("s", [1.0, 30.0, 100.0])
def test_log_domain_equals_multiplicative(s):
    cost = 1 - feats(7, seed=3) @ feats(10, seed=4).T
    plan = sinkhorn_pot(cost, 1 / s, 10)
    ref = plan / plan.sum(1, keepdim=True)
    log_k, log_v = sinkhorn_log(cost, 1 / s, 10)
    got = torch.softmax(log_k + log_v, dim=-1)
    # float64: log-domain values up to |C|/reg = 200 carry 200 * 2^-53 ~ 2e-14 each, relative
    # in the plan; ~60 such roundings in 10 iterations stay below 1e-12 (measured 3e-14)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_log_domain_is_exact_in_float32_where_multiplicative_underflows():
    shift = torch.zeros(16)
    shift[0] = 4.0
    g = torch.Generator().manual_seed(5)
    p = F.normalize(torch.randn(16, 16, generator=g) + shift, dim=-1)
    q = F.normalize(torch.randn(16, 16, generator=g) - shift, dim=-1)
    # every cost is above 1: exp(-cost * 100) underflows to 0 in float32
    cost = 1 - q @ p.T  # one float32 cost for both (its rounding is not the solver's)
    ref = sinkhorn_plan(cost.double(), 0.01, 10, "pot")
    got = sinkhorn_plan(cost, torch.tensor(0.01), 10, "log")
    assert torch.isfinite(got).all()
    # Relative, entry by entry: the log-domain values reach L = max C / reg = 187, so each
    # float32 operation on them (the division by reg, adding a potential, a logsumexp) errs
    # by up to L * 2^-24 = 1.1e-5, an error relative in the plan's entries. An entry goes
    # through <= 3 of them per half-iteration, 20 half-iterations and the final softmax:
    # <= 62 * 1.1e-5 = 7e-4 if none cancels (measured <= 7e-5 on 4 kernel sets). 9 or 11
    # iterations instead of 10 move entries by > 5x (relative), updating u first by 5e5x.
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=0)
    naive = sinkhorn_pot(cost, 0.01, 10)
    assert not torch.isfinite(naive / naive.sum(1, keepdim=True)).all()


def test_ot_plan_has_uniform_marginals_when_converged():
    q, p = feats(8, seed=7), feats(8, seed=8)
    gamma = sinkhorn_plan(1 - q @ p.T, 0.5, 500, "log")
    # float64; at reg 0.5 the iterations contract by < tanh(2) = 0.96 each: 500 converge to
    # rounding (~1e-15); 1e-6 checks convergence, not rounding
    torch.testing.assert_close(gamma.sum(0), torch.ones(8, dtype=gamma.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(gamma.sum(1), torch.ones(8, dtype=gamma.dtype))


@pytest.mark.parametrize("solver", ["pot", "log"])
def test_ot_gradients_match_the_unrolled_float64_reference(solver):
    q = feats(64, seed=11, dtype=torch.float32).requires_grad_(True)
    p = feats(48, seed=12, dtype=torch.float32).requires_grad_(True)
    scale = torch.tensor(100.0, requires_grad=True)
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(4))
    plan = OTAssigner(sinkhorn_solver=solver)(q, p, p, scale)
    got = torch.autograd.grad((plan * w).sum(), (q, p, scale))
    q64, p64, s64 = (t.detach().double().requires_grad_(True) for t in (q, p, scale))
    ref = sinkhorn_pot(1 - q64 @ p64.T, 1 / s64, 10)
    ref = ref / ref.sum(1, keepdim=True)
    want = torch.autograd.grad((ref * w.double()).sum(), (q64, p64, s64))
    # Relative to each gradient's largest element (a small element is a sum of large terms
    # and carries their error): "log" runs the iterations in float32, whose plan entries err
    # by <= 7e-4 relative (see the float32 log-domain test) and its backward pass likewise;
    # "pot" runs them in float64 from a float32 cost, off by <= gamma_16 = 16 * 2^-24 ~ 4
    # float32 ulps, and one ulp of cost moves the plan by 6e-5 relative at s = 100: <= 2.4e-4.
    # Measured <= 5e-6 (features), 1.3e-4 (scale) on 4 kernel sets.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-3 * float(b.abs().max()))


# ----------------------------------------------------------------- assigners
def test_assigners_against_loops():
    x, y, u, _, _ = batch(6, 5)
    s = torch.tensor(10.0, dtype=x.dtype)
    hard = assign(u, x, y, s, HardNNAssigner(assigner_support="text"))
    soft = assign(u, x, y, s, SoftNNAssigner(assigner_support="text"))
    for j in range(u.shape[0]):
        sims = torch.stack([u[j] @ y[i] for i in range(y.shape[0])])
        assert hard[j].argmax() == sims.argmax() and hard[j].sum() == 1
        torch.testing.assert_close(soft[j], torch.softmax(s * sims, 0))
    # assigner_support="text" really uses the text features (the release's variants used images)
    ot_text = assign(u, x, y, s, OTAssigner(assigner_support="text"))
    ref = sinkhorn_pot(1 - u @ y.T, 1 / s, 10)
    torch.testing.assert_close(ot_text, ref / ref.sum(1, keepdim=True))
    assert not torch.allclose(ot_text, assign(u, x, y, s, OTAssigner(assigner_support="image")))


def test_detach_plan_blocks_gradient():
    x, y, u, _, _ = batch(5, 4)
    u.requires_grad_(True)
    s = torch.tensor(10.0, dtype=x.dtype)
    assert not assign(u, x, y, s, OTAssigner(detach_plan=True)).requires_grad
    assert assign(u, x, y, s, OTAssigner(detach_plan=False)).requires_grad


def test_unbalanced_ot_is_pots_solver_and_interpolates_soft_nn_and_ot():
    _, x, u, _, _ = batch(9, 7)
    s = torch.tensor(20.0, dtype=x.dtype)
    plan = UnbalancedOTAssigner(reg_m=0.3, sinkhorn_iters=10)(u, x, x, s)
    cost = 1 - u @ x.T
    ref = ot.unbalanced.sinkhorn_unbalanced(
        torch.full((7,), 1 / 7, dtype=x.dtype),
        torch.full((9,), 1 / 9, dtype=x.dtype),
        cost,
        1 / s,
        (float("inf"), 0.3),
        c=torch.ones_like(cost),
        numItermax=10,
        stopThr=0.0,
    )
    torch.testing.assert_close(plan, ref / ref.sum(1, keepdim=True))
    # reg_m -> 0: the support marginal is free, the plan is Soft-PL's softmax(s * sim)
    loose = UnbalancedOTAssigner(reg_m=1e-9)(u, x, x, s)
    torch.testing.assert_close(loose, SoftNNAssigner()(u, x, x, s), atol=1e-6, rtol=1e-6)
    # reg_m -> inf: the balanced plan (both run to convergence)
    tight = UnbalancedOTAssigner(reg_m=1e9, sinkhorn_iters=2000)(u, x, x, s)
    balanced = OTAssigner(sinkhorn_iters=2000)(u, x, x, s)
    torch.testing.assert_close(tight, balanced, atol=1e-5, rtol=1e-4)
    # gradients reach the features and the scale through POT's iterations
    uu, xx = u.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ss = s.clone().requires_grad_(True)
    grads = torch.autograd.grad((UnbalancedOTAssigner()(uu, xx, xx, ss) * cost).sum(), (uu, xx, ss))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_the_default_assigner_is_ot_and_options_belong_to_their_assigner():
    assert type(SCLIPLoss().assigner) is OTAssigner
    loss = SCLIPLoss(assigner=UnbalancedOTAssigner(reg_m=0.2))
    assert isinstance(loss.assigner, UnbalancedOTAssigner) and loss.assigner.reg_m == 0.2
    with pytest.raises(ValueError, match="assigner must be an Assigner"):
        SCLIPLoss(assigner="ot")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reg_m"):
        SoftNNAssigner(reg_m=0.2)  # type: ignore[call-arg]


class FixedPlan(Assigner):
    """Returns the same plan whatever the features: a test double for the assigner hook."""

    def __init__(self, plan: torch.Tensor) -> None:
        super().__init__()
        self.fixed = plan

    def plan(self, query, support, logit_scale, support_mask):
        return self.fixed.to(query.dtype)


def test_custom_assigner_is_the_plan_training_uses():
    """A custom plan reaches both pseudo-label terms; expected values computed by hand."""
    x, y, u, kw, cand = batch(4, 3, 5)
    plan = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.25, 0.75]])
    s = torch.tensor(10.0, dtype=x.dtype)
    loss = SCLIPLoss(
        assigner=FixedPlan(plan),
        contrastive_weight=0.0,
        caption_weight=1.0,
        keyword_weight=1.0,
        keyword_weighting="softmax",
    )
    out = loss(x, y, s, u, kw, cand)
    logits = s * u @ y.T
    expected_caption = (
        -sum(plan[j, i] * torch.log_softmax(logits[j], 0)[i] for j in range(3) for i in range(4))
        / 3
    )
    assert_close_f32_loss(out["caption_loss"], expected_caption)  # float32 loss, float64 hand
    kw_logits = s * u @ kw.T
    expected_kw = 0.0
    for j, nearest in enumerate([1, 0, 3]):  # row argmax, first index on ties
        idx = [k for k in range(5) if cand[nearest, k]]
        if idx:
            w = torch.softmax(kw_logits[j, idx], 0)
            expected_kw = expected_kw - sum(
                w[a] * torch.log_softmax(kw_logits[j], 0)[k] for a, k in enumerate(idx)
            )
    assert_close_f32_loss(out["keyword_loss"], torch.as_tensor(expected_kw / 3))
    torch.testing.assert_close(loss.last_assignment.plan, plan.float())


# ----------------------------------------------------------------- support bank
def _bank_loss(assigner, size, **kw):
    return SCLIPLoss(assigner=assigner, support_bank_size=size, **kw)


@pytest.mark.parametrize(
    "assigner,opts",
    [
        (OTAssigner, {}),
        (OTAssigner, {"sinkhorn_solver": "log"}),
        (UnbalancedOTAssigner, {}),
        (SoftNNAssigner, {}),
        (HardNNAssigner, {}),
    ],
)
def test_bank_support_equals_the_explicit_support(assigner, opts):
    """With the bank on, every assigner plans over [batch; valid bank rows]: the same values
    and gradients as calling it on that support built by hand (masked rows = absent rows)."""
    loss = _bank_loss(assigner(**opts), -1, keyword_weighting="softmax")
    loss.bank.set_capacity(10)
    xs, ys, _, kw, cands = batch(10, 4, 5, dtype=torch.float32, seed=1)
    ids = torch.arange(10)
    loss(xs[:6], ys[:6], torch.tensor(10.0), pair_index=ids[:6], keyword_candidates=cands[:6])
    # step 2: batch = pairs 4..9; pairs 4, 5 are in the bank too (left out), 6..9 new
    x, y, u = (t.clone().requires_grad_(True) for t in (xs[4:], ys[4:], feats(5, seed=9).float()))
    scale = torch.tensor(10.0, requires_grad=True)
    got = loss(x, y, scale, u, kw, cands[4:], pair_index=ids[4:])
    mask = loss.last_assignment.support_mask
    assert mask.tolist() == [True] * 6 + [True] * 4 + [False] * 6
    # explicit: support = batch (6 rows, grad) + bank pairs 0..3 (detached), no bank
    ref_loss = SCLIPLoss(assigner=assigner(**opts), keyword_weighting="softmax")
    x2, y2, u2 = (t.detach().clone().requires_grad_(True) for t in (x, y, u))
    scale2 = torch.tensor(10.0, requires_grad=True)
    sx, sy = torch.cat([x2, xs[:4]]), torch.cat([y2, ys[:4]])
    plan = ref_loss.assign(u2, sx, sy, scale2)
    want_cap = 0.5 * caption_loss(u2, sy, scale2, plan)
    want_kw = 0.5 * keyword_loss(u2, kw, torch.cat([cands[4:], cands[:4]]), plan, scale2)
    # float32 both ways, on supports of 16 (6 masked) and 10 columns: other kernels and sums
    assert_close_f32_loss(got["caption_loss"], want_cap)
    assert_close_f32_loss(got["keyword_loss"], want_kw)
    g1 = torch.autograd.grad(
        got["caption_loss"] + got["keyword_loss"], (x, y, u, scale), allow_unused=True
    )
    g2 = torch.autograd.grad(want_cap + want_kw, (x2, y2, u2, scale2), allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            assert_close_f32_loss(a, b, grad=True)


def test_fifo_bank_keeps_the_last_n_and_skips_batch_duplicates():
    loss = _bank_loss(OTAssigner(), 5)
    x, y, *_ = batch(12, 1, dtype=torch.float32)
    s = torch.tensor(10.0)
    for step in range(3):  # 4 pairs per step: ids 0-3, 4-7, 8-11
        sl = slice(4 * step, 4 * step + 4)
        loss(x[sl], y[sl], s, pair_index=torch.arange(12)[sl])
    assert sorted(loss.bank.state["ids"].tolist()) == [7, 8, 9, 10, 11]
    torch.testing.assert_close(loss.bank.state["image"][loss.bank.state["ids"].argsort()], x[7:])
    u = feats(3, seed=4).float()
    bank_ids = loss.bank.state["ids"].clone()  # what the next plan sees, before its push
    loss(x[8:10], y[8:10], s, u, pair_index=torch.tensor([8, 9]))
    mask = loss.last_assignment.support_mask
    assert mask.tolist() == [True, True] + [i not in (8, 9) for i in bank_ids.tolist()]


def test_bank_unfilled_slots_are_unused_and_eval_does_not_push():
    loss = _bank_loss(SoftNNAssigner(), -1)
    loss.bank.set_capacity(100)
    x, y, u, *_ = batch(4, 3, dtype=torch.float32)
    s = torch.tensor(10.0)
    loss(x, y, s, u, pair_index=torch.tensor([3, 50, 7, 99]))
    loss(x, y, s, u, pair_index=torch.tensor([1, 2, 5, 6]))
    last = loss.last_assignment
    assert last.support_mask.sum() == 8  # 4 batch rows + slots 3, 50, 7, 99
    assert (last.plan[:, ~last.support_mask] == 0).all()
    torch.testing.assert_close(last.plan.sum(1), torch.ones(3))
    loss.eval()
    before = {k: v.clone() for k, v in loss.bank.state.items()}
    loss(x, y, s, u, pair_index=torch.tensor([10, 11, 12, 13]))
    assert all(torch.equal(before[k], loss.bank.state[k]) for k in before)


def test_bank_round_trips_through_a_state_dict():
    loss = _bank_loss(OTAssigner(), 6)
    x, y, *_ = batch(4, 1, dtype=torch.float32)
    loss(x, y, torch.tensor(5.0), pair_index=torch.arange(4))
    state = loss.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = _bank_loss(OTAssigner(), 6)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.bank.pointer == 4
    for k, v in loss.bank.state.items():
        assert torch.equal(restored.bank.state[k], v)
    with pytest.raises(ValueError, match="support_bank_size"):
        _bank_loss(OTAssigner(), 3).load_state_dict(state)
    with pytest.raises(ValueError, match="pair_index"):
        _bank_loss(OTAssigner(), -1).bank.push(x, y, None, None)


def test_custom_assigner_ignoring_the_mask_works_with_the_bank():
    loss = SCLIPLoss(assigner=FixedPlan(torch.full((2, 2), 1 / 2)), support_bank_size=4)
    x, y, u, *_ = batch(2, 2, dtype=torch.float32)
    s = torch.tensor(10.0)
    loss(x, y, s, u, pair_index=torch.tensor([0, 1]))  # bank empty: support = batch
    loss.assigner.fixed = torch.full((2, 6), 1 / 6)
    loss(x, y, s, u, pair_index=torch.tensor([0, 1]))  # bank: 2 rows duplicate the batch
    plan = loss.last_assignment.plan
    torch.testing.assert_close(plan, torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 2))


# ----------------------------------------------------------------- keywords
def naive_keyword_targets(u, kw, cand, s, weighting):
    t = torch.zeros(u.shape[0], kw.shape[0], dtype=u.dtype)
    for j in range(u.shape[0]):
        idx = [k for k in range(kw.shape[0]) if cand[j, k]]
        if len(idx) == 1:
            t[j, idx[0]] = 1
        elif idx:
            sim = torch.stack([s * (u[j] @ kw[k]) for k in idx])
            w = sim / sim.sum() if weighting == "linear" else torch.softmax(sim, 0)
            for a, k in enumerate(idx):
                t[j, k] = w[a]
    return t


@pytest.mark.parametrize("weighting", ["linear", "softmax"])
def test_keyword_targets_match_loop(weighting):
    _, _, u, kw, _ = batch(8, 10, k=6)
    cand = torch.rand(10, 6, generator=torch.Generator().manual_seed(3)) < 0.4
    cand[0] = False
    cand[1] = False
    cand[1, 2] = True
    s = torch.tensor(20.0, dtype=u.dtype)
    got = keyword_targets(u, kw, cand, s, weighting)
    torch.testing.assert_close(got, naive_keyword_targets(u, kw, cand, s, weighting))
    assert got[0].sum() == 0 and got[1, 2] == 1


def test_keyword_loss_mean_modes():
    x, y, u, kw, cand = batch(6, 6, k=4)
    plan = torch.eye(6, dtype=x.dtype)
    cand[:3] = False
    s = torch.tensor(10.0, dtype=x.dtype)
    all_rows = keyword_loss(u, kw, cand, plan, s, "softmax", empty_rows_in_mean=True)
    with_cand = keyword_loss(u, kw, cand, plan, s, "softmax", empty_rows_in_mean=False)
    n_with = int(cand.any(1).sum())
    torch.testing.assert_close(all_rows * 6 / n_with, with_cand)


# ----------------------------------------------------------------- release parity
@pytest.mark.parametrize("bp,bu,k,s", [(8, 8, 5, 14.0), (6, 10, 7, 100.0), (12, 4, 3, 1.0)])
def test_released_config_matches_loop_reference_values_and_grads(bp, bu, k, s):
    x, y, u, kw, cand = batch(bp, bu, k, dtype=torch.float32, seed=bp + bu)
    leaves = [t.clone().requires_grad_(True) for t in (x, y, u, kw)]
    scale = torch.tensor(s, requires_grad=True)
    ref = release_loss(*leaves[:2], scale, leaves[2], leaves[3], cand)
    ref_total = sum(ref.values())
    ref_grads = torch.autograd.grad(ref_total, [*leaves, scale])

    leaves2 = [t.clone().requires_grad_(True) for t in (x, y, u, kw)]
    scale2 = torch.tensor(s, requires_grad=True)
    got = SCLIPLoss.released()(
        leaves2[0], leaves2[1], scale2, leaves2[2], leaves2[3], cand, output_dict=True
    )
    for key in ref:  # float32 both ways (SCLIPLoss casts), other association and kernels
        assert_close_f32_loss(got[key], ref[key], msg=key)
    grads = torch.autograd.grad(sum(got.values()), [*leaves2, scale2])
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close_f32_loss(a, b, grad=True)


def test_the_release_differs_from_the_defaults_only_by_documented_options():
    import inspect

    defaults = inspect.signature(SCLIPLoss.__init__).parameters
    assert RELEASED == {"keyword_weighting": "linear"}
    assert defaults["keyword_weighting"].default == "softmax"
    rel = SCLIPLoss.released(support_bank_size=4)
    assert rel.keyword_weighting == "linear" and rel.bank is not None
    recorded = rel.config()["init_args"]
    default = SCLIPLoss().config()["init_args"]
    assert {k for k in recorded if recorded[k] != default[k]} == {
        "keyword_weighting",
        "support_bank_size",
    }


# ----------------------------------------------------------------- numerics
CONFIGS = {
    "released": lambda: SCLIPLoss.released(),
    "recommended": lambda: SCLIPLoss(),
    "soft_text": lambda: SCLIPLoss(assigner=SoftNNAssigner(assigner_support="text")),
    "hard_image": lambda: SCLIPLoss(assigner=HardNNAssigner()),
}


def _check_finite(out, params):
    total = sum(out.values())
    assert all(torch.isfinite(v) for v in out.values()), out
    grads = torch.autograd.grad(total, params, allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("s", [1.0, 100.0])
@pytest.mark.parametrize(
    "case", ["plain", "negative", "bu_ne_bp", "bu0", "k0", "no_candidates", "duplicates"]
)
def test_edge_cases_finite(name, s, case):
    bp, bu, k = 8, 8, 5
    if case == "bu_ne_bp":
        bu = 13
    x, y, u, kw, cand = batch(bp, max(bu, 1), k, dtype=torch.float32)
    if case == "negative":
        u, kw = -x[: u.shape[0]].roll(1, 0), -u[:k]  # similarities near -1
        cand[:] = True
    if case == "bu0":
        u = u[:0]
    if case == "k0":
        kw, cand = kw[:0], cand[:, :0]
    if case == "no_candidates":
        cand[:] = False
    if case == "duplicates":
        x = x[:1].expand_as(x).clone()
        u = x[: u.shape[0]].clone() if u.shape[0] <= bp else u
        y = y[:1].expand_as(y).clone()
    params = [t.clone().requires_grad_(True) for t in (x, y, u, kw)]
    scale = torch.tensor(s, requires_grad=True)
    out = CONFIGS[name]()(params[0], params[1], scale, params[2], params[3], cand)
    assert set(out) == {"contrastive_loss", "caption_loss", "keyword_loss"}
    if case == "bu0":
        assert out["caption_loss"] == 0 and out["keyword_loss"] == 0
    if case in ("k0", "no_candidates"):
        assert out["keyword_loss"] == 0
    _check_finite(out, [*params, scale])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_low_precision_inputs_and_autocast(dtype, name):
    x, y, u, kw, cand = batch(16, 16, 6, dtype=torch.float32)
    params = [t.to(dtype).requires_grad_(True) for t in (x, y, u, kw)]
    scale = torch.tensor(100.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = CONFIGS[name]()(params[0], params[1], scale, params[2], params[3], cand)
    assert all(v.dtype == torch.float32 for v in out.values())
    _check_finite(out, [*params, scale])
    ref = CONFIGS[name]()(
        *(p.detach().float() for p in params[:2]),
        scale.detach(),
        params[2].detach().float(),
        params[3].detach().float(),
        cand,
    )
    for key in out:
        torch.testing.assert_close(out[key].detach(), ref[key], atol=1e-4, rtol=1e-4)


def test_linear_weighting_breaks_where_softmax_does_not():
    # two candidates with similarities of opposite sign and nearly equal size
    u = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    kw = F.normalize(torch.tensor([[0.5, 1.0], [-0.5, 1.0]]), dim=-1)
    kw[1, 0] = -kw[0, 0] + 1e-6
    cand = torch.tensor([[True, True]])
    lin = keyword_targets(u, kw, cand, 10.0, "linear")
    soft = keyword_targets(u, kw, cand, 10.0, "softmax")
    assert lin.abs().max() > 1e3  # the release's sim/sum(sim) explodes
    torch.testing.assert_close(soft.sum(), torch.tensor(1.0))
    assert (soft >= 0).all()


def test_shape_errors_are_clear():
    x, y, u, kw, cand = batch(4, 4, 3, dtype=torch.float32)
    loss = SCLIPLoss()
    with pytest.raises(ValueError, match="text_features"):
        loss(x, y[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="unpaired_features"):
        loss(x, y, torch.tensor(1.0), u[:, :5])
    with pytest.raises(ValueError, match="keyword_candidates"):
        loss(x, y, torch.tensor(1.0), u, kw, cand[:, :2])
    with pytest.raises(ValueError, match="caption_weight"):
        SCLIPLoss(caption_weight=-1)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        OTAssigner(sinkhorn_iters=0)
    with pytest.raises(ValueError, match="pair_index"):
        loss(x, y, torch.tensor(1.0), pair_index=torch.arange(3))


def test_loss_weights_scale_terms():
    x, y, u, kw, cand = batch(6, 6, 4, dtype=torch.float32)
    s = torch.tensor(10.0)
    base = SCLIPLoss(contrastive_weight=1, caption_weight=1, keyword_weight=1)(x, y, s, u, kw, cand)
    w = SCLIPLoss(contrastive_weight=2, caption_weight=0.5, keyword_weight=3)(x, y, s, u, kw, cand)
    torch.testing.assert_close(w["contrastive_loss"], 2 * base["contrastive_loss"])
    torch.testing.assert_close(w["caption_loss"], 0.5 * base["caption_loss"])
    torch.testing.assert_close(w["keyword_loss"], 3 * base["keyword_loss"])
    total = SCLIPLoss()(x, y, s, u, kw, cand, output_dict=False)
    assert math.isfinite(float(total))
