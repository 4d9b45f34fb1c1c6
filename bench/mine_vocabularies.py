"""What each vocabulary miner gives on rsicd-mini's paired captions.

The captions come through the product: ``training_split`` over the ``rsicd`` source (the
:class:`~sclip_lightning.data.remote_sensing.RSICD` reader of ``dataset_rsicd.json``), with the
data module's defaults ``label_ratio=0.1`` and ``split_seed=0``; the paired images' captions
(all five of each) are what every miner sees, as in training. Then:

- concepts (SemiCLIP): ``ConceptMiner()`` (the default rules) and ``ConceptMiner.released()``
  (the release's rules), each with the tagger ``"auto"`` picks on this machine;
- keywords (S-CLIP): ``keywords="mine"`` (frequency) and ``keywords="yake"``, each the top
  ``--num-keywords`` (the data module's ``num_keywords``, 100).

For each: the vocabulary size, the top terms and the time the mining took (one call, spaCy
and YAKE already imported). Counts are the number of paired images whose captions contain the
term (concepts: the miner's own counts; keywords: whole-word / phrase matches, as the keyword
labels are built). Concepts are shown most frequent first; keywords in the miner's own rank
(frequency: mentions; YAKE: score). A miner that keeps nothing shows its error.

Usage: python bench/mine_vocabularies.py [--root ../shared/data/rsicd-mini] [--top 15]
       [--num-keywords 100] [--label-ratio 0.1] [--seed 0] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-mini"


@dataclass
class Row:
    """One miner's result: its name, the rule, the vocabulary and counts (or an error)."""

    name: str
    rule: str
    seconds: float
    terms: list[tuple[str, int]]  # (term, paired images containing it), in display order
    size: int
    error: str = ""


def paired_captions(root: Path, label_ratio: float, seed: int) -> list[list[str]]:
    """The captions of each paired image of the product's training split of ``root``."""
    from sclip_lightning.data.datasets import training_split

    split = training_split("rsicd", root, None, None, label_ratio, seed, {})
    return [list(split.paired_base.captions[i]) for i in split.paired_indices]


def _timed(fn: Callable[[], object]) -> tuple[object, float, str]:
    """Run ``fn`` with its printed line swallowed: (result or None, seconds, error)."""
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            out = fn()
    except ValueError as e:
        return None, time.perf_counter() - start, str(e)
    return out, time.perf_counter() - start, ""


def run(captions: Sequence[Sequence[str]], num_keywords: int) -> tuple[list[Row], str]:
    """Every miner on ``captions``; also the name of the tagger ``"auto"`` chose."""
    import spacy  # noqa: F401 - imported before the clocks start
    import yake  # noqa: F401

    from sclip_lightning.concepts import ConceptMiner, build_noun_tagger
    from sclip_lightning.data.keywords import KeywordMatcher, mine_keywords, mine_keywords_yake

    tagger = build_noun_tagger("auto", "en_core_web_sm").name
    rows = []
    concept_miners = [
        ("ConceptMiner()", ConceptMiner(), "images >= 5, len >= 3, count / images < 0.3"),
        (
            "ConceptMiner.released()",
            ConceptMiner.released(),
            "images >= 5, len > 2, count / candidates < 0.3, case kept",
        ),
    ]
    for name, miner, rule in concept_miners:
        out, secs, err = _timed(lambda miner=miner: miner.mine(captions))
        terms: list[tuple[str, int]] = []
        if out is not None:
            terms = sorted(zip(out.names, out.counts, strict=True), key=lambda t: (-t[1], t[0]))
        rows.append(Row(name, rule, secs, terms, len(terms), err))

    flat = [c for caps in captions for c in caps]
    keyword_miners = [
        ('keywords="mine"', lambda: mine_keywords(flat, top_k=num_keywords), "top by frequency"),
        (
            'keywords="yake"',
            lambda: mine_keywords_yake(flat, top_k=num_keywords),
            "top by YAKE score",
        ),
    ]
    for name, fn, rule in keyword_miners:
        out, secs, err = _timed(fn)
        words = list(out) if isinstance(out, list) else []
        counts = [0] * len(words)
        if words:  # images whose captions contain the keyword, as the labels match it
            matcher = KeywordMatcher(words)
            hits = [matcher.table(list(caps)).any(dim=0) for caps in captions if caps]
            counts = [int(c) for c in sum(h.long() for h in hits).tolist()]
        rows.append(
            Row(name, f"{rule} ({num_keywords})", secs, list(zip(words, counts, strict=True)),
                len(words), err)
        )  # fmt: skip
    return rows, tagger


def render(rows: Sequence[Row], header: str, top: int, markdown: bool) -> str:
    """The table and the top terms, as plain text or a README-ready markdown block."""
    lines = [header, ""]
    if markdown:
        lines += ["| vocabulary | rule | size | time (s) |", "| --- | --- | ---: | ---: |"]
        lines += [f"| `{r.name}` | {r.rule} | {r.size} | {r.seconds:.2f} |" for r in rows]
        lines += ["", f"Top {top} (paired images whose captions contain the term):", ""]
    else:
        width = max(len(r.name) for r in rows)
        lines += [f"{'vocabulary':<{width}}  {'size':>5}  {'time (s)':>8}  rule"]
        lines += [f"{r.name:<{width}}  {r.size:>5}  {r.seconds:>8.2f}  {r.rule}" for r in rows]
        lines += ["", f"top {top} (paired images whose captions contain the term):"]
    for r in rows:
        shown = r.error or ", ".join(f"{t} ({c})" for t, c in r.terms[:top])
        lines.append(f"- `{r.name}`: {shown}" if markdown else f"{r.name}: {shown}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Parse the arguments, mine every vocabulary and print the result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="rsicd-mini (native layout)")
    p.add_argument("--label-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--num-keywords", type=int, default=100)
    p.add_argument("--top", type=int, default=15, help="terms shown per vocabulary")
    p.add_argument("--markdown", action="store_true", help="print a README-ready block")
    args = p.parse_args(argv)
    if not (args.root / "dataset_rsicd.json").is_file():
        sys.exit(
            f"rsicd-mini not found at {args.root} (needs dataset_rsicd.json): put the shared/ "
            "folder beside the repository or pass --root"
        )
    captions = paired_captions(args.root, args.label_ratio, args.seed)
    rows, tagger = run(captions, args.num_keywords)
    n_caps = sum(len(c) for c in captions)
    header = (
        f"{args.root.name}: {len(captions)} paired images (label_ratio {args.label_ratio}, "
        f"split seed {args.seed}), {n_caps} captions; concept tagger (auto): {tagger}"
    )
    print(render(rows, header, args.top, args.markdown))
    return rows


if __name__ == "__main__":
    main()
