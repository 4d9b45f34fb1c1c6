"""Training throughput through the Trainer, host-device syncs per step, and the loader alone.

Part (c) of ``make gpu-check`` (``bench/gpu_check.py``); each subcommand also runs alone and
appends one JSON object per result to ``--json`` (partial results survive a time-out).

``trainer``: ``SCLIPModule`` under ``lightning.Trainer(precision=..., max_steps=N,
logger=False, enable_checkpointing=False)``, open_clip model from random weights (nothing is
downloaded), batches of B paired + B unpaired images made once on the device (so the step,
not the loader, is measured), 45 keywords. Configurations: CLIP (2B pairs: the same number
of encoded images), S-CLIP (B + B), S-CLIP with the support bank of all pairs and unbalanced
OT, and S-CLIP with Lightning's progress bar on (as ``sclip fit`` runs). A callback times the
steps after the warm-up (``torch.cuda.synchronize`` at the two timing boundaries only), then
counts host-device synchronisations per step with ``torch.cuda.set_sync_debug_mode("warn")``
(each sync is a warning; its Python stack names the call) by phase of the step (forward =
``training_step``, backward, optimiser step with the non-finite guard, Lightning's loop
between steps), and counts the synchronising CUDA runtime calls with the profiler as a
cross-check. Logging steps (every ``log_every_n_steps``) are counted apart: the guard reads
its device-side record there by design. ``--loop`` adds the hand-written loop of
``bench/gpu_step.py`` for the same model and batch (what the Trainer adds).

``loader``: the product's training loader (``SCLIPDataModule``: JPEG decode, open_clip's train
transform, tokenisation, keyword table) over real JPEGs in RSICD's layout, with as many
workers as the machine has cores, B + B images per step; images per second after a warm-up.

``prepare-images``: copy the first N training images of an RSICD-layout folder (rsicd-mini)
into a small folder that can travel with the repository (git-ignored).

Usage: ``python bench/throughput.py trainer --device cuda``; ``python bench/throughput.py
loader --images gpu_check_data/rsicd``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SYNC_MESSAGE = "called a synchronizing CUDA operation"
#: synchronising CUDA runtime calls the profiler records (cudaMemcpy without Async blocks)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SYNC_CALLS_EXACT = ("cudaMemcpy", "cudaMemcpy2D", "cudaMemset")

#: configuration name -> (method, SCLIPLoss options, progress bar)
CONFIGS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "clip": ("clip", {}, False),
    "sclip": ("sclip", {}, False),
    "sclip_bank": ("sclip", {"support_bank_size": -1}, False),
    "sclip_bank_uot": (
        "sclip",
        {"support_bank_size": -1, "assigner": "UnbalancedOTAssigner"},
        False,
    ),
    "sclip_progress_bar": ("sclip", {}, True),
}
LABELS = {
    "clip": "CLIP, 2B pairs",
    "sclip": "S-CLIP, B + B (default)",
    "sclip_bank": "S-CLIP + bank (all pairs)",
    "sclip_bank_uot": "S-CLIP + bank (all pairs) + unbalanced OT",
    "sclip_progress_bar": "S-CLIP, progress bar on (as sclip fit)",
}


def emit(path: str | None, record: dict[str, Any]) -> None:
    """Print one result and append it as a JSON line to ``path``."""
    print(json.dumps(record), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------- synthetic batches
class DeviceBatches:
    """``steps`` training batches cycling over a few made once on ``device``."""

    def __init__(self, batches: list[dict[str, Any]], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def make_datamodule(
    module: Any, b_paired: int, b_unpaired: int, steps: int, keywords: list[str], pairs: int
):
    """A LightningDataModule serving device-resident batches and ``train_info()`` (keywords,
    number of pairs: the support bank's slots)."""
    import lightning as L
    import torch

    from sclip_lightning.interfaces import TrainInfo

    class SyntheticSteps(L.LightningDataModule):
        def train_info(self) -> TrainInfo:
            return TrainInfo(list(keywords), pairs)

        def train_dataloader(self) -> DeviceBatches:
            device = self.trainer.strategy.root_device
            g = torch.Generator().manual_seed(0)
            size = module.model.visual.image_size
            size = size[0] if isinstance(size, tuple) else size
            captions = [
                f"an aerial photograph of {keywords[i % len(keywords)]} near a road number {i}"
                for i in range(b_paired)
            ]
            tokens = module.tokenizer(captions)
            made = []
            for _ in range(2):
                paired = {
                    "image": torch.randn(b_paired, 3, size, size, generator=g),
                    "text": tokens,
                    "keywords": torch.rand(b_paired, len(keywords), generator=g) < 0.1,
                    "pair_index": torch.randperm(pairs, generator=g)[:b_paired],
                }
                batch = {"paired": {k: v.to(device) for k, v in paired.items()}}
                if b_unpaired:
                    image = torch.randn(b_unpaired, 3, size, size, generator=g)
                    batch["unpaired"] = {"image": image.to(device)}
                made.append(batch)
            return DeviceBatches(made, steps)

    return SyntheticSteps()


# ------------------------------------------------------------------------- callbacks
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times optimiser steps ``[start, start + steps)``; peak memory of that window."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.seconds: float | None = None
        self.peak_gib: float | None = None
        self._t0 = 0.0

    def callback(self):
        import lightning as L
        import torch

        timer = self

        class _Timer(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                if trainer.global_step == timer.start:
                    _sync(module.device)
                    if module.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(module.device)
                    timer._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                if trainer.global_step == timer.start + timer.steps:
                    _sync(module.device)
                    timer.seconds = time.perf_counter() - timer._t0
                    if module.device.type == "cuda":
                        timer.peak_gib = torch.cuda.max_memory_allocated(module.device) / 2**30

        return _Timer()


class SyncCounter:
    """Counts host-device synchronisations in optimiser steps ``[start, start + steps)``.

    Each synchronising CUDA call is a warning under ``torch.cuda.set_sync_debug_mode("warn")``
    (CUDA only); the warning is recorded with the phase of the step it came from and the
    innermost frames of its Python stack outside torch (who asked for it). A warning filter
    at the front keeps these warnings visible to the counter whatever other filters say.
    """

    PHASES = ("forward (training_step)", "backward", "optimizer + guard", "Lightning loop")

    def __init__(self, start: int, steps: int, log_every: int | None = None) -> None:
        self.start, self.steps, self.log_every = start, steps, log_every
        self.phase = self.PHASES[3]
        self.step = -1
        self.active = False
        self.records: list[dict[str, Any]] = []
        self.logging_steps: list[int] = []
        self._saved_showwarning: Any = None
        self._saved_filters: Any = None
        self._saved_log_every: int | None = None

    # the capture itself (separately testable without CUDA)
    def begin(self) -> None:
        self._saved_showwarning = warnings.showwarning
        self._saved_filters = list(warnings.filters)
        warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}.*")
        warnings.showwarning = self._show
        self.active = True

    def end(self) -> None:
        if not self.active:
            return
        warnings.showwarning = self._saved_showwarning
        warnings.filters[:] = self._saved_filters
        self.active = False

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if SYNC_MESSAGE not in text:
            self._saved_showwarning(message, category, filename, lineno, file, line)
            return
        self.records.append(
            {"step": self.step, "phase": self.phase, "site": caller(traceback.extract_stack())}
        )

    def callback(self):
        import lightning as L
        import torch

        counter = self

        def set_mode(module, mode: str) -> None:
            if module.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(mode)

        class _Counter(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                step = trainer.global_step
                if step == counter.start:
                    if counter.log_every:
                        counter._saved_log_every = trainer.log_every_n_steps
                        trainer.log_every_n_steps = counter.log_every
                    counter.begin()
                    set_mode(module, "warn")
                if step == counter.start + counter.steps:
                    self._stop(trainer, module)
                counter.step = step
                counter.phase = counter.PHASES[0]
                if counter.active and trainer._logger_connector.should_update_logs:
                    counter.logging_steps.append(step)

            def on_before_backward(self, trainer, module, loss) -> None:
                counter.phase = counter.PHASES[1]

            def on_after_backward(self, trainer, module) -> None:
                counter.phase = counter.PHASES[2]

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                counter.phase = counter.PHASES[3]

            def on_train_end(self, trainer, module) -> None:
                self._stop(trainer, module)

            def _stop(self, trainer, module) -> None:
                if counter.active:
                    set_mode(module, "default")
                    counter.end()
                    if counter._saved_log_every is not None:
                        trainer.log_every_n_steps = counter._saved_log_every

        return _Counter()

    def summary(self) -> dict[str, Any]:
        """Syncs per step (plain and logging steps apart), by phase, and the call sites."""
        steps = range(self.start, self.start + self.steps)
        logging = [s for s in steps if s in self.logging_steps]
        plain = [s for s in steps if s not in self.logging_steps]
        per_step = Counter(r["step"] for r in self.records)

        def mean(rows: list[int]) -> float | None:
            return sum(per_step[s] for s in rows) / len(rows) if rows else None

        by_phase: dict[str, dict[str, float]] = {}
        for kind, rows in (("plain", plain), ("logging", logging)):
            for r in self.records:
                if r["step"] in rows:
                    d = by_phase.setdefault(kind, {})
                    d[r["phase"]] = d.get(r["phase"], 0) + 1 / len(rows)
        sites = Counter(f"[{r['phase']}] {r['site']}" for r in self.records)
        return {
            "sync_steps": len(plain) + len(logging),
            "syncs_per_step": mean(plain),
            "syncs_per_logging_step": mean(logging),
            "syncs_by_phase": by_phase,
            "sync_sites": dict(sites.most_common(12)),
        }


def caller(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frames outside torch, warnings and this file: who asked for the sync."""
    here = str(Path(__file__).resolve())
    skip = ("/torch/", "/warnings.py", here, "<frozen")
    frames = [f for f in stack if not any(s in f.filename for s in skip)]
    shown = []
    for f in reversed(frames[-3:]):
        name = f.filename
        for marker in ("site-packages/", "/src/", "/bench/", "/tests/"):
            if marker in name:
                name = name.split(marker, 1)[1]
                break
        shown.append(f"{name}:{f.lineno} {f.name}")
    return " <- ".join(shown) or "?"


class SyncProfiler:
    """Cross-check with the profiler: synchronising CUDA runtime calls in steps
    ``[start, start + steps)`` (CUDA only)."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.calls: Counter[str] = Counter()
        self.error: str | None = None
        self._prof: Any = None

    def callback(self):
        import lightning as L

        prof = self

        class _Profile(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                if module.device.type != "cuda":
                    return
                step = trainer.global_step
                try:
                    if step == prof.start:
                        from torch.profiler import ProfilerActivity, profile

                        prof._prof = profile(
                            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]
                        )
                        prof._prof.__enter__()
                    elif step == prof.start + prof.steps:
                        self._stop()
                except Exception as e:  # noqa: BLE001 - a missing CUPTI must not stop the run
                    prof.error = f"{type(e).__name__}: {e}"
                    prof._prof = None

            def on_train_end(self, trainer, module) -> None:
                self._stop()

            def _stop(self) -> None:
                if prof._prof is None:
                    return
                p, prof._prof = prof._prof, None
                p.__exit__(None, None, None)
                for ev in p.events():
                    if ev.name in SYNC_CALLS_EXACT or any(s in ev.name for s in SYNC_CALLS):
                        prof.calls[ev.name] += 1
                prof.busy(p.key_averages())

        return _Profile()

    def busy(self, averages: Any) -> None:
        """How much of a step the GPU computes: device time of every op (kernels) per step,
        the CPU-side operator count per step (what a launch-bound step pays for), and the
        ops with the most device time."""
        rows = list(averages)
        if not rows or not self.steps:
            return
        attr = "self_device_time_total"
        if not hasattr(rows[0], attr):
            attr = "self_cuda_time_total"
        device_us = [(getattr(r, attr, 0.0) or 0.0, r) for r in rows]
        self.device_ms = sum(t for t, _ in device_us) / 1000 / self.steps
        self.aten_ops = sum(r.count for r in rows if r.key.startswith("aten::")) / self.steps
        top = sorted(device_us, key=lambda x: -x[0])[:8]
        self.top = [
            {"op": r.key[:60], "ms_per_step": round(t / 1000 / self.steps, 3), "calls": r.count}
            for t, r in top
        ]

    def summary(self) -> dict[str, Any]:
        if self.error:
            return {"profiler_error": self.error}
        total = sum(self.calls.values())
        out: dict[str, Any] = {
            "profiler_sync_calls_per_step": total / self.steps if self.steps else None,
            "profiler_sync_calls": dict(self.calls),
        }
        if getattr(self, "device_ms", None) is not None:
            out["gpu_busy_ms_per_step"] = round(self.device_ms, 2)
            out["aten_ops_per_step"] = round(self.aten_ops)
            out["top_device_ops"] = self.top
        return out


# --------------------------------------------------------------------------- trainer
def objective(method: str, options: dict[str, Any]) -> Any:
    """A configuration's objective: CLIPLoss, or SCLIPLoss with ``options`` (``assigner``
    named by its class in ``sclip_lightning.losses``)."""
    from sclip_lightning import losses

    if method == "clip":
        return losses.CLIPLoss()
    options = dict(options)
    if "assigner" in options:
        options["assigner"] = getattr(losses, options["assigner"])()
    return losses.SCLIPLoss(**options)


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One Trainer.fit of configuration ``name``: images/s, peak memory, syncs per step."""
    import lightning as L

    from sclip_lightning import SCLIPModule

    method, overrides, progress = CONFIGS[name]
    b = args.batch
    bp, bu = (2 * b, 0) if method == "clip" else (b, b)
    keywords = [f"keyword {i}" for i in range(45)]
    L.seed_everything(0, verbose=False)
    module = SCLIPModule(
        model_name=args.model, pretrained=None, criterion=objective(method, overrides),
        lr=1e-5, warmup_steps=0, keyword_vocabulary=keywords,
    )  # fmt: skip
    warm, timed = args.warmup, args.steps
    if progress:  # syncs only: warm-up then the counting window
        timed = 0
    timer = StepTimer(warm, timed)
    sync_start = warm + timed
    counter = SyncCounter(sync_start, args.sync_steps, log_every=args.sync_log_every)
    prof_start = sync_start + args.sync_steps
    profiler = SyncProfiler(prof_start, args.sync_steps)
    total = prof_start + args.sync_steps + 1
    callbacks = [counter.callback(), profiler.callback()]
    if timed:
        callbacks.insert(0, timer.callback())
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    dm = make_datamodule(module, bp, bu, total, keywords, args.pairs)
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {
        "kind": "trainer",
        "config": name,
        "label": LABELS[name],
        "model": args.model,
        "precision": args.precision,
        "paired": bp,
        "unpaired": bu,
        "steps_timed": timed,
        "wall_s": round(wall, 1),
    }
    if timed and timer.seconds:
        record["images_per_s"] = (bp + bu) * timed / timer.seconds
        record["step_ms"] = 1000 * timer.seconds / timed
        record["peak_gib"] = timer.peak_gib
    if args.device.startswith("cuda"):
        record.update(counter.summary())
        record.update(profiler.summary())
    else:
        record["syncs_per_step"] = None  # set_sync_debug_mode is CUDA's
    return record


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    """bench/gpu_step.py's hand-written loop, S-CLIP, the same model and batch."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_step

    loop_args = argparse.Namespace(
        model=args.model, b=args.batch, steps=args.steps, warmup=args.warmup,
        precision="bf16" if args.precision.startswith("bf16") else "fp32",
    )  # fmt: skip
    images_per_s, peak = gpu_step.run("sclip", loop_args, torch.device(args.device))
    return {
        "kind": "trainer",
        "config": "sclip_loop",
        "label": "S-CLIP, hand-written loop (bench/gpu_step.py)",
        "model": args.model,
        "paired": args.batch,
        "unpaired": args.batch,
        "steps_timed": args.steps,
        "images_per_s": images_per_s,
        "step_ms": 1000 * 2 * args.batch / images_per_s,
        "peak_gib": peak if peak == peak else None,
    }


def trainer_main(args: argparse.Namespace) -> int:
    import logging

    import torch

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    failed = 0
    for name in args.configs:
        try:
            emit(args.json, run_config(name, args))
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            failed += 1
            traceback.print_exc()
            emit(args.json, {"kind": "trainer", "config": name, "label": LABELS[name],
                             "error": f"{type(e).__name__}: {e}"})  # fmt: skip
        gc.collect()  # the Trainer and module of this configuration hold device memory
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.loop:
        try:
            emit(args.json, run_loop(args))
        except Exception as e:  # noqa: BLE001
            failed += 1
            traceback.print_exc()
            emit(args.json, {"kind": "trainer", "config": "sclip_loop", "error": str(e)})
    return 1 if failed else 0


# ---------------------------------------------------------------------------- loader
def find_images(given: str | None) -> tuple[Path | None, str]:
    """The RSICD-layout folder to read, and what it is."""
    candidates = [given] if given else []
    candidates += [
        str(REPO / "gpu_check_data" / "rsicd"),
        str(REPO.parent / "shared/data/rsicd-mini"),
    ]
    for c in candidates:
        if c and (Path(c) / "dataset_rsicd.json").is_file():
            return Path(c), c
    return None, "synthetic JPEGs (no RSICD-layout folder found)"


def loader_root(source: Path | None, needed: int, workdir: Path) -> tuple[Path, str]:
    """An RSICD-layout root with at least ``needed`` training records: the source's images
    (every split used as training, each listed as often as needed), or synthetic JPEGs."""
    workdir.mkdir(parents=True, exist_ok=True)
    if source is None:
        import numpy as np
        from PIL import Image

        from sclip_lightning.data.synthetic import CLASSES, render

        images = workdir / "RSICD_images"
        images.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        records = []
        for i in range(256):
            label = i % len(CLASSES)
            pixels, _ = render(label, rng, 256)
            name = f"synthetic_{i}.jpg"
            Image.fromarray(pixels).save(images / name, quality=90)
            caption = f"an aerial photograph of a {CLASSES[label]} ."
            records.append({"filename": name, "sentences": [{"raw": caption}] * 5})
        what = "256 synthetic 256x256 JPEGs (no real images found)"
    else:
        data = json.loads((source / "dataset_rsicd.json").read_text())
        records = [r for r in data["images"] if (source / "RSICD_images" / r["filename"]).is_file()]
        os.symlink((source / "RSICD_images").resolve(), workdir / "RSICD_images")
        what = f"{len(records)} JPEGs from {source}"
    repeat = max(1, -(-needed // len(records)))
    rows = [
        dict(r, split="train", imgid=k * len(records) + i)
        for k in range(repeat)
        for i, r in enumerate(records)
    ]
    (workdir / "dataset_rsicd.json").write_text(json.dumps({"images": rows}))
    if repeat > 1:
        what += f", each listed {repeat}x"
    return workdir, what


def loader_main(args: argparse.Namespace) -> int:
    import torch

    from sclip_lightning import SCLIPDataModule

    cores = len(os.sched_getaffinity(0))
    # the paired and the unpaired loader each get this many workers: together, every core
    workers = args.workers if args.workers is not None else max(1, cores // 2)
    source, _ = find_images(args.images)
    b = args.batch
    needed = 2 * b * (args.warmup + args.batches) + 2 * b
    with tempfile.TemporaryDirectory() as tmp:
        root, what = loader_root(source, needed, Path(tmp) / "rsicd")
        dm = SCLIPDataModule(
            dataset="rsicd", root=str(root), label_ratio=0.5, batch_size=b, unpaired_batch_size=b,
            num_workers=workers, model_name=args.model, keywords="mine", num_keywords=45,
            combined_mode="max_size_cycle", unpaired=True,
        )  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        t0 = None
        n = 0
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            batch = batch[0] if isinstance(batch, tuple) else batch
            if i == args.warmup:
                t0 = time.perf_counter()
            elif i > args.warmup:
                n += batch["paired"]["image"].shape[0] + batch["unpaired"]["image"].shape[0]
            if i >= args.warmup + args.batches:
                break
        seconds = time.perf_counter() - (t0 or start)
    record = {
        "kind": "loader",
        "images": what,
        "model_transform": args.model,
        "workers": workers,
        "cores": cores,
        "batch": f"{b} + {b}",
        "batches_timed": args.batches,
        "images_per_s": n / seconds if seconds > 0 else None,
        "torch_threads": torch.get_num_threads(),
    }
    emit(args.json, record)
    return 0


# ---------------------------------------------------------------------- prepare-images
def prepare_images(args: argparse.Namespace) -> int:
    """Copy the first ``n`` training images of ``source`` (RSICD layout) to ``to``."""
    source, to = Path(args.source), Path(args.to)
    data = json.loads((source / "dataset_rsicd.json").read_text())
    chosen = [r for r in data["images"] if r.get("split") == "train"][: args.n]
    (to / "RSICD_images").mkdir(parents=True, exist_ok=True)
    size = 0
    for r in chosen:
        dst = to / "RSICD_images" / r["filename"]
        shutil.copyfile(source / "RSICD_images" / r["filename"], dst)
        size += dst.stat().st_size
    (to / "dataset_rsicd.json").write_text(json.dumps({"images": chosen}))
    print(f"{len(chosen)} images ({size / 2**20:.1f} MiB) from {source} in {to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trainer", help="images/s and syncs per step through the Trainer")
    t.add_argument("--device", default="cuda")
    t.add_argument("--model", default="ViT-B-32")
    t.add_argument("--batch", type=int, default=64, help="B: paired (= unpaired) per step")
    t.add_argument("--precision", default="bf16-mixed")
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--sync-steps", type=int, default=6)
    t.add_argument("--sync-log-every", type=int, default=3, help="log_every_n_steps while counting")
    t.add_argument("--pairs", type=int, default=2000, help="paired images (bank slots)")
    t.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    t.add_argument("--loop", action="store_true", help="also the hand-written loop")
    t.add_argument("--json")
    ld = sub.add_parser("loader", help="the training loader alone on real JPEGs")
    ld.add_argument(
        "--images", help="RSICD-layout folder (default: gpu_check_data/rsicd, rsicd-mini)"
    )
    ld.add_argument("--model", default="ViT-B-32", help="its train transform")
    ld.add_argument("--batch", type=int, default=64)
    ld.add_argument(
        "--workers", type=int, help="per loader (paired, unpaired); default: half the cores each"
    )
    ld.add_argument("--warmup", type=int, default=5)
    ld.add_argument("--batches", type=int, default=40)
    ld.add_argument("--json")
    pi = sub.add_parser("prepare-images", help="copy the first N training images")
    pi.add_argument("--source", required=True)
    pi.add_argument("--n", type=int, default=500)
    pi.add_argument("--to", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "trainer":
        return trainer_main(args)
    if args.command == "loader":
        return loader_main(args)
    return prepare_images(args)


if __name__ == "__main__":
    sys.exit(main())
