"""Loader throughput: the combined paired + unpaired loader on rsicd-mini vs the training step.

Prints samples/s (paired + unpaired images) of ``SCLIPDataModule.train_dataloader()`` with 0,
1 and 2 workers (JPEG decode, resize, tokenise, keyword matching), next to the samples/s the
tiny-model S-CLIP training step consumes (forward, backward, AdamW) at the same batch shape.
Usage: python bench/data.py [--root ../shared/data/rsicd-mini] [--batches 40]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from sclip_lightning import SCLIPDataModule, SCLIPModule

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-mini"
DEFAULT_KW = DEFAULT_ROOT.parent / "keywords" / "rs-class-names.txt"


def loader_rate(root, keywords, workers, batches, b, model):
    dm = SCLIPDataModule(
        dataset="rsicd",
        root=str(root),
        keywords=str(keywords),
        num_workers=workers,
        batch_size=b,
        unpaired_batch_size=b,
        model_name=model,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(3):  # warm-up: worker start
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        batch, *_ = next(it)
    dt = time.perf_counter() - t
    n = batch["paired"]["image"].shape[0] + batch["unpaired"]["image"].shape[0]
    return batches * n / dt, dm, batch


def step_rate(dm, batch, model, steps):
    module = SCLIPModule(model_name=model, keyword_vocabulary=dm.keyword_list)
    module.setup("fit")
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

    def step():
        loss = sum(module.compute_losses(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    n = batch["paired"]["image"].shape[0] + batch["unpaired"]["image"].shape[0]
    return steps * n / dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--keywords", type=Path, default=DEFAULT_KW)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--model", default="sclip-tiny-rn")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not (args.root / "dataset_rsicd.json").is_file():
        raise SystemExit(f"rsicd-mini not found at {args.root}; pass --root")
    print(
        f"rsicd-mini, {args.b} paired + {args.b} unpaired per batch, model {args.model}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rates = {}
    for w in args.workers:
        rates[w], dm, batch = loader_rate(
            args.root, args.keywords, w, args.batches, args.b, args.model
        )
        print(f"loader, {w} workers: {rates[w]:8.0f} samples/s", flush=True)
    train = step_rate(dm, batch, args.model, 20)
    print(f"training step consumes: {train:8.0f} samples/s")
    for w, r in rates.items():
        verdict = "not the bottleneck" if r >= train else "BOTTLENECK"
        print(f"  {w} workers: loader / step = {r / train:5.2f}  ({verdict})")


if __name__ == "__main__":
    main()
