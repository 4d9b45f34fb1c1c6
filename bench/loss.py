"""Loss benchmark: SCLIPLoss forward+backward time as a ratio to baselines in the same run.

For B_p = B_u in {32, 128, 512, 1024}, D = 512, K = 45 it times
  - open_clip's ClipLoss on the paired batch (what plain CLIP pays),
  - SCLIPLoss recommended (POT-order Sinkhorn in float64, gradients through the plan,
    softmax keyword weights),
  - SCLIPLoss released (the same with the release's linear keyword weights),
  - the matrix-product floor: only the nine (B x B x D) products any S-CLIP implementation
    with gradients through the plan needs (the caption logits [X; U] (s Y)^T and the OT
    similarity U X^T, forward, and their four + two backward products), no autograd,
  - the loop-form reimplementation of the release (bench/release_reference.py: POT call and a
    Python loop over unpaired images), skipped above --max-loop-b,
and prints medians and the ratios. The variants run interleaved (one call of each per
round, in a shuffled order, --reps rounds), so a slow patch of the machine hits all of them
alike.
With --breakdown B it instead times, at that one size, what each part of the default
objective costs, by switching it off through the public options (keyword term, gradients
through the plan, both), next to ClipLoss, the loop form and the product floors (nine
products with gradients through the plan, seven without), and prints the time budget the
two targets leave (2x ClipLoss, loop / 5).
Usage: python bench/loss.py [--sizes 32 128] [--reps 15] [--breakdown 512]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from release_reference import release_loss  # noqa: E402

from sclip_lightning.losses import SCLIPLoss  # noqa: E402


def inputs(b, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(True)  # noqa: E731
    cand = torch.rand(b, k, generator=g) < 0.1
    return mk(b), mk(b), mk(b), mk(k), cand, torch.tensor(30.0, requires_grad=True)


def interleaved(fns: dict, reps: int, seed: int = 0) -> dict:
    """Median seconds of each callable: one call of each per round, in a fresh random order
    every round (what ran just before, e.g. the allocation-heavy loop form, affects the
    next call), after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_floor(x, y, u, s, plan_grad: bool = True):
    """The nine products of the objective (forward 3, backward 6), without autograd; seven
    (no cost gradients) with ``plan_grad=False``."""
    x, y, u, s = (t.detach() for t in (x, y, u, s))
    b = x.shape[0]

    def run():
        st = y * s
        logits = torch.empty(2 * b, b)
        torch.mm(x, st.T, out=logits[:b])
        torch.mm(u, st.T, out=logits[b:])
        sim = u @ x.T
        d_x = logits[:b] @ st
        d_u = logits[b:] @ st
        d_st = logits[:b].T @ x
        d_st.addmm_(logits[b:].T, u)
        if plan_grad:
            d_x.addmm_(sim.T, u)
            d_u.addmm_(sim, x)

    return run


def loss_calls(x, y, u, k, cand, s):
    """One forward+backward each: ``of(loss)`` for an :class:`SCLIPLoss`, open_clip's
    ClipLoss on the paired batch, the loop form of the release."""
    from open_clip import ClipLoss

    clip = ClipLoss()

    def of(loss):
        def f():
            sum(loss(x, y, s, u, k, cand).values()).backward()

        return f

    def run_clip():
        clip(x, y, s).backward()

    def run_loop():
        sum(release_loss(x, y, s, u, k, cand).values()).backward()

    return of, run_clip, run_loop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--keywords", type=int, default=45)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--max-loop-b", type=int, default=1024)
    p.add_argument("--breakdown", type=int, metavar="B", help="per-part costs at this B instead")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.breakdown:
        return breakdown(args.breakdown, args.dim, args.keywords, args.reps)
    rec, rel = SCLIPLoss(), SCLIPLoss.as_released()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, D={args.dim}, "
        f"K={args.keywords}, forward+backward, median of {args.reps} interleaved rounds"
    )
    header = (
        f"{'B':>6} {'ClipLoss ms':>12} {'recommended ms':>15} {'released ms':>12} "
        f"{'loop ms':>10} {'floor ms':>9} {'floor/Clip':>10} {'rec/Clip':>9} {'rel/Clip':>9} {'loop/rec':>9} {'loop/rel':>9}"
    )
    print(header)
    for b in args.sizes:
        x, y, u, k, cand, s = inputs(b, args.dim, args.keywords)
        run, run_clip, run_loop = loss_calls(x, y, u, k, cand, s)
        fns = {"clip": run_clip, "rec": run(rec), "rel": run(rel), "floor": gemm_floor(x, y, u, s)}
        if b <= args.max_loop_b:
            fns["loop"] = run_loop
        t = interleaved(fns, args.reps)
        t_clip, t_rec, t_rel, t_floor = t["clip"], t["rec"], t["rel"], t["floor"]
        t_loop = t.get("loop", float("nan"))
        print(
            f"{b:>6} {1e3 * t_clip:>12.2f} {1e3 * t_rec:>15.2f} {1e3 * t_rel:>12.2f} "
            f"{1e3 * t_loop:>10.1f} {1e3 * t_floor:>9.2f} {t_floor / t_clip:>10.2f} "
            f"{t_rec / t_clip:>9.2f} {t_rel / t_clip:>9.2f} "
            f"{t_loop / t_rec:>9.1f} {t_loop / t_rel:>9.1f}",
            flush=True,
        )


def count_ops(fn) -> int:
    """ATen operator calls (views included) that one call of ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def breakdown(b: int, dim: int, n_keywords: int, reps: int) -> None:
    """What each part of the default objective costs at one size (see the module doc)."""
    x, y, u, k, cand, s = inputs(b, dim, n_keywords)
    run, run_clip, run_loop = loss_calls(x, y, u, k, cand, s)
    variants = {
        "default": SCLIPLoss(),
        "no keyword term": SCLIPLoss(keyword_weight=0.0),
        "plan detached": SCLIPLoss(detach_plan=True),
        "neither": SCLIPLoss(keyword_weight=0.0, detach_plan=True),
    }
    fns = {name: run(loss) for name, loss in variants.items()}
    fns.update(
        {
            "ClipLoss": run_clip,
            "loop form": run_loop,
            "floor, 9 products": gemm_floor(x, y, u, s),
            "floor, 7 products": gemm_floor(x, y, u, s, plan_grad=False),
        }
    )
    t = {name: 1e3 * v for name, v in interleaved(fns, reps).items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, B_p = B_u = {b}, "
        f"D={dim}, K={n_keywords}, forward+backward, median of {reps} interleaved rounds"
    )
    for name, ms in t.items():
        n_ops = f"{count_ops(fns[name]):5d} operator calls" if "floor" not in name else ""
        print(f"{name:>20} {ms:8.2f} ms  {ms / t['ClipLoss']:5.2f}x ClipLoss  {n_ops}")
    parts = {
        "keyword term": t["default"] - t["no keyword term"],
        "gradients through the plan": t["default"] - t["plan detached"],
        "  of which 2 products": t["floor, 9 products"] - t["floor, 7 products"],
        "all but the 9 products": t["default"] - t["floor, 9 products"],
        "  without keywords/plan grad": t["neither"] - t["floor, 7 products"],
    }
    print("\ncost of each part (differences of the medians above):")
    for name, ms in parts.items():
        print(f"{name:>30} {ms:8.2f} ms")
    budget = {"2x ClipLoss": 2 * t["ClipLoss"], "loop form / 5": t["loop form"] / 5}
    print("\ntargets (default objective):")
    for name, ms in budget.items():
        left = ms - t["floor, 9 products"]
        print(
            f"{name:>20} {ms:8.2f} ms: {left:5.2f} ms beside the 9 products "
            f"(used: {parts['all but the 9 products']:.2f} ms); "
            f"{'met' if t['default'] <= ms else 'not met'}"
        )


if __name__ == "__main__":
    main()
