"""Each loss against a naive loop reference, the release parity, and numerical edge cases."""

from __future__ import annotations

import math

import ot
import pytest
import torch
import torch.nn.functional as F
from release_reference import release_loss

from sclip_lightning.losses import (
    CaptionOTLoss,
    ContrastiveLoss,
    KeywordPLLLoss,
    SCLIPLoss,
    assign,
    keyword_targets,
    ot_assign,
    sinkhorn_log,
    sinkhorn_pot,
)
from sclip_lightning.losses.sclip import PRESETS


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
    got = ContrastiveLoss(unpaired_negatives=True)(x, y, torch.tensor(s, dtype=x.dtype), u)
    torch.testing.assert_close(got, naive_contrastive(x, y, s, u if bu else None))
    plain = ContrastiveLoss(unpaired_negatives=False)(x, y, s, u)
    torch.testing.assert_close(plain, naive_contrastive(x, y, s))


def test_contrastive_without_unpaired_equals_open_clip():
    from open_clip import ClipLoss

    x, y, *_ = batch(9, 3, dtype=torch.float32)
    s = torch.tensor(20.0)
    torch.testing.assert_close(ContrastiveLoss()(x, y, s), ClipLoss()(x, y, s))


# ----------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("n,m", [(3, 3), (6, 9), (12, 5)])
@pytest.mark.parametrize("s", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("iters", [1, 10])
def test_sinkhorn_pot_matches_pot_library(n, m, s, iters):
    cost = 1 - feats(n, seed=1) @ feats(m, seed=2).T
    a = torch.ones(n, dtype=torch.double) / n
    b = torch.ones(m, dtype=torch.double) / m
    ref = ot.bregman.sinkhorn(a, b, cost, reg=1 / s, numItermax=iters)
    torch.testing.assert_close(sinkhorn_pot(cost, 1 / s, iters), ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("s", [1.0, 30.0, 100.0])
def test_log_domain_equals_multiplicative(s):
    cost = 1 - feats(7, seed=3) @ feats(10, seed=4).T
    plan = sinkhorn_pot(cost, 1 / s, 10)
    ref = plan / plan.sum(1, keepdim=True)
    log_k, log_v = sinkhorn_log(cost, 1 / s, 10)
    got = torch.softmax(log_k + log_v, dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_log_domain_is_exact_in_float32_where_multiplicative_underflows():
    shift = torch.zeros(16)
    shift[0] = 4.0
    g = torch.Generator().manual_seed(5)
    p = F.normalize(torch.randn(16, 16, generator=g) + shift, dim=-1)
    q = F.normalize(torch.randn(16, 16, generator=g) - shift, dim=-1)
    # every cost is near 2: exp(-cost * 100) underflows to 0 in float32
    ref = ot_assign(q.double(), p.double(), 0.01, 10, "pot")
    got = ot_assign(q, p, torch.tensor(0.01), 10, "log")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    naive = sinkhorn_pot(1 - q @ p.T, 0.01, 10)
    assert not torch.isfinite(naive / naive.sum(1, keepdim=True)).all()


def test_ot_plan_has_uniform_marginals_when_converged():
    q, p = feats(8, seed=7), feats(8, seed=8)
    gamma = ot_assign(q, p, 0.5, num_iters=500, solver="log")
    torch.testing.assert_close(gamma.sum(0), torch.ones(8, dtype=gamma.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(gamma.sum(1), torch.ones(8, dtype=gamma.dtype))


@pytest.mark.parametrize("solver", ["pot", "log"])
@pytest.mark.parametrize(
    "n,m,s,iters",
    [
        (7, 5, 30.0, 10),
        (16, 16, 100.0, 10),
        (5, 9, 1.0, 3),
        (12, 4, 100.0, 1),
        (1, 1, 50.0, 10),
        (1, 6, 50.0, 2),
    ],
)
def test_fast_sinkhorn_backward_equals_unrolled_autograd(solver, n, m, s, iters):
    """SinkhornAssign's low-rank backward is the exact gradient of the unrolled iterations."""
    from sclip_lightning.losses.functional import SinkhornAssign

    cost = (1 - feats(n, seed=n) @ feats(m, seed=m + 50).T).requires_grad_(True)
    reg = torch.tensor(1 / s, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(gamma):
        return torch.autograd.grad((gamma * g).sum(), (cost, reg))

    fast = SinkhornAssign.apply(cost, reg, iters, solver)
    log_k, log_v = sinkhorn_log(cost, reg, iters)
    ref = torch.softmax(log_k + log_v, dim=-1)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-13)
    for got, want in zip(grads(fast), grads(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_fast_sinkhorn_passes_gradcheck():
    from sclip_lightning.losses.functional import SinkhornAssign

    cost = (1 - feats(4, seed=1) @ feats(3, seed=2).T).requires_grad_(True)
    reg = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for solver in ("pot", "log"):
        assert torch.autograd.gradcheck(
            lambda c, r, solver=solver: SinkhornAssign.apply(c, r, 5, solver), (cost, reg)
        )


@pytest.mark.parametrize("solver", ["pot", "log"])
def test_ot_assign_gradients_match_the_unrolled_reference_in_float32(solver):
    q = feats(64, seed=11, dtype=torch.float32).requires_grad_(True)
    p = feats(48, seed=12, dtype=torch.float32).requires_grad_(True)
    scale = torch.tensor(100.0, requires_grad=True)
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad((ot_assign(q, p, 1 / scale, 10, solver) * w).sum(), (q, p, scale))
    q64, p64, s64 = (t.detach().double().requires_grad_(True) for t in (q, p, scale))
    plan = sinkhorn_pot(1 - q64 @ p64.T, 1 / s64, 10)
    ref = plan / plan.sum(1, keepdim=True)
    want = torch.autograd.grad((ref * w.double()).sum(), (q64, p64, s64))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_ot_assign_falls_back_to_autograd_beyond_the_fast_backward_range():
    q = feats(6, seed=13, dtype=torch.float32).requires_grad_(True)
    p = feats(5, seed=14, dtype=torch.float32)
    gamma = ot_assign(q, p, 1e-3, 10, "log")  # 2 / reg = 2000: float64 factors could overflow
    assert gamma.grad_fn is not None and "Sinkhorn" not in type(gamma.grad_fn).__name__
    (grad,) = torch.autograd.grad((gamma * torch.arange(5.0)).sum(), q)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------- assigners
def test_assigners_against_loops():
    x, y, u, _, _ = batch(6, 5)
    s = torch.tensor(10.0, dtype=x.dtype)
    hard = assign(u, x, y, s, "hard_nn", "text")
    soft = assign(u, x, y, s, "soft_nn", "text")
    for j in range(u.shape[0]):
        sims = torch.stack([u[j] @ y[i] for i in range(y.shape[0])])
        assert hard[j].argmax() == sims.argmax() and hard[j].sum() == 1
        torch.testing.assert_close(soft[j], torch.softmax(s * sims, 0))
    # support="text" really uses the text features (the release's variants used images)
    ot_text = assign(u, x, y, s, "ot", "text")
    torch.testing.assert_close(ot_text, ot_assign(u, y, 1 / s, 10, "log"))
    assert not torch.allclose(ot_text, assign(u, x, y, s, "ot", "image"))


def test_detach_plan_blocks_gradient():
    x, y, u, _, _ = batch(5, 4)
    u.requires_grad_(True)
    s = torch.tensor(10.0, dtype=x.dtype)
    g = assign(u, x, y, s, "ot", "image", detach=True)
    assert not g.requires_grad
    g2 = assign(u, x, y, s, "ot", "image", detach=False)
    assert g2.requires_grad


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
    all_rows = KeywordPLLLoss("softmax", empty_rows_in_mean=True)(u, kw, cand, plan, s)
    with_cand = KeywordPLLLoss("softmax", empty_rows_in_mean=False)(u, kw, cand, plan, s)
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
    got = SCLIPLoss.as_released()(
        leaves2[0], leaves2[1], scale2, leaves2[2], leaves2[3], cand, output_dict=True
    )
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(sum(got.values()), [*leaves2, scale2])
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_recommended_and_release_differ_only_by_documented_options():
    rel = SCLIPLoss.as_released()
    rec = SCLIPLoss.from_preset("recommended")
    assert rel.keyword.weighting == "linear" and rec.keyword.weighting == "softmax"
    rel_opts, rec_opts = (PRESETS[n].options for n in ("released", "recommended"))
    assert {k for k in rel_opts if rel_opts[k] != rec_opts[k]} == {"keyword_weighting"}
    with pytest.raises(ValueError, match="unknown preset"):
        SCLIPLoss.from_preset("nope")


# ----------------------------------------------------------------- numerics
CONFIGS = {
    "released": lambda: SCLIPLoss.as_released(),
    "recommended": lambda: SCLIPLoss(),
    "soft_text": lambda: SCLIPLoss(assigner="soft_nn", assigner_support="text"),
    "hard_image": lambda: SCLIPLoss(assigner="hard_nn"),
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
    with pytest.raises(ValueError, match="assigner"):
        SCLIPLoss(assigner="nn")
    with pytest.raises(ValueError, match="caption_weight"):
        SCLIPLoss(caption_weight=-1)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        CaptionOTLoss(sinkhorn_iters=0)


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


@pytest.mark.parametrize("bp,bu", [(5, 3), (8, 8), (1, 4), (6, 0)])
def test_fused_column_cross_entropy_equals_the_unfused_losses(bp, bu):
    from sclip_lightning.losses.functional import ColumnCrossEntropy, soft_cross_entropy

    g = torch.Generator().manual_seed(bp + bu)
    logits = (5 * torch.randn(bp, bp + bu, generator=g, dtype=torch.float64)).requires_grad_()
    gamma = None
    if bu:
        gamma = torch.softmax(torch.randn(bu, bp, generator=g, dtype=torch.float64), -1)
        gamma.requires_grad_(True)
    i2t, cap = ColumnCrossEntropy.apply(logits, gamma, bp)
    ref_i2t = F.cross_entropy(logits[:, :bp].T, torch.arange(bp))
    ref_cap = (
        soft_cross_entropy(logits[:, bp:].T, gamma) if bu else torch.zeros((), dtype=torch.float64)
    )
    inputs = [logits] + ([gamma] if bu else [])
    got = torch.autograd.grad(0.7 * i2t + 1.3 * cap, inputs)
    want = torch.autograd.grad(0.7 * ref_i2t + 1.3 * ref_cap, inputs)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(cap, ref_cap)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------- fused node
def _composed_reference(opts, x, y, s, u, kw, cand):
    """The objective from the standalone losses (no SCLIPCore): the test's reference."""
    contrastive = ContrastiveLoss(opts.get("unpaired_negatives", True))(x, y, s, u)
    cap_loss = CaptionOTLoss(
        sinkhorn_iters=opts.get("sinkhorn_iters", 10),
        sinkhorn_reg=opts.get("sinkhorn_reg"),
        sinkhorn_solver=opts.get("sinkhorn_solver", "pot"),
        detach_plan=opts.get("detach_plan", False),
    )
    plan = cap_loss.assign(u, x, y, s)
    kw_loss = KeywordPLLLoss(
        opts.get("keyword_weighting", "softmax"), opts.get("keyword_empty_rows_in_mean", True)
    )
    out = {"contrastive_loss": opts.get("contrastive_weight", 1.0) * contrastive}
    cw, kww = opts.get("caption_weight", 0.5), opts.get("keyword_weight", 0.5)
    out["caption_loss"] = cw * cap_loss(u, x, y, s, plan) if cw > 0 else 0 * s
    out["keyword_loss"] = kww * kw_loss(u, kw, cand, plan, s) if kww > 0 else 0 * s
    return out


FUSED_OPTIONS = [
    {},
    {"keyword_weighting": "linear"},
    {"sinkhorn_solver": "log"},
    {"detach_plan": True},
    {"unpaired_negatives": False},
    {"caption_weight": 0.0},
    {"caption_weight": 0.0, "unpaired_negatives": False},
    {"keyword_weight": 0.0},
    {"sinkhorn_reg": 0.05, "sinkhorn_iters": 3},
    {"keyword_empty_rows_in_mean": False, "contrastive_weight": 2.0, "caption_weight": 1.5},
]


@pytest.mark.parametrize("opts", FUSED_OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("bp,bu,s", [(8, 8, 14.0), (6, 11, 100.0), (9, 3, 1.0)])
def test_fused_node_equals_the_standalone_losses(opts, bp, bu, s):
    """SCLIPLoss's one-node path (losses/core.py) against ContrastiveLoss + CaptionOTLoss +
    KeywordPLLLoss composed by autograd: values and every gradient, scale included."""
    x, y, u, kw, cand = batch(bp, bu, 5, dtype=torch.float32, seed=bp * bu)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (x, y, u, kw)] + [
            torch.tensor(s, requires_grad=True)
        ]

    loss = SCLIPLoss(**opts)
    assert loss._fused_plan()
    a = leaves()
    got = loss(a[0], a[1], a[4], a[2], a[3], cand)
    b = leaves()
    want = _composed_reference(opts, b[0], b[1], b[4], b[2], b[3], cand)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(sum(got.values()), a, allow_unused=True)
    g_want = torch.autograd.grad(sum(want.values()), b, allow_unused=True)
    for ga, gb in zip(g_got, g_want, strict=True):
        ga = torch.zeros(()) if ga is None else ga
        gb = torch.zeros(()) if gb is None else gb
        torch.testing.assert_close(ga, gb.expand_as(ga), atol=2e-5, rtol=1e-4)


def test_fused_node_second_backward_is_an_error_not_a_wrong_gradient():
    x, y, u, kw, cand = batch(6, 6, 4, dtype=torch.float32)
    params = [t.clone().requires_grad_(True) for t in (x, y, u, kw)]
    total = SCLIPLoss()(params[0], params[1], torch.tensor(10.0), params[2], params[3], cand)
    total = sum(total.values())
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        total.backward()
