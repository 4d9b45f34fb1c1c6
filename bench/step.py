"""Training-step benchmark: S-CLIP vs the CLIP baseline with the same number of encoded images.

S-CLIP step: B paired + B unpaired images, B captions, K keyword texts, all three losses.
CLIP step: 2B paired images and their 2B captions, contrastive loss only.
Both: forward, backward and an AdamW step of the same open_clip model, on random inputs.
Prints medians and the ratio. Usage: python bench/step.py [--model sclip-tiny-rn] [--b 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from sclip_lightning import SCLIPModule


def make_batch(module, bp, bu, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = module.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    ctx = module.tokenizer(["x"]).shape[1]
    batch = {
        "paired": {
            "image": torch.randn(bp, 3, size, size, generator=g),
            "text": torch.randint(1, 40000, (bp, ctx), generator=g),
            "keywords": torch.rand(bp, k, generator=g) < 0.1,
        }
    }
    if bu:
        batch["unpaired"] = {"image": torch.randn(bu, 3, size, size, generator=g)}
    return batch


def time_steps(module, batch, steps):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

    def step():
        loss = sum(module.compute_losses(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="sclip-tiny-rn")
    p.add_argument("--b", type=int, default=32)
    p.add_argument("--keywords", type=int, default=45)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    vocab = [f"keyword {i}" for i in range(args.keywords)]
    torch.manual_seed(0)
    sclip = SCLIPModule(model_name=args.model, keyword_vocabulary=vocab)
    sclip.setup("fit")
    torch.manual_seed(0)
    clip = SCLIPModule(model_name=args.model, method="clip")
    clip.setup("fit")
    b_s = make_batch(sclip, args.b, args.b, args.keywords)
    b_c = make_batch(clip, 2 * args.b, 0, 0)
    print(
        f"model {args.model}, threads {torch.get_num_threads()}; S-CLIP {args.b}+{args.b} "
        f"images, K={args.keywords}; CLIP {2 * args.b} pairs; median step over {args.steps}"
    )
    ratios = []
    for r in range(args.rounds):  # alternate to spread drift over both
        t_c = time_steps(clip, b_c, args.steps)
        t_s = time_steps(sclip, b_s, args.steps)
        ratios.append(t_s / t_c)
        print(
            f"round {r}: CLIP {1e3 * t_c:.1f} ms, S-CLIP {1e3 * t_s:.1f} ms, ratio {t_s / t_c:.3f}",
            flush=True,
        )
    print(f"S-CLIP / CLIP step time (median of rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
