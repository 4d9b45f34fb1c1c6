"""Peak memory of retrieval evaluation on synthetic features (default 50k images x 250k captions).

Runs `retrieval_recall` (chunked similarity blocks, `--max-elements` per block) in this
process and prints peak RSS against the stated bound:

    bound = peak RSS once the features exist + 4 similarity blocks + rank vectors

+ 64 MB slack (a block of similarities, its comparison masks and reduction temporaries,
measured at about 3.7 blocks; the slack covers the allocator and O(M) index vectors). A full image x caption matrix would need N * M * 4 bytes (50 GB at the default).
Usage: python bench/retrieval_memory.py [--images 50000] [--captions 250000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from sclip_lightning.metrics import retrieval_recall


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--captions", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--max-elements", type=int, default=1 << 24)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    n, m, d = args.images, args.captions, args.dim
    img = torch.empty(n, d)
    txt = torch.empty(m, d)
    owner = torch.arange(m) % n  # 5 captions per image at the default sizes
    for s in range(0, n, 8192):  # filled in slices: no full-size temporaries
        img[s : s + 8192] = F.normalize(torch.randn(min(8192, n - s), d), dim=-1)
    for s in range(0, m, 8192):
        noise = torch.randn(min(8192, m - s), d)
        txt[s : s + 8192] = F.normalize(img[owner[s : s + 8192]] + 0.8 * noise, dim=-1)
    features_mb = (img.numel() + txt.numel()) * 4 / 2**20
    before = peak_rss_mb()  # the process with its features (and their generation temporaries)
    block_mb = args.max_elements * 4 / 2**20
    ranks_mb = (n + 2 * m) * 8 / 2**20
    slack_mb = 64.0  # allocator and small O(M) temporaries (masks, indices)
    bound = before + 4 * block_mb + ranks_mb + slack_mb
    t = time.perf_counter()
    recall = retrieval_recall(img, txt, owner, max_elements=args.max_elements)
    seconds = time.perf_counter() - t
    out = {
        "images": n,
        "captions": m,
        "dim": d,
        "block_elements": args.max_elements,
        "rss_with_features_mb": round(before, 1),
        "features_mb": round(features_mb, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "bound_mb": round(bound, 1),
        "full_matrix_mb": round(n * m * 4 / 2**20, 1),
        "seconds": round(seconds, 1),
        "mean_R": round(recall["mean_R"], 2),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
