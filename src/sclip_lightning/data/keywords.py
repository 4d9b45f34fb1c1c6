"""Keyword vocabularies and keyword-candidate labels (S-CLIP Sec. 3.2).

Works with ``spacy.blank("en")`` (tokeniser, stop words, PhraseMatcher); when a full English
pipeline is installed (e.g. ``en_core_web_sm``) mining can use its noun chunks. Keywords can
also be mined with YAKE (:func:`mine_keywords_yake`), the extractor S-CLIP's authors used for
their keyword vocabularies. Each mining logs and prints one line: how many keywords it kept
and the top ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from sclip_lightning.losses.component import check_choice

log = logging.getLogger(__name__)

#: how a keyword is found in a caption: whole words / phrases, case-insensitive ("tokens"),
#: or the release's case-sensitive ``" k " in " caption "`` ("release")
KeywordMatching = Literal["tokens", "release"]


def resolve_keywords(
    spec: str | None,
    source_default: Callable[[Path], Path | None] | None,
    root: Path,
    captions: Sequence[str],
    num_keywords: int,
) -> list[str]:
    """The keyword vocabulary a data module's ``keywords`` option names.

    Args:
        spec: a file path, ``"default"`` (the source's own list, if any), ``"mine"`` (the top
            ``num_keywords`` by frequency in ``captions``, :func:`mine_keywords`),
            ``"yake"`` (the top ``num_keywords`` by YAKE over ``captions``,
            :func:`mine_keywords_yake`) or None (no keywords).
        source_default: the source's ``root -> keyword file`` (or None).
        root: the source's root.
        captions: the paired captions (for mining).
        num_keywords: vocabulary size when mining.
    """
    if spec is None:
        return []
    if spec == "default":
        path = source_default(root) if source_default is not None else None
        return load_keywords(path) if path is not None else []
    if spec == "mine":
        return mine_keywords(captions, top_k=num_keywords)
    if spec == "yake":
        return mine_keywords_yake(captions, top_k=num_keywords)
    return load_keywords(spec)


def load_keywords(path: str | Path) -> list[str]:
    """Read a keyword vocabulary: one keyword or phrase a line, blank lines and ``#`` ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no keyword.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keyword file not found: {path} (one keyword per line)")
    words = []
    seen = set()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        from sclip_lightning.data.base import utf8_error

        raise utf8_error(path, e) from None
    for line in text.splitlines():
        w = line.strip()
        if w and not w.startswith("#") and w.lower() not in seen:
            seen.add(w.lower())
            words.append(w)
    if not words:
        raise ValueError(f"keyword file {path} is empty: write one keyword per line")
    return words


def candidate_tables(
    matcher: KeywordMatcher, captions: dict[int, Sequence[str]]
) -> dict[int, torch.Tensor]:
    """``{index: (n_captions, K) bool}``: which keywords each caption of each item contains
    (matched once, not at every visit); logs how many captions contain one, and warns when
    none does (the keyword loss would have no signal)."""
    tables = {i: matcher.table(caps) for i, caps in captions.items()}
    if matcher.keywords and tables:
        rows = torch.cat(list(tables.values()))
        hit, total = int(rows.any(dim=1).sum()), rows.shape[0]
        if hit == 0:
            log.warning(
                "none of the %d keywords occurs in any of the %d paired captions: the keyword "
                "loss will have no signal; check the vocabulary",
                len(matcher.keywords),
                total,
            )
        else:
            log.info("keywords: %d of %d paired captions contain one", hit, total)
    return tables


def _blank_nlp():
    import spacy

    return spacy.blank("en")


def mine_keywords(
    captions: Iterable[str],
    top_k: int = 100,
    bigram_min_count: int = 5,
    use_noun_chunks: bool | str = False,
) -> list[str]:
    """Top-K keywords of a caption corpus by frequency.

    With the blank English tokeniser: lower-cased alphabetic unigrams that are not stop
    words, plus bigrams of two such adjacent tokens seen at least ``bigram_min_count``
    times. With ``use_noun_chunks`` (True = ``"en_core_web_sm"``, or a pipeline name) the
    candidates are the pipeline's noun chunks without determiners.

    Args:
        captions: the paired captions.
        top_k: vocabulary size (>= 1).
        bigram_min_count: minimum count for a bigram to be a candidate.
        use_noun_chunks: False, True or the name of an installed spaCy pipeline.

    Returns:
        Up to ``top_k`` keywords, most frequent first (ties broken alphabetically).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    counts: Counter[str] = Counter()
    texts = [c for c in captions if c and c.strip()]
    if use_noun_chunks:
        import spacy

        name = "en_core_web_sm" if use_noun_chunks is True else str(use_noun_chunks)
        try:
            nlp = spacy.load(name)
        except OSError as e:
            raise OSError(
                f"spaCy pipeline {name!r} is not installed; install it or set "
                "use_noun_chunks=False to mine with the blank tokeniser"
            ) from e
        for doc in nlp.pipe(texts):
            for chunk in doc.noun_chunks:
                toks = [t for t in chunk if not t.is_stop and t.is_alpha]
                if toks:
                    counts[" ".join(t.lower_ for t in toks)] += 1
    else:
        nlp = _blank_nlp()
        bigrams: Counter[str] = Counter()
        for doc in nlp.pipe(texts):
            good = [t.is_alpha and not t.is_stop and len(t) > 1 for t in doc]
            for i, tok in enumerate(doc):
                if good[i]:
                    counts[tok.lower_] += 1
                    if i + 1 < len(doc) and good[i + 1]:
                        bigrams[f"{tok.lower_} {doc[i + 1].lower_}"] += 1
        counts.update({b: c for b, c in bigrams.items() if c >= bigram_min_count})
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    how = "noun chunks" if use_noun_chunks else "frequency"
    _report(f"{len(ranked)} mined by {how} from {len(texts)} captions; top (count)", ranked)
    return [w for w, _ in ranked]


def mine_keywords_yake(
    captions: Iterable[str],
    top_k: int = 100,
    max_ngram: int = 2,
    dedup_lim: float = 0.9,
    window_size: int = 1,
) -> list[str]:
    """Top-K keywords of a caption corpus by YAKE (Campos et al., Information Sciences 2020).

    The captions are lower-cased (capitals in captions are mostly sentence starts, which
    YAKE's casing feature would otherwise weigh) and joined, in the order given, into ONE
    document, one caption a sentence (a full stop is added to a caption without final
    punctuation). One document rather than one YAKE run per caption: YAKE's statistics
    (term frequency, spread over sentences, relatedness to context) need many sentences, a
    single caption gives them nothing to rank, and per-caption scores have no principled
    aggregate. YAKE then scores every 1..``max_ngram``-gram that neither starts nor ends with
    a word of its English stop-word list (lower score = more relevant), drops a candidate
    whose ``seqm`` similarity to a better one exceeds ``dedup_lim``, and the ``top_k`` best
    are kept (repeats after lower-casing dropped). YAKE is deterministic: the same captions
    in the same order give the same list (its position feature makes the order matter a
    little).

    Args:
        captions: the paired captions.
        top_k: vocabulary size (>= 1).
        max_ngram: longest keyword in words (YAKE's ``n``; 2 fits class-like phrases such as
            "baseball field" and "storage tanks", 3 lets in "sparse green trees").
        dedup_lim: YAKE's de-duplication threshold in (0, 1] (1 keeps near-repeats).
        window_size: YAKE's co-occurrence window (words).

    Returns:
        Up to ``top_k`` keywords, best YAKE score first.

    Raises:
        ValueError: an option out of range, no non-empty caption, or YAKE found no keyword.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if max_ngram < 1:
        raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
    if not 0 < dedup_lim <= 1:
        raise ValueError(f"dedup_lim must be in (0, 1], got {dedup_lim}")
    texts = [" ".join(c.split()).lower() for c in captions if c and c.strip()]
    if not texts:
        raise ValueError(
            "no caption to mine keywords from (all are empty): YAKE needs the paired captions"
        )
    import yake

    document = "\n".join(t if t[-1] in ".!?" else f"{t} ." for t in texts)
    extractor = yake.KeywordExtractor(
        lan="en", n=max_ngram, dedup_lim=dedup_lim, window_size=window_size, top=top_k
    )
    best: dict[str, float] = {}
    for keyword, score in extractor.extract_keywords(document):
        best.setdefault(" ".join(keyword.lower().split()), float(score))
    if not best:
        raise ValueError(
            f"YAKE found no keyword in {len(texts)} captions (only stop words or punctuation?)"
        )
    ranked = list(best.items())[:top_k]
    _report(
        f"{len(ranked)} mined by YAKE (n <= {max_ngram}) from {len(texts)} captions; "
        "top (score, lower is better)",
        [(w, f"{s:.2g}") for w, s in ranked],
    )
    return [w for w, _ in ranked]


def _report(what: str, ranked: Sequence[tuple[str, Any]], shown: int = 10) -> None:
    """Log and print one line: ``keywords: <what>: k1 (v1), k2 (v2), ...``."""
    top = ", ".join(f"{w} ({v})" for w, v in ranked[:shown])
    line = f"keywords: {what}: {top}"
    log.info(line)
    print(line)


class KeywordMatcher:
    """Which vocabulary keywords occur in a caption, as whole words or phrases.

    ``mode="tokens"`` (default) matches case-insensitively on spaCy tokens (so
    ``"parking"`` does not match inside ``"parkings"``, ``"baseball field"`` matches the
    phrase, and ``"forest."`` matches ``forest``). ``mode="release"`` reproduces the
    release's test ``" k " in " caption "``: case-sensitive, and a keyword followed by
    punctuation is missed. Picklable for workers.

    Args:
        keywords: the vocabulary (K entries).
        mode: ``"tokens"`` or ``"release"``.
    """

    def __init__(self, keywords: Sequence[str], mode: KeywordMatching = "tokens") -> None:
        check_choice("keyword_matching", mode, KeywordMatching)
        self.mode = mode
        self.keywords = list(keywords)
        self._nlp: Any = None
        self._matcher: Any = None

    def __len__(self) -> int:
        return len(self.keywords)

    def _build(self) -> None:
        from spacy.matcher import PhraseMatcher

        self._nlp = _blank_nlp()
        self._matcher = PhraseMatcher(self._nlp.vocab, attr="LOWER")
        for k, word in enumerate(self.keywords):
            self._matcher.add(str(k), [self._nlp.make_doc(word)])

    def __getstate__(self):
        return {"keywords": self.keywords, "mode": self.mode}

    def __setstate__(self, state) -> None:
        self.keywords = state["keywords"]
        self.mode = state.get("mode", "tokens")
        self._nlp = None
        self._matcher = None

    def __call__(self, caption: str) -> torch.Tensor:
        """(K,) bool tensor: True where keyword k occurs in ``caption``."""
        out = torch.zeros(len(self.keywords), dtype=torch.bool)
        if not self.keywords:
            return out
        if self.mode == "release":
            spaced = f" {caption} "
            return torch.tensor([f" {k} " in spaced for k in self.keywords], dtype=torch.bool)
        if self._matcher is None:
            self._build()
        assert self._nlp is not None and self._matcher is not None
        doc = self._nlp.make_doc(caption)
        for match_id, _, _ in self._matcher(doc):
            out[int(self._nlp.vocab.strings[match_id])] = True
        return out

    def table(self, captions: Sequence[str]) -> torch.Tensor:
        """(len(captions), K) bool: row i = ``self(captions[i])``."""
        if not captions:
            return torch.zeros(0, len(self.keywords), dtype=torch.bool)
        return torch.stack([self(c) for c in captions])
