"""Loss benchmark: SCLIPLoss forward+backward time as a ratio to baselines in the same run.

For B_p = B_u in {32, 128, 512, 1024}, D = 512, K = 45 it times
  - open_clip's ClipLoss on the paired batch (what plain CLIP pays),
  - SCLIPLoss recommended (POT-order Sinkhorn in float64, gradients through the plan,
    softmax keyword weights) and released (linear keyword weights),
  - SCLIPLoss recommended with a full support bank of 4B pairs (the OT support is 5B),
  - SCLIPLoss with the unbalanced OT assigner (POT's solver),
  - the loop-form reimplementation of the release (bench/release_reference.py: POT call and a
    Python loop over unpaired images), skipped above --max-loop-b,
and prints medians and the ratios. The variants run interleaved (one call of each per
round, in a shuffled order, --reps rounds), so a slow patch of the machine hits all of them
alike. The loss is a small part of a training step; bench/step.py times the step.
Usage: python bench/loss.py [--sizes 32 128] [--reps 15]
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

from sclip_lightning.losses import SCLIPLoss, UnbalancedOTAssigner  # noqa: E402


def inputs(b, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(True)  # noqa: E731
    cand = torch.rand(b, k, generator=g) < 0.1
    return mk(b), mk(b), mk(b), mk(k), cand, torch.tensor(30.0, requires_grad=True)


def interleaved(fns: dict, reps: int, seed: int = 0) -> dict:
    """Median seconds of each callable: one call of each per round, in a fresh random order
    every round, after a warm-up."""
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


def banked(b: int, d: int, k: int) -> SCLIPLoss:
    """A recommended loss whose FIFO bank already holds 4B detached pairs."""
    loss = SCLIPLoss(support_bank_size=4 * b)
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(4 * b, d, generator=g), dim=-1)
    loss.bank.push(feats, feats, torch.rand(4 * b, k, generator=g) < 0.1, None)
    return loss.eval()  # eval: the timed calls do not push (the bank stays at 4B)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--keywords", type=int, default=45)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--max-loop-b", type=int, default=1024)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from open_clip import ClipLoss

    clip = ClipLoss()
    losses = {
        "recommended": SCLIPLoss(),
        "released": SCLIPLoss.released(),
        "unbalanced": SCLIPLoss(assigner=UnbalancedOTAssigner()),
    }
    print(f"D={args.dim}, K={args.keywords}, threads={torch.get_num_threads()}, median ms")
    cols = ["ClipLoss", "recommended", "released", "bank 4B", "unbalanced", "loop"]
    print(
        "| B | "
        + " | ".join(f"{c} ms" for c in cols)
        + " | rec / Clip | bank / Clip | unb / Clip | loop / rec |"
    )
    print("|" + "---|" * (len(cols) + 5))
    for b in args.sizes:
        x, y, u, k, cand, s = inputs(b, args.dim, args.keywords)
        calls = {name: _of(loss, x, y, u, k, cand, s) for name, loss in losses.items()}
        calls["bank 4B"] = _of(banked(b, args.dim, args.keywords), x, y, u, k, cand, s)
        calls["ClipLoss"] = lambda: clip(x, y, s).backward()
        if b <= args.max_loop_b:
            calls["loop"] = lambda: sum(release_loss(x, y, s, u, k, cand).values()).backward()
        t = interleaved(calls, args.reps)
        ms = {n: 1e3 * v for n, v in t.items()}
        cells = [f"{ms[c]:.2f}" if c in ms else "-" for c in cols]
        loop_ratio = f"{ms['loop'] / ms['recommended']:.1f}" if "loop" in ms else "-"
        print(
            f"| {b} | "
            + " | ".join(cells)
            + f" | {ms['recommended'] / ms['ClipLoss']:.2f} | {ms['bank 4B'] / ms['ClipLoss']:.2f}"
            + f" | {ms['unbalanced'] / ms['ClipLoss']:.2f} | {loop_ratio} |",
            flush=True,
        )


def _of(loss, x, y, u, k, cand, s):
    def run():
        sum(loss(x, y, s, u, k, cand).values()).backward()

    return run


if __name__ == "__main__":
    main()
