"""Unpaired images from WebDataset shards against the same images in a folder.

1. Writes, once, a synthetic set of small JPEG images (default 100,000 of 48 px, smooth
   colour fields with a few shapes) as WebDataset shards of 1,000 samples, in img2dataset's
   layout (``<key>.jpg``, ``<key>.txt``), and the same bytes as files in a folder
   (``<shard>/<key>.jpg``), under ``--root`` (default ``$SCLIP_CACHE/bench_shards``).
2. Measures, each in a fresh process: samples/s of the product's training loaders for
   unpaired images (:class:`~sclip_lightning.data.shards.ShardLoader` over
   :class:`~sclip_lightning.data.shards.ShardStream`, and the folder path: ``image_folder``
   source + ``UnpairedTrainSet`` + ``ResumableLoader``) with 0, 1 and 2 workers, the same
   transform (the tiny model's random-resized-crop training transform), batches of 64; and
   peak RSS (main process, and the largest worker) with 10,000 vs 100,000 images.

Samples/s is measured after the first batch (worker start-up and, for the folder, the file
listing are reported apart as ``startup_s``). Ratios are shards / folder at the same worker
count, in the same run.

Usage: python bench/shards.py [--images 100000] [--batches 150] [--root DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PER_SHARD = 1000
BATCH = 64


def write_images(root: Path, n: int, size: int = 48) -> None:
    """The shard set and the folder copy (skipped when ``root/done.json`` says they exist)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageDraw

    done = root / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("images") == n:
        return
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    yy, xx = np.mgrid[0:size, 0:size] / size
    for s in range(-(-n // PER_SHARD)):
        folder = root / "folder" / f"{s:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(root / "shards" / f"{s:05d}.tar")) as sink:
            for i in range(min(PER_SHARD, n - s * PER_SHARD)):
                a, b, c = rng.uniform(0, 255, 3), rng.uniform(-120, 120, 3), rng.uniform(-80, 80, 3)
                pixels = a + b * xx[..., None] + c * yy[..., None]
                img = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
                x, y = rng.integers(0, size - 12, 2)
                ImageDraw.Draw(img).ellipse(
                    [x, y, x + 12, y + 12], fill=tuple(rng.integers(0, 255, 3))
                )
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                key = f"{s:05d}{i:04d}"
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"image {key}"})
                (folder / f"{key}.jpg").write_bytes(buf.getvalue())
        if s % 10 == 9:
            print(
                f"  wrote {(s + 1) * PER_SHARD} images ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    done.write_text(json.dumps({"images": n, "size": size}))


def measure(kind: str, root: Path, images: int, workers: int, batches: int) -> dict:
    """Run in a fresh process: samples/s and peak RSS of one loader."""
    import torch

    from sclip_lightning.data.datamodule import UnpairedTrainSet
    from sclip_lightning.data.generic import ImageFolderUnpaired
    from sclip_lightning.data.sampling import ResumableLoader
    from sclip_lightning.data.shards import ShardLoader, ShardStream
    from sclip_lightning.models import build_transforms

    torch.set_num_threads(1)
    transform = build_transforms("sclip-tiny", True)
    shards = images // PER_SHARD
    t0 = time.perf_counter()
    if kind == "shards":
        pattern = str(root / "shards") + "/{" + f"{0:05d}..{shards - 1:05d}" + "}.tar"
        stream = ShardStream(pattern, transform, BATCH, seed=0)
        loader = ShardLoader(stream, batches, lambda: (0, 0), num_workers=workers)
    else:
        # the folder of the first `images` images (whole shard folders)
        base = ImageFolderUnpaired(root / "folder")
        base.paths = [p for p in base.paths if int(p.parent.name) < shards]
        loader = ResumableLoader(
            UnpairedTrainSet(base, range(len(base.paths)), transform),
            BATCH, seed=0, stream=1, progress=lambda: (0, 0), num_workers=workers,
        )  # fmt: skip
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    t = time.perf_counter()
    n = 0
    for _, batch in zip(range(batches - 1), it, strict=False):
        n += batch["image"].shape[0]
    seconds = time.perf_counter() - t
    del it
    import gc

    gc.collect()
    return {
        "loader": kind,
        "images": images,
        "workers": workers,
        "samples": n,
        "samples_per_s": round(n / seconds, 1),
        "startup_s": round(startup, 2),
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--small", type=int, default=10_000, help="the smaller set of the RSS pair")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=None, help="write the rows as JSON here too")
    p.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        kind, root, images, workers = args._measure
        print(json.dumps(measure(kind, Path(root), int(images), int(workers), args.batches)))
        return []
    if args.images % PER_SHARD or args.small % PER_SHARD:
        sys.exit(f"--images and --small must be multiples of {PER_SHARD} (one shard)")
    from sclip_lightning.models import cache_dir

    root = Path(args.root) if args.root else cache_dir() / "bench_shards"
    print(f"images under {root}", flush=True)
    write_images(root, args.images)
    runs = [(k, args.images, w) for w in args.workers for k in ("folder", "shards")]
    runs += [(k, args.small, max(args.workers)) for k in ("folder", "shards")]
    rows = []
    for kind, images, workers in runs:
        cmd = [sys.executable, __file__, "--batches", str(args.batches),
               "--_measure", kind, str(root), str(images), str(workers)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| images | workers | folder samples/s | shards samples/s | shards / folder |")
    print("|---|---|---|---|---|")
    for images in (args.images, args.small):
        for w in sorted({r["workers"] for r in rows if r["images"] == images}):
            f, s = (next(r for r in rows if r["loader"] == k and r["images"] == images
                         and r["workers"] == w) for k in ("folder", "shards"))  # fmt: skip
            ratio = s["samples_per_s"] / f["samples_per_s"]
            print(f"| {images} | {w} | {f['samples_per_s']} | {s['samples_per_s']} | {ratio:.2f} |")
    print("\n| loader | images | workers | peak RSS main (MB) | peak RSS largest worker (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["workers"] == max(args.workers):
            print(f"| {r['loader']} | {r['images']} | {r['workers']} | {r['peak_rss_main_mb']} "
                  f"| {r['peak_rss_worker_mb']} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
