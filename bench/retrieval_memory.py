"""Peak memory of retrieval evaluation, in one process or per rank of a DDP run (gloo, CPU).

Synthetic features (default 50k images x 250k captions, D = 512, 5 captions per image) are
fed batch by batch to the product's :class:`~sclip_lightning.evaluation.Evaluation` (the
object `SCLIPModule` evaluates with), then `compute()` gathers them (tensor collectives under
DDP) and runs the chunked retrieval. Every run is a fresh process per rank, so peak RSS is
that rank's own. The features are generated per block of images from the block's number, so
every rank count sees the same features and must print the same recalls.

Bound per rank, printed beside the measurement:

    RSS once this rank's features are collected (with the generation's temporaries)
    + all features (the gathered set every rank scores: a second copy of what one process
      collected, the whole set for a rank that collected a share)
    + 4 similarity blocks + rank vectors + 64 MB slack (+ 32 MB under DDP: gloo's buffers)

(a block of similarities, its comparison masks and reduction temporaries were measured at
about 3.7 blocks; the slack covers the allocator and O(M) index vectors). So a rank of a
DDP run needs no more than one process evaluating the whole set. A full image x caption
matrix would need N * M * 4 bytes (47.7 GB at the default sizes).

Usage: python bench/retrieval_memory.py [--images 50000] [--captions 250000] [--dim 512]
       [--max-elements 16777216] [--ranks 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sclip_lightning.evaluation import EvalSpec, Evaluation

BLOCK = 1024  # images generated (and added) per batch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def block_features(b: int, n: int, per_image: int, dim: int):
    """Images ``b*BLOCK ...`` and their captions: the same whatever rank generates them."""
    g = torch.Generator().manual_seed(b)
    ids = torch.arange(b * BLOCK, min(n, (b + 1) * BLOCK))
    img = F.normalize(torch.randn(len(ids), dim, generator=g), dim=-1)
    txt = F.normalize(
        img.repeat(per_image, 1) + 0.8 * torch.randn(per_image * len(ids), dim, generator=g),
        dim=-1,
    )
    return img, ids, txt, ids.repeat(per_image)


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    base = peak_rss_mb()
    n, per_image, d = args.images, args.captions // args.images, args.dim
    blocks = range(-(-n // BLOCK))
    ev = Evaluation(
        [EvalSpec("synthetic", "retrieval", split="test")], max_elements=args.max_elements
    )
    for b in blocks[rank::world]:  # this rank's share of the batches
        ev.add_retrieval(0, *block_features(b, n, per_image, d))
    with_features = peak_rss_mb()
    t = time.perf_counter()
    (row,) = ev.compute()
    seconds = time.perf_counter() - t
    m = n * per_image
    features_mb = (n + m) * d * 4 / 2**20
    slack = 64 + (32 if world > 1 else 0)
    blocks_mb, ranks_mb = 4 * args.max_elements * 4 / 2**20, (n + 2 * m) * 8 / 2**20
    bound = with_features + features_mb + blocks_mb + ranks_mb + slack
    stats = {
        "rank": rank,
        "rss_before_features_mb": round(base, 1),
        "rss_with_features_mb": round(with_features, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "bound_mb": round(bound, 1),
        "seconds": round(seconds, 1),
        "mean_R": round(row["mean_R"], 4),
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(stats, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args: argparse.Namespace, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stats")
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world)
        ranks = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                ranks.append(json.load(f))
    n, m, d = args.images, args.images * (args.captions // args.images), args.dim
    return {
        "ranks": world,
        "images": n,
        "captions": m,
        "dim": d,
        "block_elements": args.max_elements,
        "features_mb": round((n + m) * d * 4 / 2**20, 1),
        "full_matrix_mb": round(n * m * 4 / 2**20, 1),
        "per_rank": ranks,
        # the worst rank, for a one-line check
        "rss_with_features_mb": max(r["rss_with_features_mb"] for r in ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "bound_mb": min(r["bound_mb"] for r in ranks),
        "mean_R": ranks[0]["mean_R"],
        "same_on_every_rank": len({r["mean_R"] for r in ranks}) == 1,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--captions", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--max-elements", type=int, default=1 << 24)
    p.add_argument("--ranks", type=int, nargs="+", default=[1])
    args = p.parse_args(argv)
    results = []
    for world in args.ranks:
        res = run(args, world)
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


if __name__ == "__main__":
    main()
