"""What the strong view (SemiCLIP's stage 2) costs the unpaired training loader.

Images/s of the unpaired training items over the first ``--images`` unpaired images of
rsicd-mini (``$SHARED/data/rsicd-mini``, or ``--root``): the item as every S-CLIP run reads it
(PIL load + the weak training transform) against the item with the strong view too (load +
weak + :func:`~sclip_lightning.data.augment.build_strong_transform`), each through an
in-process DataLoader (``num_workers=0``, batches of 32, per-sample seeds as in training),
median of ``--repeats`` passes, at the model's input size ``--image-size`` (default 224, the
release's). The ratio is (weak + strong) / weak time per image; workers divide both alike.

Usage: python bench/strong_view.py [--images 256] [--repeats 3] [--image-size 224] [--root DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def images_per_second(dataset, n: int, repeats: int) -> float:
    """Median images/s of ``repeats`` full passes of a DataLoader over ``dataset``."""
    from torch.utils.data import DataLoader

    keys = [(i, 1000 + i) for i in range(n)]
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _batch in DataLoader(dataset, batch_size=32, sampler=keys, num_workers=0):
            pass
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(SHARED / "data" / "rsicd-mini"))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model", default="sclip-tiny")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not (root / "dataset_rsicd.json").is_file():
        print(f"skipped: rsicd-mini not found at {root} (needs the shared/ folder)")
        return
    import torch

    from sclip_lightning.data import registry
    from sclip_lightning.data.augment import build_strong_transform
    from sclip_lightning.data.datasets import UnpairedTrainSet
    from sclip_lightning.models import build_transforms

    torch.set_num_threads(1)
    base = registry.build_captioned("rsicd", root, "train")
    indices = list(range(min(args.images, len(base))))
    weak = build_transforms(args.model, True, args.image_size)
    strong = build_strong_transform(args.model, args.image_size)
    plain = UnpairedTrainSet(base, indices, weak)
    both = UnpairedTrainSet(base, indices, weak, strong=strong)
    images_per_second(plain, min(32, len(indices)), 1)  # warm the page cache and imports
    n = len(indices)
    r_weak = images_per_second(plain, n, args.repeats)
    r_both = images_per_second(both, n, args.repeats)
    print(f"{n} images of {root.name} at {args.image_size} px, num_workers=0, torch threads 1,")
    print(f"median of {args.repeats} passes:")
    print(f"  load + weak           {r_weak:8.1f} images/s  ({1e3 / r_weak:6.2f} ms/image)")
    print(f"  load + weak + strong  {r_both:8.1f} images/s  ({1e3 / r_both:6.2f} ms/image)")
    print(f"  time ratio (weak + strong) / weak: {r_weak / r_both:.2f}x")


if __name__ == "__main__":
    main()
