"""Training-step benchmark: S-CLIP vs the CLIP baseline with the same number of encoded images.

S-CLIP step: B paired + B unpaired images, B captions, K keyword texts, all three losses.
S-CLIP + bank: the same, with a full support bank of N paired features (``--bank N``,
``support_bank_size=-1`` with N slots: the OT support is B + N).
CLIP step: 2B paired images and their 2B captions, contrastive loss only.
All: forward, backward and an AdamW step of the same open_clip model, on random inputs,
through ``SCLIPModule.compute_losses`` (what ``training_step`` runs).
Prints medians and the ratios. Usage: python bench/step.py [--model sclip-tiny-rn] [--b 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from sclip_lightning import SCLIPModule
from sclip_lightning.losses import CLIPLoss, SCLIPLoss


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
            "pair_index": torch.arange(bp),
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
    p.add_argument("--bank", type=int, default=720, help="slots of the bank variant (0: skip)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    vocab = [f"keyword {i}" for i in range(args.keywords)]
    torch.manual_seed(0)
    sclip = SCLIPModule(model_name=args.model, keyword_vocabulary=vocab)
    sclip.setup("fit")
    torch.manual_seed(0)
    clip = SCLIPModule(model_name=args.model, criterion=CLIPLoss())
    clip.setup("fit")
    b_s = make_batch(sclip, args.b, args.b, args.keywords)
    b_c = make_batch(clip, 2 * args.b, 0, 0)
    variants = {"CLIP": (clip, b_c), "S-CLIP": (sclip, b_s)}
    if args.bank:
        torch.manual_seed(0)
        banked = SCLIPModule(
            model_name=args.model,
            keyword_vocabulary=vocab,
            criterion=SCLIPLoss(support_bank_size=-1),
        )
        banked.setup("fit")
        bank = banked.criterion.bank
        bank.set_capacity(args.bank)
        g = torch.Generator().manual_seed(1)
        dim = banked.model.text_projection.shape[1]
        feats = torch.nn.functional.normalize(torch.randn(args.bank, dim, generator=g), dim=-1)
        cand = torch.rand(args.bank, args.keywords, generator=g) < 0.1
        bank.push(feats, feats, cand, torch.arange(args.bank))  # every slot filled
        b_b = make_batch(banked, args.b, args.b, args.keywords)
        b_b["paired"]["pair_index"] = torch.arange(args.b)  # their slots are left out
        variants[f"S-CLIP + bank ({args.bank})"] = (banked, b_b)
    print(
        f"model {args.model}, threads {torch.get_num_threads()}; S-CLIP {args.b}+{args.b} "
        f"images, K={args.keywords}; CLIP {2 * args.b} pairs; median step over {args.steps}"
    )
    ratios: dict[str, list[float]] = {name: [] for name in variants if name != "CLIP"}
    for r in range(args.rounds):  # alternate to spread drift over all
        times = {name: time_steps(m, b, args.steps) for name, (m, b) in variants.items()}
        line = ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in times.items())
        for name in ratios:
            ratios[name].append(times[name] / times["CLIP"])
        print(f"round {r}: {line}", flush=True)
    for name, values in ratios.items():
        print(f"{name} / CLIP step time (median of rounds): {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
