"""``make gpu-check``: one command that checks the package on a GPU and measures it.

Parts, each in its own process with its own time limit (a failure or a hang in one part is
reported in its row and the others still run; the order puts the fixed-cost parts first):

- env: the device, torch, CUDA, the packages and the working tree the check runs;
- (a) ``pytest -m gpu tests/test_gpu.py``: the device against the CPU;
- (c) throughput through the Trainer (``bench/throughput.py trainer``): images/s, step time,
  peak memory and host-device syncs per step of CLIP, S-CLIP and S-CLIP + bank + unbalanced
  OT (ViT-B/32 from random weights, 64 + 64 images per step, bf16-mixed), the syncs of the
  default step as ``sclip fit`` runs it (progress bar on), and the hand-written loop;
- (c) the training loader alone on real JPEGs with all cores (``bench/throughput.py
  loader``), against the S-CLIP step: does loading limit it;
- (b) ``sclip fit`` then ``sclip test`` of ``configs/demo.yaml`` (the embedded demo domain)
  with ``--trainer.accelerator gpu --trainer.precision bf16-mixed``: metrics and wall time.

Prints one summary table (then the details: sync call sites, failures) and writes it to
``<out>/summary.md`` and ``summary.json``, with every part's log under ``<out>/logs``; all of
it is copied to ``$OUT`` when that names a folder. ``--device cpu`` runs the same parts at
CPU size (tiny models, few steps: a few minutes on 2 cores), the tests CPU against CPU.
The package is imported from this working tree (``src/`` first on ``PYTHONPATH``).

Usage: ``python bench/gpu_check.py [--device cuda|cpu] [--out outputs/gpu_check]
[--images DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: per device: sizes and the time limit (s) of every part; the whole check's budget
PLANS: dict[str, dict[str, Any]] = {
    "cuda": {
        # first H200 run: 5 configurations x (10 + 30 + 2 x 6 steps) overran the trainer's
        # 110 s, and a 600-step demo fit left no time for its test: fewer steps, same shapes
        "budget": 295,
        "precision": "bf16-mixed",
        "model": "ViT-B-32",
        "batch": 64,
        "warmup": 5,
        "steps": 20,
        "sync_steps": 4,
        "configs": ["clip", "sclip", "sclip_bank", "sclip_bank_uot"],
        "loader_batches": 40,
        "fit_steps": 200,
        "val_every": 100,
        "fit_workers": 4,
        "limits": {
            "env": 60,
            "tests": 110,
            "trainer": 140,
            "loader": 60,
            "data": 60,
            "fit": 120,
            "test": 50,
        },  # fmt: skip
    },
    "cpu": {
        "budget": 900,
        # bf16 is emulated on CPUs without bf16 units (5x slower here): the CPU plan trains in
        # float32; its bf16 coverage is the tests' bf16-mixed case
        "precision": "32-true",
        "model": "sclip-tiny",
        "batch": 16,
        "warmup": 3,
        "steps": 5,
        "sync_steps": 1,
        "configs": ["clip", "sclip", "sclip_bank", "sclip_bank_uot"],
        "loader_batches": 6,
        "fit_steps": 60,
        "val_every": 30,
        "fit_workers": 1,
        "limits": {
            "env": 60,
            "tests": 300,
            "trainer": 240,
            "loader": 120,
            "data": 120,
            "fit": 240,
            "test": 90,
        },  # fmt: skip
    },
}

ENV_CODE = r"""
import json, os, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cores": len(os.sched_getaffinity(0))}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                bf16=torch.cuda.is_bf16_supported())
for name in ("lightning", "open_clip", "ot", "spacy", "timm", "transformers", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = f"missing ({type(e).__name__})"
import sclip_lightning
info["sclip_lightning"] = sclip_lightning.__file__
print("ENV " + json.dumps(info))
"""


class Check:
    """Runs the parts, keeps their rows, writes the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = PLANS["cuda" if args.device.startswith("cuda") else "cpu"]
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.t0 = time.monotonic()
        self.budget = args.budget or self.plan["budget"]
        self.rows: list[dict[str, Any]] = []
        self.details: list[str] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.info: dict[str, Any] = {}
        self.throughput: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ plumbing
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def say(self, text: str) -> None:
        print(f"[gpu-check {time.monotonic() - self.t0:5.0f}s] {text}", flush=True)

    def row(self, part: str, check: str, result: str, seconds: float | None, status: str) -> None:
        self.rows.append(
            {"part": part, "check": check, "result": result, "seconds": seconds, "status": status}
        )
        self.say(f"({part}) {check}: {result} [{status}]")

    def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one part's process under its time limit (capped by the budget left); its
        output goes to ``logs/<name>.log``. Returns rc, seconds, output tail, timed_out."""
        limit = min(self.plan["limits"][name], max(5.0, self.left()))
        log = self.logs / f"{name}.log"
        self.say(f"{name}: {' '.join(cmd)} (limit {limit:.0f} s)")
        t = time.monotonic()
        with log.open("w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                rc = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the part's whole process group (loader workers too)
                rc = proc.wait()
                timed_out = True
        seconds = time.monotonic() - t
        text = log.read_text(errors="replace")
        tail = "\n".join(text.splitlines()[-15:])
        if rc != 0 or timed_out:
            why = f"timed out after {limit:.0f} s" if timed_out else f"exit code {rc}"
            self.details.append(
                f"### {name}: {why} (last lines of logs/{name}.log)\n\n```\n{tail}\n```"
            )
        return {"rc": rc, "seconds": seconds, "text": text, "timed_out": timed_out}

    def skipped(self, part: str, check: str) -> bool:
        if self.left() > 10:
            return False
        self.row(part, check, "not run: the check's time budget is spent", None, "skipped")
        return True

    # --------------------------------------------------------------------- parts
    def part_env(self) -> None:
        r = self.run("env", [sys.executable, "-c", ENV_CODE])
        m = re.search(r"^ENV (.*)$", r["text"], re.M)
        if not m:
            self.row(
                "env",
                "device and packages",
                "could not import torch / sclip_lightning",
                r["seconds"],
                "FAIL",
            )
            return
        self.info = json.loads(m.group(1))
        i = self.info
        dev = (
            f"{i['device']} ({i['memory_gib']} GiB, sm {i['capability']}), CUDA {i['cuda']}"
            if i.get("cuda_available")
            else "no CUDA device"
        )
        tree = "working tree" if str(REPO / "src") in i["sclip_lightning"] else i["sclip_lightning"]
        result = (
            f"{dev}; {i['cores']} cores; Python {i['python']}, torch {i['torch']}, lightning "
            f"{i['lightning']}, open_clip {i['open_clip']}, POT {i['ot']}, spaCy {i['spacy']}; "
            f"sclip_lightning from the {tree}"
        )
        wanted_cuda = self.args.device.startswith("cuda")
        ok = i.get("cuda_available") or not wanted_cuda
        self.row("env", "device and packages", result, r["seconds"], "ok" if ok else "FAIL")

    def part_tests(self) -> None:
        check = "pytest -m gpu tests/test_gpu.py"
        if self.skipped("a", check):
            return
        xml = self.out / "pytest.xml"
        env = dict(self.env)
        if not self.args.device.startswith("cuda"):
            env["SCLIP_GPU_TEST_DEVICE"] = "cpu"
            check += " (SCLIP_GPU_TEST_DEVICE=cpu: CPU against CPU)"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        cmd += ["-W", "ignore::DeprecationWarning", f"--junitxml={xml}", "tests/test_gpu.py"]
        r = self.run("tests", cmd, env)
        counts, failed = _junit(xml) if xml.is_file() else ({}, [])
        if counts:
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            result = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
            if failed:
                result += f" (failed: {', '.join(failed[:6])}{' ...' if len(failed) > 6 else ''})"
        else:
            result = "no result (see logs/tests.log)"
        if r["timed_out"]:
            result += "; timed out"
        ok = r["rc"] == 0 and counts and counts["skipped"] == 0
        status = "ok" if ok else ("skipped" if counts and r["rc"] == 0 else "FAIL")
        self.row("a", check, result, r["seconds"], status)

    def part_trainer(self) -> None:
        p = self.plan
        what = f"{p['model']} from random weights, {p['batch']} + {p['batch']} per step, {p['precision']}"
        if self.skipped("c", f"Trainer throughput ({what})"):
            return
        jsonl = self.out / "throughput.jsonl"
        jsonl.unlink(missing_ok=True)
        cmd = [sys.executable, str(REPO / "bench" / "throughput.py"), "trainer"]
        cmd += ["--device", self.args.device, "--model", p["model"], "--batch", str(p["batch"])]
        cmd += ["--warmup", str(p["warmup"]), "--steps", str(p["steps"])]
        cmd += ["--precision", p["precision"]]
        cmd += ["--sync-steps", str(p["sync_steps"]), "--configs", *p["configs"], "--loop"]
        cmd += ["--json", str(jsonl)]
        r = self.run("trainer", cmd)
        records = _jsonl(jsonl)
        self.throughput = records
        for rec in records:
            self._trainer_row(rec, what)
        done = {rec.get("config") for rec in records}
        for name in [*p["configs"], "sclip_loop"]:
            if name not in done:
                status = "timed out" if r["timed_out"] else f"exit code {r['rc']}"
                self.row("c", name, f"no result ({status}; logs/trainer.log)", None, "FAIL")

    def _trainer_row(self, rec: dict[str, Any], what: str) -> None:
        label = (
            f"{rec.get('label', rec.get('config'))} ({what})"
            if rec.get("config") == "clip"
            else rec.get("label", rec.get("config"))
        )
        if "error" in rec:
            self.row("c", label, rec["error"][:200], None, "FAIL")
            return
        parts = []
        if rec.get("images_per_s"):
            parts.append(f"{rec['images_per_s']:,.0f} images/s, {rec['step_ms']:.1f} ms/step")
        if rec.get("peak_gib"):
            parts.append(f"peak {rec['peak_gib']:.1f} GiB")
        status = "ok"
        if "syncs_per_step" in rec and rec.get("config") != "sclip_loop":
            if rec["syncs_per_step"] is None and not self.args.device.startswith("cuda"):
                parts.append("syncs/step n/a on CPU")
            else:
                plain, logging_ = rec.get("syncs_per_step"), rec.get("syncs_per_logging_step")
                text = f"syncs/step {_num(plain)}"
                if logging_ is not None:
                    text += f" (logging steps {_num(logging_)})"
                if rec.get("profiler_sync_calls_per_step") is not None:
                    text += (
                        f"; profiler: {_num(rec['profiler_sync_calls_per_step'])} sync calls/step"
                    )
                if rec.get("gpu_busy_ms_per_step") is not None:
                    text += (
                        f"; GPU busy {rec['gpu_busy_ms_per_step']:.1f} ms/step, "
                        f"{rec['aten_ops_per_step']} aten ops/step"
                    )
                parts.append(text)
                if rec.get("config") == "sclip" and plain:
                    status = "WARN"  # the default step should not sync
                self._sync_details(rec)
        self.row("c", label, "; ".join(parts), rec.get("wall_s"), status)

    def _sync_details(self, rec: dict[str, Any]) -> None:
        if not rec.get("sync_sites") and not rec.get("profiler_sync_calls"):
            return
        lines = [f"### syncs: {rec.get('label')}", ""]
        for kind, phases in (rec.get("syncs_by_phase") or {}).items():
            per = ", ".join(f"{ph} {v:.2g}" for ph, v in phases.items())
            lines.append(f"- per {kind} step, by phase: {per}")
        for site, n in (rec.get("sync_sites") or {}).items():
            lines.append(f"- {n} x {site}")
        if rec.get("profiler_sync_calls"):
            lines.append(
                f"- profiler (CUDA runtime calls in {rec.get('sync_steps')} steps): {rec['profiler_sync_calls']}"
            )
        if rec.get("profiler_error"):
            lines.append(f"- profiler unavailable: {rec['profiler_error']}")
        for top in rec.get("top_device_ops") or []:
            lines.append(
                f"- device time {top['ms_per_step']} ms/step: {top['op']} ({top['calls']} calls)"
            )
        self.details.append("\n".join(lines))

    def part_loader(self) -> None:
        check = "training loader alone (JPEG decode + train transform + tokens), all cores"
        if self.skipped("c", check):
            return
        p = self.plan
        jsonl = self.out / "loader.jsonl"
        jsonl.unlink(missing_ok=True)
        cmd = [sys.executable, str(REPO / "bench" / "throughput.py"), "loader"]
        cmd += ["--model", "ViT-B-32", "--batch", str(p["batch"]), "--json", str(jsonl)]
        cmd += [
            "--batches",
            str(p["loader_batches"]),
            "--warmup",
            "2" if p is PLANS["cpu"] else "5",
        ]
        if self.args.images:
            cmd += ["--images", self.args.images]
        r = self.run("loader", cmd)
        recs = _jsonl(jsonl)
        if not recs:
            why = "timed out" if r["timed_out"] else f"exit code {r['rc']}"
            self.row("c", check, f"no result ({why}; logs/loader.log)", r["seconds"], "FAIL")
            return
        rec = recs[-1]
        result = (
            f"{rec['images_per_s']:,.0f} images/s with {rec['workers']} + {rec['workers']} "
            f"workers ({rec['cores']} cores); {rec['images']}"
        )
        step = next(
            (t for t in self.throughput if t.get("config") == "sclip" and t.get("images_per_s")),
            None,
        )
        if step and step.get("model") == rec["model_transform"]:
            ratio = rec["images_per_s"] / step["images_per_s"]
            verdict = "does not limit" if ratio >= 1 else "LIMITS"
            result += f"; {ratio:.2f}x the S-CLIP step's {step['images_per_s']:,.0f}: loading {verdict} the step"
        else:
            result += "; not compared (the step ran another model size)"
        check = f"training loader alone, {rec['batch']} per step at 224 px"
        self.row("c", check, result, r["seconds"], "ok")

    def part_fit_test(self) -> None:
        p = self.plan
        accel = "gpu" if self.args.device.startswith("cuda") else "cpu"
        check = f"sclip fit configs/demo.yaml, {p['fit_steps']} steps, --trainer.accelerator {accel} --trainer.precision {p['precision']}"
        if self.skipped("b", check):
            return
        root = REPO / "outputs" / "gpu_check_runs" / "demo"  # checkpoints: not in the summary
        shutil.rmtree(root, ignore_errors=True)
        # the demo domain is generated on first use: timed apart from training
        t = time.monotonic()
        gen = self.run(
            "data",
            [
                sys.executable,
                "-c",
                "from sclip_lightning.data.synthetic import ensure_synthetic as e; print(e())",
            ],
        )
        if gen["rc"]:
            self.row(
                "b",
                "demo data (generated on first use)",
                "failed (logs/data.log)",
                gen["seconds"],
                "FAIL",
            )
            return
        gen_s = time.monotonic() - t
        base = [sys.executable, "-m", "sclip_lightning"]
        common = ["--config", "configs/demo.yaml", "--trainer.accelerator", accel]
        common += ["--trainer.precision", p["precision"], "--trainer.default_root_dir", str(root)]
        common += ["--trainer.enable_progress_bar", "false"]
        fit = [*base, "fit", *common, "--trainer.max_steps", str(p["fit_steps"])]
        fit += ["--trainer.val_check_interval", str(p["val_every"])]
        fit += ["--data.init_args.num_workers", str(p["fit_workers"])]
        r = self.run("fit", fit)
        ckpts = sorted(root.glob("**/checkpoints/last.ckpt"))
        if r["rc"] or not ckpts:
            why = "timed out" if r["timed_out"] else f"exit code {r['rc']}"
            self.row("b", check, f"{why}, no last.ckpt (logs/fit.log)", r["seconds"], "FAIL")
            return
        steps_s = p["fit_steps"] / r["seconds"]
        result = f"{r['seconds']:.0f} s wall ({steps_s:.1f} steps/s incl. start-up and {p['fit_steps'] // p['val_every']} validations)"
        result += f"; demo data generated in {gen_s:.0f} s before it"
        self.row("b", check, result, r["seconds"], "ok")
        check = "sclip test --ckpt_path last.ckpt (zero-shot + retrieval on the test split)"
        if self.skipped("b", check):
            return
        results_dir = self.out / "demo_results"
        shutil.rmtree(results_dir, ignore_errors=True)
        test = [*base, "test", *common, "--ckpt_path", str(ckpts[-1])]
        test += ["--model.init_args.results_dir", str(results_dir)]
        r = self.run("test", test)
        res = results_dir / "results.json"
        if r["rc"] or not res.is_file():
            why = "timed out" if r["timed_out"] else f"exit code {r['rc']}"
            self.row("b", check, f"{why} (logs/test.log)", r["seconds"], "FAIL")
            return
        rows = json.loads(res.read_text())
        got = {}
        for row in rows:
            for k in ("top1", "i2t_R@1", "t2i_R@1", "mean_R"):
                if isinstance(row.get(k), float):
                    got[k] = row[k]
        result = (
            ", ".join(f"{k} {v:.1f}" for k, v in got.items()) + f" ({res.relative_to(self.out)})"
        )
        self.row("b", check, result, r["seconds"], "ok")

    # -------------------------------------------------------------------- output
    def write(self) -> str:
        order = {"env": 0, "a": 1, "b": 2, "c": 3}
        rows = sorted(self.rows, key=lambda r: order.get(r["part"], 9))
        total = time.monotonic() - self.t0
        head = (
            f"# make gpu-check (--device {self.args.device}): {total:.0f} s\n\n"
            "| part | check | result | s | status |\n|---|---|---|---|---|\n"
        )
        body = "".join(
            f"| {r['part']} | {r['check']} | {r['result']} | {_secs(r['seconds'])} | {r['status']} |\n"
            for r in rows
        )
        text = head + body
        if self.details:
            text += "\n" + "\n\n".join(self.details) + "\n"
        (self.out / "summary.md").write_text(text)
        summary = {
            "device": self.args.device,
            "seconds": round(total, 1),
            "env": self.info,
            "rows": rows,
            "throughput": self.throughput,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        dest = os.environ.get("OUT")
        inside = dest and Path(dest).is_dir() and self.out.is_relative_to(Path(dest).resolve())
        if dest and Path(dest).is_dir() and not inside:  # $OUT: a folder whose files come back
            for item in self.out.iterdir():
                target = Path(dest) / item.name
                if item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(item, target)
        return text


def _junit(path: Path) -> tuple[dict[str, int], list[str]]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}, []
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        case.get("name", "?")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts, failed


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _secs(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the same check at CPU size")
    p.add_argument("--out", default="outputs/gpu_check")
    p.add_argument(
        "--images",
        help="RSICD-layout JPEG folder for the loader (default: "
        "gpu_check_data/rsicd, then ../shared/data/rsicd-mini, else synthetic JPEGs)",
    )
    p.add_argument("--budget", type=float, help="seconds for the whole check (default per device)")
    args = p.parse_args(argv)
    check = Check(args)
    check.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(check.logs, ignore_errors=True)
    check.logs.mkdir()
    for stale in ("summary.md", "summary.json", "pytest.xml", "throughput.jsonl", "loader.jsonl"):
        (check.out / stale).unlink(missing_ok=True)
    check.say(f"device {args.device}, budget {check.budget:.0f} s, output {check.out}")
    for part in (
        check.part_env,
        check.part_tests,
        check.part_trainer,
        check.part_loader,
        check.part_fit_test,
    ):
        try:
            part()
        except Exception as e:  # noqa: BLE001 - one part's bug must not lose the others
            check.row("?", part.__name__, f"check bug: {type(e).__name__}: {e}", None, "FAIL")
        check.write()  # after every part: a killed check still leaves its rows
    text = check.write()
    print("\n" + text, flush=True)
    print(f"written: {check.out / 'summary.md'}, summary.json, logs/", flush=True)
    return 0 if all(r["status"] in ("ok", "WARN", "skipped") for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
