"""Real-data benchmark on rsicd-mini through the product: every run is `sclip fit` + `sclip test`
on a config of configs/real/ (built in-process with `sclip_lightning.cli.build_cli`, the same
parser, module, data module and Trainer as the command line); this script only orchestrates
the grid, the seeds, the tables and the plot. It holds no training or evaluation code.

Protocol (docs/results.md):
- config: configs/real/rsicd_mini_lit.yaml (offline towers locked, tower outputs cached,
  1000 steps) or configs/real/rsicd_mini_finetune.yaml (--protocol finetune: the image
  tower's top block unlocked, cached at the block boundary);
- methods: CLIP at 10% pairs, S-CLIP at 32+32 and 128+128, S-CLIP at 32+32 with the support
  bank (FIFO of 96 pairs: a support of 128; all pairs), CLIP at 100% (ceiling);
- selection: for every method the same learning-rate grid, trained with seed 0 and scored
  on the val split by (mean zero-shot top-1 + mean retrieval recall) / 2, over the zero-shot
  sets that have a val split of their own only: a class folder (aid=..., rsscn7=...) serves
  the same images at every split, so it is evaluated at test only (the output header says
  which sets scored the selection);
- report: the chosen setting trained with 3 seeds (seed = split, initialisation and order),
  evaluated on the test split: every zero-shot set given (--zeroshot) and retrieval.
Nothing is tuned on a test split.

Usage: python bench/real_benchmark.py [--protocol lit|finetune] [--steps 1000]
       [--lrs 1e-3 1e-4] [--seeds 0 1 2] [--zeroshot rsicd aid=/data/AID] [--out docs]
       [--diagnostics --diagnostics-lr 1e-4]  (one change at a time, see DIAGNOSTICS)
       [--replot]  (redraw the chart from the saved .json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
LIT = REPO / "configs" / "real" / "rsicd_mini_lit.yaml"
CONFIGS = {"lit": [LIT], "finetune": [LIT, REPO / "configs" / "real" / "rsicd_mini_finetune.yaml"]}

#: method -> overrides of the config (CLI syntax, without the leading "--"); the configs'
#: objective is SCLIPLoss, so single options are set under criterion.init_args
OBJ = "model.init_args.criterion"
CLIP = {OBJ: "sclip_lightning.losses.CLIPLoss"}
BANK = {f"{OBJ}.init_args.support_bank_size": -1}
UOT = {
    f"{OBJ}.init_args.assigner": json.dumps(
        {"class_path": "sclip_lightning.losses.UnbalancedOTAssigner", "init_args": {"reg_m": 0.05}}
    )
}
METHODS: dict[str, dict[str, Any]] = {
    "CLIP 10%": CLIP,
    "S-CLIP 10%, 32+32": {},
    "S-CLIP 10%, 128+128": {
        "data.init_args.batch_size": 128,
        "data.init_args.unpaired_batch_size": 128,
    },
    "S-CLIP 10%, 32+32, bank FIFO 96": {f"{OBJ}.init_args.support_bank_size": 96},
    "S-CLIP 10%, 32+32, bank all pairs": BANK,
    "S-CLIP 10%, 32+32, bank all pairs, unbalanced OT": {**BANK, **UOT},
    "CLIP 100% (ceiling)": {**CLIP, "data.init_args.label_ratio": 1.0},
    "CLIP 30%": {**CLIP, "data.init_args.label_ratio": 0.3},
    # two fits (run_semiclip): stage 1 for STAGE1_SHARE of the steps, stage 2 from its weights
    "SemiCLIP 10%, 32+32": {OBJ: "sclip_lightning.losses.SemiCLIPLoss"},
}
SEMICLIP = "sclip_lightning.losses.SemiCLIPLoss"
#: the release's 25 + 15 epochs: stage 1 takes 25/40 of a run's steps
STAGE1_SHARE = 25 / 40
#: --table semiclip: the methods side by side (S-CLIP as in the paper: its global batch of
#: 128 + 128; S-CLIP as the README recommends on one GPU: bank of all pairs + unbalanced OT)
SIDE_BY_SIDE = [
    "CLIP 10%",
    "CLIP 30%",
    "S-CLIP 10%, 128+128",
    "S-CLIP 10%, 32+32, bank all pairs, unbalanced OT",
    "SemiCLIP 10%, 32+32",
]
FINETUNE_METHODS = ["CLIP 10%", "S-CLIP 10%, 32+32", "S-CLIP 10%, 32+32, bank all pairs"]
#: --diagnostics: one change at a time around S-CLIP 32+32 with the bank of all pairs, at one
#: fixed learning rate (--diagnostics-lr), 3 seeds on test: why the bank helps or does not
DIAGNOSTICS: dict[str, dict[str, Any]] = {
    "bank all pairs (reference)": BANK,
    "bank all pairs, 128 unpaired per step": {**BANK, "data.init_args.unpaired_batch_size": 128},
    "bank all pairs, unbalanced OT (reg_m 0.05)": {**BANK, **UOT},
    "bank all pairs, pseudo-label warm-up 200 steps": {
        **BANK,
        "model.init_args.pseudo_label_warmup_steps": 200,
    },
    "bank all pairs, caption weight 0.25": {**BANK, f"{OBJ}.init_args.caption_weight": 0.25},
    "bank FIFO 224 (support 256)": {f"{OBJ}.init_args.support_bank_size": 224},
    "bank FIFO 480 (support 512)": {f"{OBJ}.init_args.support_bank_size": 480},
    "no bank, 128 unpaired per step": {"data.init_args.unpaired_batch_size": 128},
    "CLIP 10% at batch 128": {**CLIP, "data.init_args.batch_size": 128},
}
#: --protocol finetune --diagnostics: S-CLIP 32+32 with a top block of the image tower training;
#: the objective options an early prototype of this regime differed in (the plan detached, the
#: release's linear keyword weights), one at a time; the reference row is the main table's
FINETUNE_DIAGNOSTICS: dict[str, dict[str, Any]] = {
    "S-CLIP 32+32, plan detached (detach_plan: true)": {
        f"{OBJ}.init_args.assigner": json.dumps(
            {"class_path": "sclip_lightning.losses.OTAssigner", "init_args": {"detach_plan": True}}
        )
    },
    "S-CLIP 32+32, the release's objective (keyword_weighting: linear)": {
        f"{OBJ}.init_args.keyword_weighting": "linear"
    },
    # SemiCLIP's strong views run through the training top block in their own forward: in
    # train mode they move its BatchNorm running statistics, which evaluation then uses
    "SemiCLIP 32+32, strong view leaves BatchNorm statistics (strong_view_norm_stats: keep)": {
        OBJ: SEMICLIP,
        "model.init_args.strong_view_norm_stats": "keep",
    },
    # what the pairs alone give SemiCLIP: its stage 1 for the whole run, no unpaired image
    "SemiCLIP stage 1 alone, all steps (contrastive + concept loss on the pairs)": {
        OBJ: json.dumps({"class_path": SEMICLIP, "init_args": {"stage": 1}}),
    },
}
#: hidden RSICD class labels, for the logged pseudo-label accuracy only (not seen by the losses)
LABELS = {
    "data.init_args.dataset_kwargs": '{"class_labels": true}',
    "data.init_args.hidden_labels": True,
}
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R"]


def run(
    configs: list[Path],
    overrides: dict[str, Any],
    seed: int,
    lr: float,
    steps: int,
    split: str,
    zeroshot: list[str] | None,
) -> tuple[list[dict[str, Any]], float]:
    """One `sclip fit` + `sclip test` (on ``split``); returns the result rows and seconds."""
    import tempfile

    from sclip_lightning.cli import build_cli

    run_dir = tempfile.mkdtemp(prefix="sclip-bench-")
    args = {
        "model.init_args.results_dir": run_dir,
        "trainer.default_root_dir": run_dir,
        "seed_everything": seed,
        "data.init_args.split_seed": seed,
        "data.init_args.test_split": split,
        "model.init_args.lr": lr,
        "trainer.max_steps": steps,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.callbacks": "[]",  # the configs' checkpoint callbacks: nothing to resume here
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        **LABELS,
        **overrides,
    }
    if zeroshot is not None:
        args["data.init_args.zeroshot"] = json.dumps(zeroshot)

    def cli_of(extra: dict[str, Any]) -> Any:
        argv = [arg for c in configs for arg in ("--config", str(c))]
        for key, value in {**args, **extra}.items():
            argv += [f"--{key}", str(value)]
        return build_cli(argv, run=False)

    t0 = time.time()
    if args.get(OBJ) == SEMICLIP:
        return run_semiclip(cli_of, Path(run_dir), steps), time.time() - t0
    cli = cli_of({})
    cli.trainer.fit(cli.model, cli.datamodule)
    acc = cli.trainer.callback_metrics.get("train/pseudo_label_acc_epoch")
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    rows = list(cli.model.test_results)
    if acc is not None:  # the plan's accuracy over the last training epoch (hidden labels)
        rows.append({"task": "pseudo-labels", "dataset": "train", "acc": 100 * float(acc)})
    return rows, time.time() - t0


def run_semiclip(cli_of: Any, run_dir: Path, steps: int) -> list[dict[str, Any]]:
    """SemiCLIP as users run it: `sclip fit` stage 1 with the ConceptLogitsWriter, `sclip
    fit` stage 2 from its checkpoint (init_from), `sclip test`; then the diagnostics from
    the unpaired images' hidden captions (:func:`semiclip_diagnostics`)."""
    logits = run_dir / "stage1_concept_logits.pt"
    first = round(steps * STAGE1_SHARE)
    writer = {"class_path": "sclip_lightning.callbacks.ConceptLogitsWriter"}
    stage1 = cli_of(
        {
            OBJ: json.dumps({"class_path": SEMICLIP, "init_args": {"stage": 1}}),
            "trainer.max_steps": first,
            "trainer.callbacks": json.dumps([{**writer, "init_args": {"path": str(logits)}}]),
        }
    )
    stage1.trainer.fit(stage1.model, stage1.datamodule)
    stage1.trainer.save_checkpoint(run_dir / "stage1.ckpt")
    stage2 = cli_of(
        {
            OBJ: json.dumps(
                {"class_path": SEMICLIP, "init_args": {"stage": 2, "stage1_logits": str(logits)}}
            ),
            "model.init_args.init_from": str(run_dir / "stage1.ckpt"),
            "trainer.max_steps": steps - first,
        }
    )
    stage2.trainer.fit(stage2.model, stage2.datamodule)
    stage2.trainer.test(stage2.model, stage2.datamodule, verbose=False)
    rows = list(stage2.model.test_results)
    rows.append(semiclip_diagnostics(stage2.model, stage2.datamodule, logits))
    return rows


@torch.no_grad()
def semiclip_diagnostics(module: Any, dm: Any, logits_file: Path) -> dict[str, Any]:
    """What SemiCLIP's pseudo-labels get right, from the unpaired images' hidden captions
    (never seen in training): the concepts of an image are those of the vocabulary in its
    captions (:class:`~sclip_lightning.concepts.ConceptMiner` with the vocabulary file).

    - concept top-3 acc / prec: stage-1 logits (what stage 2 trains towards): share of images
      with at least one of their top-3 concepts in their captions / share of top-3 concepts
      that are.
    - surrogate prec, all / selected: share of the top-``surrogate_words`` concepts of a
      surrogate caption found in the image's captions, over all unpaired images and over the
      ``selection_ratio`` of each unpaired batch (in loader order) the final model selects.
    """
    import tempfile

    from sclip_lightning.callbacks import unpaired_features
    from sclip_lightning.concepts import ConceptMiner

    crit, info = module.criterion, dm.train_info()
    names = list(crit.concept_names)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(names))
    captions = [dm.unpaired_base.captions[i] for i in info.unpaired_index]
    mined = ConceptMiner(vocabulary=f.name).mine(captions)
    hidden = mined.labels[:, [mined.names.index(n) for n in names]]  # (N_u, K), our order
    stage1 = torch.load(logits_file, weights_only=True)["logits"]
    hits = hidden.gather(1, stage1.topk(3, dim=1).indices)
    unpaired = unpaired_features(module, dm)
    top = stage1.topk(crit.surrogate_words, dim=1).indices.to(module.device)
    surrogate = torch.cat(
        [crit.surrogates(top[i : i + 256], crit.context) for i in range(0, len(top), 256)]
    ).float()
    fit = (surrogate * unpaired).sum(dim=1).cpu()
    prec = hidden.gather(1, top.cpu()).mean(dim=1)
    bu = dm.hparams.unpaired_batch_size
    n = len(fit) // bu * bu
    k = int(bu * crit.selection_ratio)
    chosen = fit[:n].view(-1, bu).topk(k, dim=1).indices
    selected = prec[:n].view(-1, bu).gather(1, chosen)
    return {
        "task": "semiclip",
        "dataset": "unpaired (hidden captions)",
        "concept top-3 acc": 100 * float((hits.sum(dim=1) > 0).float().mean()),
        "concept top-3 prec": 100 * float(hits.mean()),
        "surrogate prec, all": 100 * float(prec.mean()),
        "surrogate prec, selected": 100 * float(selected.mean()),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flat metrics of one run: top-1 of every zero-shot set (and their mean), retrieval."""
    out: dict[str, float] = {}
    tops = []
    for r in rows:
        if r["task"] == "zero-shot":
            out[f"zero-shot {r['dataset'].rsplit('/', 1)[0]}"] = r["top1"]
            tops.append(r["top1"])
        elif r["task"] == "pseudo-labels":
            out["pseudo-label acc (train)"] = r["acc"]
        elif r["task"] == "semiclip":
            out.update({k: v for k, v in r.items() if k not in ("task", "dataset")})
        else:
            out.update({m: r[m] for m in METRICS})
    out["zero-shot mean"] = statistics.mean(tops) if tops else float("nan")
    return out


def score(m: dict[str, float]) -> float:
    """Selection score: (mean zero-shot top-1 + mean recall) / 2; recall alone when no
    zero-shot set can score the selection."""
    if m["zero-shot mean"] != m["zero-shot mean"]:  # nan: no zero-shot set at val
        return m["mean_R"]
    return (m["zero-shot mean"] + m["mean_R"]) / 2


def selection_sets(zeroshot: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """The zero-shot sets model selection may score (their own val split differs from their
    test split) and those left to the test runs (class folders: val images = test images).
    None keeps the data module's default (the training set's own classes, split-aware)."""
    from sclip_lightning.data import registry

    if zeroshot is None:
        return None, []
    keep = [z for z in zeroshot if registry.get_source(z.partition("=")[0]).class_splits]
    return keep, [z for z in zeroshot if z not in keep]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", choices=sorted(CONFIGS), default="lit")
    p.add_argument(
        "--config", type=Path, nargs="+", default=None, help="default: the protocol's configs"
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="names of METHODS to run")
    p.add_argument(
        "--table",
        choices=["semiclip"],
        default=None,
        help="semiclip: the methods of SIDE_BY_SIDE (stem results_<protocol>_semiclip)",
    )
    p.add_argument("--zeroshot", nargs="+", default=None, help="zero-shot sets (name[=root])")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--tag", default=None, help="file stem (default: results_<protocol>)")
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="run DIAGNOSTICS (FINETUNE_DIAGNOSTICS with --protocol finetune) at --diagnostics-lr",
    )
    p.add_argument("--diagnostics-lr", type=float, default=1e-4)
    p.add_argument("--variants", nargs="+", default=None, help="names of the diagnostics to run")
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw <out>/<stem>.png from <out>/<stem>.json (no training)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    config = args.config or CONFIGS[args.protocol]
    default = list(METHODS)[:7] if args.protocol == "lit" else FINETUNE_METHODS
    names = args.methods or (SIDE_BY_SIDE if args.table == "semiclip" else default)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {list(METHODS)}")
    stem = args.tag or f"results_{args.protocol}" + ("_semiclip" if args.table else "")
    if args.replot:
        saved = json.loads((args.out / f"{stem}.json").read_text())
        plot(saved["results"], args.out / f"{stem}.png", args.protocol, len(saved["seeds"]))
        print(f"written {args.out / stem}.png")
        return
    if args.diagnostics:
        diagnostics(args, config, stem)
        return
    t0 = time.time()
    grid, chosen, results, per_seed, seconds = [], {}, {}, {}, []

    def stamp() -> str:
        return f"[{time.time() - t0:.0f}s]"

    val_sets, test_only = selection_sets(args.zeroshot)
    if test_only:
        print(f"zero-shot sets without a val split, evaluated at test only: {test_only}")
    for name in names:
        best = None
        for lr in args.lrs:
            rows, sec = run(config, METHODS[name], 0, lr, args.steps, "val", val_sets)
            seconds.append(sec)
            m = summary(rows)
            grid.append({"method": name, "lr": f"{lr:g}", **m, "val score": score(m)})
            if best is None or score(m) > best[0]:
                best = (score(m), lr)
            print(
                f"  val {name} lr={lr:g}: score {score(m):.2f} ({sec:.0f}s) {stamp()}", flush=True
            )
        assert best is not None
        chosen[name] = best[1]
        runs = []
        for seed in args.seeds:
            rows, sec = run(config, METHODS[name], seed, best[1], args.steps, "test", args.zeroshot)
            seconds.append(sec)
            runs.append(summary(rows))
            print(f"  test {name} seed {seed}: {runs[-1]} ({sec:.0f}s) {stamp()}", flush=True)
        per_seed[name] = runs
        results[name] = {
            k: (
                statistics.mean(r[k] for r in runs),
                statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0,
            )
            for k in runs[0]
        }
    total = time.time() - t0
    write_outputs(args, stem, config, names, grid, chosen, results, per_seed, seconds, total)


def diagnostics(args, config, stem) -> None:
    """DIAGNOSTICS at one learning rate, seeds on test; a table of means ± std."""
    from sclip_lightning.results import markdown_table

    t0 = time.time()
    rows = []
    table = DIAGNOSTICS if args.protocol == "lit" else FINETUNE_DIAGNOSTICS
    unknown = sorted(set(args.variants or []) - set(table))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(table)}")
    for name, over in table.items():
        if args.variants is not None and name not in args.variants:
            continue
        runs = []
        for seed in args.seeds:
            res, sec = run(
                config, over, seed, args.diagnostics_lr, args.steps, "test", args.zeroshot
            )
            runs.append(summary(res))
            print(
                f"  {name} seed {seed}: {runs[-1]} ({sec:.0f}s) [{time.time() - t0:.0f}s]",
                flush=True,
            )
        keys = list(runs[0])
        rows.append(
            {
                "variant": name,
                **{
                    k: f"{statistics.mean(r[k] for r in runs):.1f} ± "
                    f"{statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0:.1f}"
                    for k in keys
                },
            }
        )
    text = (
        f"# {stem} diagnostics\n\nlr {args.diagnostics_lr:g}, {args.steps} steps, seeds "
        f"{args.seeds}, test split; {(time.time() - t0) / 60:.1f} min\n\n"
        + markdown_table(rows)
        + "\n"
    )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}_diagnostics.md").write_text(text)


def config_label(config: Path) -> str:
    """A config's path as written in the outputs: relative to the repository when inside it."""
    path = config.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_outputs(args, stem, config, names, grid, chosen, results, per_seed, seconds, total):
    from sclip_lightning.results import markdown_table

    every = list(dict.fromkeys(k for n in names for k in results[n]))
    cols = [k for k in every if k.startswith("zero-shot")] + METRICS
    cols += [k for k in every if k not in cols]

    def cell(res, c, fmt):
        return fmt(res[c]) if c in res else "-"

    main_rows = [
        {
            "method": n,
            "lr": f"{chosen[n]:g}",
            **{c: cell(results[n], c, lambda v: f"{v[0]:.1f} ± {v[1]:.1f}") for c in cols},
        }
        for n in names
    ]
    seed_rows = [
        {"method": n, "seed": s, **{c: cell(r, c, lambda v: f"{v:.1f}") for c in cols}}
        for n in names
        for s, r in zip(args.seeds, per_seed[n], strict=True)
    ]
    grid_rows = [{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in g.items()} for g in grid]
    val_sets, test_only = selection_sets(args.zeroshot)
    scored = "the training set's own zero-shot classes" if val_sets is None else val_sets
    header = (
        f"# {stem}\n\nconfigs {', '.join(f'`{config_label(c)}`' for c in config)}, "
        f"{args.steps} steps, lrs "
        f"{args.lrs}, seeds {args.seeds}; {len(seconds)} runs, {total / 60:.1f} min in all "
        f"(per run {min(seconds):.0f}-{max(seconds):.0f} s)\n\n"
        f"Selection: val split only (retrieval and zero-shot: {scored}); "
        f"zero-shot sets without a val split, evaluated at test only: {test_only or 'none'}. "
        "Retrieval recall counts tied scores in expectation (docs/method.md).\n\n"
    )
    text = (
        header
        + "## Test split (mean ± std over seeds)\n\n"
        + markdown_table(main_rows)
        + "\n\n## Per seed\n\n"
        + markdown_table(seed_rows)
        + "\n\n## Grid (val split, seed 0)\n\n"
        + markdown_table(grid_rows)
        + "\n"
    )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "configs": [config_label(c) for c in config],
                "steps": args.steps,
                "lrs": args.lrs,
                "seeds": args.seeds,
                "chosen_lr": chosen,
                "results": results,
                "per_seed": per_seed,
                "grid": grid,
                "run_seconds": seconds,
                "total_seconds": total,
            },
            indent=2,
        )
    )
    plot(results, args.out / f"{stem}.png", args.protocol, len(args.seeds))
    print(f"written {args.out / stem}.md, .json, .png; total {total / 60:.1f} min")


def plot(results: dict[str, dict[str, Any]], path: Path, protocol: str, seeds: int) -> None:
    """The chart of a results table: zero-shot top-1 of (up to two) sets, R@1 both ways, mean R."""
    from sclip_lightning.results import bar_chart

    every = list(dict.fromkeys(k for r in results.values() for k in r))
    shown = [c for c in every if c.startswith("zero-shot") and c != "zero-shot mean"][:2]
    shown += ["i2t_R@1", "t2i_R@1", "mean_R"]
    bar_chart(
        shown,
        {n: [r[c][0] for c in shown] for n, r in results.items()},
        {n: [r[c][1] for c in shown] for n, r in results.items()},
        path,
        title=f"rsicd-mini test split ({protocol}), {seeds} seeds",
    )


if __name__ == "__main__":
    main()
