"""GPU throughput of the training step in a hand-written loop: CLIP vs S-CLIP.

The loop baseline of ``make gpu-check`` (``bench/throughput.py`` measures the same step
through the Trainer; the difference is what Lightning adds). Random-init open_clip model
(default ViT-B-32), bf16 autocast, B paired + B unpaired images per step for S-CLIP (45
keyword texts) and 2B pairs for CLIP; forward, backward, AdamW. Prints samples/s (images
per second), peak memory and the ratio.
Usage: python bench/gpu_step.py [--model ViT-B-32] [--b 64] [--steps 50] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from sclip_lightning import SCLIPModule
from sclip_lightning.losses import CLIPLoss, SCLIPLoss


def run(method, args, device):
    torch.manual_seed(0)
    vocab = [f"keyword {i}" for i in range(45)]
    criterion = SCLIPLoss() if method == "sclip" else CLIPLoss()
    m = SCLIPModule(model_name=args.model, criterion=criterion, keyword_vocabulary=vocab).to(device)
    m.setup("fit")
    size = m.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    ctx = m.tokenizer(["x"]).shape[1]
    bp, bu = (args.b, args.b) if method == "sclip" else (2 * args.b, 0)
    batch = {
        "paired": {
            "image": torch.randn(bp, 3, size, size, device=device),
            "text": torch.randint(1, 40000, (bp, ctx), device=device),
            "keywords": torch.rand(bp, 45, device=device) < 0.1,
        }
    }
    if bu:
        batch["unpaired"] = {"image": torch.randn(bu, 3, size, size, device=device)}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            loss = sum(m.compute_losses(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return (bp + bu) * args.steps / dt, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--b", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, model {args.model} (random init), {args.precision}, "
        f"S-CLIP {args.b}+{args.b} vs CLIP {2 * args.b} pairs, {args.steps} steps"
    )
    res = {}
    for method in ("clip", "sclip"):
        res[method] = run(method, args, device)
        print(
            f"{method:5s}: {res[method][0]:8.1f} images/s, peak memory {res[method][1]:.2f} GiB",
            flush=True,
        )
    print(f"S-CLIP / CLIP throughput: {res['sclip'][0] / res['clip'][0]:.3f}")


if __name__ == "__main__":
    main()
