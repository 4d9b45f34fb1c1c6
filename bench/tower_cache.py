"""The first tower-cache pass on rsicd-mini: the pass before issue 21 against the current one.

Both run in one process on the same first N training images of rsicd-mini and their captions,
through the product's ``TowerOutputCache`` fed by ``SCLIPModule.configure_tower_cache`` (the
offline towers of ``configs/real/rsicd_mini_lit.yaml``: EfficientNet-lite0 at 150 px and
MiniLM, both locked, ``tower_cache: both``, 128 per batch, no loader workers):

- old: the frozen parts batch by batch (the training modules, contiguous layout, 128 images
  per forward: ``CachedTowers.frozen_outputs`` batch by batch, the code before the change);
- new: ``CachedTowers.frozen_pass``, what the module hands the data module: for images an inference copy of the frozen trunk
  (BatchNorm folded into the convolutions, channels-last, 32 images per forward on a CPU);
  captions as before.

Rounds alternate the order (old first, then new first, ...) so that load from other
processes falls on both; the table gives the median and the range over rounds. Then the
outputs: the largest difference between the passes, and each against a float64 computation
of the same frozen part (the exact value up to 1e-16), with the training path without the
cache (contiguous, float32, a training step's 64 images) for comparison.

``--breakdown`` also times the parts on preloaded inputs (decode + transform, image forward
by variant, caption forward) to show where the time goes and what each change buys (and
what did not: inference mode instead of no_grad).

Usage: python bench/tower_cache.py [--root ../shared/data/rsicd-mini] [--n 512]
       [--repeats 3] [--reference 128] [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-mini"
MODEL, SIZE, BATCH = "sclip-effnet-minilm", 150, 128  # configs/real/rsicd_mini_lit.yaml


class _First:
    """The first ``n`` items of a captioned data set (``paths`` and ``captions`` with them)."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n = base, min(n, len(base))
        self.paths, self.captions = base.paths[: self.n], base.captions[: self.n]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[i]


class _Capture:
    """Stands in for the data module: keeps what ``configure_tower_cache`` hands over."""

    def use_tower_outputs(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def _caches(module: Any, transform: Any, tokenizer: Any, new: bool) -> tuple[Any, Any]:
    """(images-only, captions-only) caches of the old or the new pass, memory only."""
    from sclip_lightning.data.tower_cache import TowerOutputCache

    capture = _Capture()
    module.configure_tower_cache(capture)
    kw = dict(capture.kwargs)
    if not new:  # the pass before the change: the training modules batch by batch
        towers = module.towers
        for tower in ("image", "text"):
            kw[f"{tower}_pass"] = partial(_per_batch, towers, tower)
    shared = dict(
        image_key=kw["image_key"],
        text_key=kw["text_key"],
        transform=transform,
        tokenizer=tokenizer,
        directory=None,
        batch_size=BATCH,
        num_workers=0,
    )
    images = TowerOutputCache(kw["image_pass"], None, **shared)
    texts = TowerOutputCache(None, kw["text_pass"], **shared)
    return images, texts


def _per_batch(towers: Any, tower: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext(partial(towers.frozen_outputs, tower))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})"


def _breakdown(module: Any, base: Any, transform: Any, tokenizer: Any, rounds: int) -> None:
    """Times the parts on preloaded inputs, variants interleaved in every round."""
    from sclip_lightning.towers import fold_batchnorm

    n = len(base)
    pixels = torch.stack([transform(base[i]["image"]) for i in range(n)])
    caps = sorted({c for cs in base.captions for c in cs}, key=lambda c: (len(c), c))
    tokens = [tokenizer(caps[s : s + BATCH]) for s in range(0, len(caps), BATCH)]
    trunk = module.model.visual.trunk
    channels_last = copy.deepcopy(trunk).to(memory_format=torch.channels_last)
    folded = copy.deepcopy(trunk)
    fold_batchnorm(folded)
    folded_cl = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    text = module.towers.splits["text"].frozen
    cl = torch.channels_last

    def forward(net: Any, batch: int, layout: torch.memory_format, mode: Any) -> None:
        with mode():
            for s in range(0, n, batch):
                net(pixels[s : s + batch].contiguous(memory_format=layout))

    def decode() -> None:
        for i in range(n):
            transform(base[i]["image"])

    def captions(mode: Any) -> None:
        with mode():
            for t in tokens:
                text(t)

    contiguous, nograd, infer = torch.contiguous_format, torch.no_grad, torch.inference_mode
    parts: dict[str, tuple[int, Callable[[], None]]] = {
        "read + decode + transform (old = new)": (n, decode),
        "image forward: contiguous, 128, no_grad (old)": (
            n,
            lambda: forward(trunk, 128, contiguous, nograd),
        ),
        "image forward: inference mode": (n, lambda: forward(trunk, 128, contiguous, infer)),
        "image forward: channels-last": (n, lambda: forward(channels_last, 128, cl, nograd)),
        "image forward: channels-last, 32": (n, lambda: forward(channels_last, 32, cl, nograd)),
        "image forward: BN folded, contiguous, 32": (
            n,
            lambda: forward(folded, 32, contiguous, nograd),
        ),
        "image forward: BN folded, channels-last, 32 (new)": (
            n,
            lambda: forward(folded_cl, 32, cl, nograd),
        ),
        "image forward: BN folded, channels-last, 16": (
            n,
            lambda: forward(folded_cl, 16, cl, nograd),
        ),
        "image forward: BN folded, channels-last, 32, inference mode": (
            n,
            lambda: forward(folded_cl, 32, cl, infer),
        ),
        "caption forward, no_grad (old = new)": (len(caps), lambda: captions(nograd)),
        "caption forward, inference mode": (len(caps), lambda: captions(infer)),
    }
    rates: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(rounds):
        order = list(parts) if r % 2 == 0 else list(reversed(parts))
        for name in order:
            count, fn = parts[name]
            dt, _ = _timed(fn)
            rates[name].append(count / dt)
    print(f"\nbreakdown ({n} images, {len(caps)} distinct captions, {rounds} rounds):")
    print("| part | items/s, median (range) |\n|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {_spread(values)} |")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the benchmark; returns its numbers (None when rsicd-mini is absent): ``ratio``
    (median new / old images/s per part), ``error`` (max abs difference to float64 of old,
    new and the uncached path, and new - old), ``scale`` (max |float64 output|)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--n", type=int, default=512, help="training images (with their captions)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of old + new")
    p.add_argument("--reference", type=int, default=128, help="images of the float64 check")
    p.add_argument("--breakdown", action="store_true", help="also time the parts")
    args = p.parse_args(argv)
    if not (args.root / "dataset_rsicd.json").is_file():
        print(f"bench/tower_cache.py skipped: rsicd-mini not found at {args.root} (pass --root)")
        return None
    warnings.filterwarnings("ignore")
    from sclip_lightning import SCLIPModule
    from sclip_lightning.data.remote_sensing import RSICD
    from sclip_lightning.models import build_tokenizer, build_transforms
    from sclip_lightning.towers import image_split

    module = SCLIPModule(
        model_name=MODEL,
        pretrained="offline",
        image_size=SIZE,
        lock_image=True,
        lock_text=True,
        tower_cache="both",
    )
    transform = build_transforms(MODEL, False, SIZE)
    tokenizer = build_tokenizer(MODEL)
    base = _First(RSICD(args.root, "train"), args.n)
    n, n_caps = len(base), sum(len(c) for c in base.captions)
    print(
        f"rsicd-mini: the first {n} training images and their {n_caps} captions "
        f"({len({c for cs in base.captions for c in cs})} distinct), {MODEL} at {SIZE} px, "
        f"batches of {BATCH}, no loader workers, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    times: dict[str, dict[str, list[float]]] = {
        v: {"images": [], "captions": []} for v in ("old", "new")
    }
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(args.repeats):
        for variant in ("old", "new") if r % 2 == 0 else ("new", "old"):
            images, texts = _caches(module, transform, tokenizer, variant == "new")
            dt_i, out_i = _timed(lambda c=images: c.outputs("bench", base, captions=False))
            dt_t, out_t = _timed(lambda c=texts: c.outputs("bench", base, captions=True))
            times[variant]["images"].append(dt_i)
            times[variant]["captions"].append(dt_t)
            outputs[variant] = {"images": out_i.images, "captions": out_t.captions}
            print(f"round {r + 1} {variant}: images {dt_i:6.1f} s, captions {dt_t:6.1f} s")

    def rate(variant: str, part: str, count: int) -> list[float]:
        if part == "whole":
            pairs = zip(times[variant]["images"], times[variant]["captions"], strict=True)
            return [count / (a + b) for a, b in pairs]
        return [count / t for t in times[variant][part]]

    result: dict[str, Any] = {"ratio": {}, "error": {}}
    print("\n| pass | old | new | new / old, median (range) |\n|---|---|---|---|")
    for part, count, unit in (
        ("images", n, "images/s"),
        ("captions", n_caps, "captions/s"),
        ("whole", n, "images/s, captions included"),
    ):
        old, new = rate("old", part, count), rate("new", part, count)
        ratios = [b / a for a, b in zip(old, new, strict=True)]  # round by round
        result["ratio"][part] = statistics.median(ratios)
        print(
            f"| {part} ({unit}) | {_spread(old)} | {_spread(new)} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )

    # outputs: old vs new, and both against float64 on the first --reference images
    k = min(args.reference, n)
    old_i, new_i = outputs["old"]["images"], outputs["new"]["images"]
    caps_diff = (outputs["new"]["captions"] - outputs["old"]["captions"]).abs().max().item()
    pixels = torch.stack([transform(base[i]["image"]) for i in range(k)])
    exact = image_split(copy.deepcopy(module.model).double())
    with torch.no_grad():
        ref = torch.cat([exact.frozen(b.double()) for b in pixels.split(BATCH)])
        uncached = torch.cat([module.towers.splits["image"].frozen(b) for b in pixels.split(64)])
    scale = ref.abs().max().item()

    error = result["error"]
    error["new - old"] = (new_i - old_i).abs().max().item()
    error["new - uncached"] = (new_i[:k] - uncached).abs().max().item()
    for name, x in (("old", old_i), ("new", new_i), ("uncached", uncached)):
        error[name] = (x[:k].double() - ref).abs().max().item()
    error["captions new - old"] = caps_diff
    result["scale"] = scale
    print(f"\nimage outputs ({tuple(old_i.shape[1:])} per image, max |output| {scale:.2f}):")
    for what, key in (
        ("max |new - old|", "new - old"),
        ("max |new - uncached training path|", "new - uncached"),
        ("old (cache pass before) vs float64", "old"),
        ("new (cache pass now) vs float64", "new"),
        ("uncached training path vs float64", "uncached"),
    ):
        print(f"  {what:38s}{error[key]:.2e} ({error[key] / scale:.1e} of max |output|)")
    print(f"caption outputs: max |new - old| {caps_diff:.2e}")
    if args.breakdown:
        _breakdown(module, base, transform, tokenizer, args.repeats)
    return result


if __name__ == "__main__":
    main()
