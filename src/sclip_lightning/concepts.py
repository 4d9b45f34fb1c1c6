"""SemiCLIP's concept vocabulary: nouns mined from the paired captions, and multi-hot labels.

:class:`ConceptMiner` turns the captions of the paired images into K concepts and an
``(N_images, K)`` multi-hot: ``labels[i, k] = 1`` when concept k occurs in any caption of
image i. Either the concepts are read from a vocabulary file (one a line), or they are mined:

1. every caption of every paired image is tagged (see *Taggers*); the candidate words of an
   image are those of all its captions, lower-cased when ``lowercase`` (the release keeps
   case), de-duplicated per image;
2. the candidate vocabulary is every image's candidates in first-occurrence order; with
   ``retag_alone`` (the release's quirk Q2) a candidate is kept only if the tagger also tags
   the word alone as a noun; then the stop nouns are removed (``stop_nouns``, by default the
   release's 75 generic nouns :data:`RELEASE_GENERIC_NOUNS`);
3. count = the number of images whose candidates contain the word; a word is kept when
   ``count >= min_images``, ``len(word) >= min_length`` and ``count / denominator <
   max_fraction``, where the denominator is the number of images (``fraction_of="images"``,
   the default: drop words found in 30% or more of the images) or the number of candidates
   left after step 2 (``fraction_of="vocabulary"``, the release's quirk Q1: it compares an
   image count with a vocabulary size);
4. ``max_concepts`` keeps only the most frequent of those (ties: first occurrence with
   ``order="first"``, alphabetical otherwise);
5. order: most frequent first, ties alphabetical (``order="frequency"``, the default), or
   first-occurrence order (``order="first"``, the release's).

:meth:`ConceptMiner.released` sets the release's rules (case kept, cap by vocabulary size,
re-tag alone, first-occurrence order; ``min_images=5``, ``len > 2``, ``0.3`` are also the
defaults). Every mining logs and prints one line with the count kept and the top concepts.

Taggers
-------
The release tags with NLTK (``word_tokenize`` + ``pos_tag``, Penn tags NN/NNS/NNP/NNPS),
whose tagger data are downloads, not packages. Here:

* ``"spacy"``: ``spacy.load(spacy_pipeline)`` (an installed English pipeline with a tagger
  or morphologizer, e.g. ``en_core_web_sm``); nouns are tokens with ``pos_`` NOUN / PROPN or
  a Penn ``tag_`` NN*. Its parser, NER and lemmatizer are disabled (not needed).
* ``"frequency"``: no tagger: ``spacy.blank("en")`` tokens that are alphabetic and not spaCy
  English stop words. These are content words (nouns, but also adjectives such as "green"
  and verbs), an approximation of the nouns; the stop nouns and the frequency rules then
  apply as above. ``retag_alone`` has no effect (there are no tags).
* ``"auto"`` (default): the spaCy pipeline when it is installed and has a tagger, else
  ``"frequency"``; the log line says which was used and why.
* Any object with the :class:`NounTagger` methods through :meth:`ConceptMiner.use_tagger`,
  e.g. :class:`PosTagFunctions` over ``nltk.word_tokenize`` / ``nltk.pos_tag``, which
  reproduces the release's tagging exactly where NLTK and its data are installed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from sclip_lightning.losses.component import Component, check_choice

log = logging.getLogger(__name__)

#: which tagger finds the candidate nouns (see the module docstring)
ConceptTagger = Literal["auto", "spacy", "frequency"]
#: the denominator of the frequency cap: number of images, or of candidate nouns (release)
FractionOf = Literal["images", "vocabulary"]
#: order of the kept concepts: most frequent first, or first occurrence (release)
ConceptOrder = Literal["frequency", "first"]

#: Penn Treebank noun tags (the release's NN, NNS, NNP, NNPS)
PENN_NOUN_TAGS: tuple[str, ...] = ("NN", "NNS", "NNP", "NNPS")

# The release's generic ("OOD") nouns, custom/data.py:26-33 at Gank0078/SemiCLIP@0e55006:
# 75 entries, case-sensitive, typos ("differnet", "palyground") and both "Lots" and "lots" kept.
# fmt: off
RELEASE_GENERIC_NOUNS: tuple[str, ...] = (
    "lot", "zone", "top", "left", "inspection", "way", "brand", "hand", "length", "b", "ease",
    "communications", "economy", "number", "lies", "towards", "type", "places", "shapes", "Lots",
    "structure", "sizes", "pieces", "stands", "end", "built", "thirds", "zones", "bottom", "south",
    "prints", "air", "take-off", "types", "tens", "fact", "kind", "style", "side", "question",
    "situation", "y", "tp", "others", "styles", "amount", "drop", "holiday", "differnet", "size",
    "u", "pictures", "use", "l", "picture", "looks", "rate", "design", "s", "uses", "arrange",
    "z", "piece", "palyground", "lots", "view", "kinds", "j", "work", "beautiful", "R", "none",
    "lack", "]", "colourful",
)
# fmt: on

_TOP_SHOWN = 10  # concepts named in the log line
_POS_PIPES = ("tagger", "morphologizer")  # factories that set part-of-speech tags
# factories a spaCy pipeline needs for tags; the others (parser, ner, ...) are disabled
_TAG_PIPES = (*_POS_PIPES, "tok2vec", "transformer", "attribute_ruler")


@dataclass
class Concepts:
    """A concept vocabulary and the paired images' multi-hot labels.

    Attributes:
        names: the K concepts, in the vocabulary's order.
        labels: ``(N_images, K)`` float32 0/1: concept k occurs in a caption of image i
            (an image with no concept has a zero row).
        counts: the number of images containing each concept (K entries).
    """

    names: list[str]
    labels: torch.Tensor
    counts: list[int]


class NounTagger(Protocol):
    """What :class:`ConceptMiner` needs from a tagger."""

    #: how the log line names the tagger
    name: str

    def nouns(self, texts: Sequence[str]) -> list[list[str]]:
        """The candidate nouns of each text, in text order (repeats allowed)."""
        ...

    def alone_nouns(self, words: Sequence[str]) -> list[bool]:
        """Whether each word, tagged alone, is a noun (``retag_alone``)."""
        ...


class SpacyNouns:
    """Nouns of a spaCy pipeline with a tagger: ``pos_`` NOUN / PROPN or ``tag_`` NN*.

    Args:
        nlp: a loaded pipeline (see :func:`load_tagging_pipeline`).
        name: how the log line names it.
    """

    def __init__(self, nlp: Any, name: str) -> None:
        self.nlp = nlp
        self.name = name

    @staticmethod
    def _is_noun(token: Any) -> bool:
        return token.pos_ in ("NOUN", "PROPN") or token.tag_.startswith("NN")

    def nouns(self, texts: Sequence[str]) -> list[list[str]]:
        """Noun tokens of each text (``nlp.pipe``, batches of 256)."""
        return [
            [t.text for t in doc if self._is_noun(t)]
            for doc in self.nlp.pipe(texts, batch_size=256)
        ]

    def alone_nouns(self, words: Sequence[str]) -> list[bool]:
        """Each word as a one-token document, tagged by the pipeline."""
        from spacy.tokens import Doc

        docs = (Doc(self.nlp.vocab, words=[w]) for w in words)
        return [self._is_noun(doc[0]) for doc in self.nlp.pipe(docs, batch_size=256)]


class ContentWords:
    """No tagger: alphabetic ``spacy.blank("en")`` tokens that are not English stop words.

    An approximation of the nouns (adjectives and verbs pass too); :meth:`alone_nouns` says
    True for every word.

    Args:
        note: appended to the name in the log line (e.g. why ``"auto"`` fell back to it).
    """

    def __init__(self, note: str = "") -> None:
        import spacy

        self.nlp = spacy.blank("en")
        self.name = f"frequency; {note}" if note else "frequency"

    def nouns(self, texts: Sequence[str]) -> list[list[str]]:
        """Alphabetic non-stop-word tokens of each text (a blank pipeline: tokenizer only)."""
        return [
            [t.text for t in doc if t.is_alpha and not t.is_stop]
            for doc in self.nlp.pipe(texts, batch_size=256)
        ]

    def alone_nouns(self, words: Sequence[str]) -> list[bool]:
        """No tags: every word passes."""
        return [True] * len(words)


class PosTagFunctions:
    """NLTK-style functions as a tagger: nouns are the words ``pos_tag`` gives a Penn NN* tag.

    ``PosTagFunctions(nltk.word_tokenize, nltk.pos_tag)`` tags as the release does (NLTK and
    its ``punkt`` / ``averaged_perceptron_tagger`` data must be installed; they are not
    dependencies of this package).

    Args:
        word_tokenize: ``text -> words``.
        pos_tag: ``words -> [(word, tag), ...]``.
        name: how the log line names it.
    """

    def __init__(
        self,
        word_tokenize: Callable[[str], list[str]],
        pos_tag: Callable[[list[str]], list[tuple[str, str]]],
        name: str = "pos_tag",
    ) -> None:
        self.word_tokenize = word_tokenize
        self.pos_tag = pos_tag
        self.name = name

    def nouns(self, texts: Sequence[str]) -> list[list[str]]:
        """Words of each text tagged NN, NNS, NNP or NNPS."""
        return [
            [w for w, tag in self.pos_tag(self.word_tokenize(t)) if tag in PENN_NOUN_TAGS]
            for t in texts
        ]

    def alone_nouns(self, words: Sequence[str]) -> list[bool]:
        """``pos_tag([word])`` is a noun tag (the release's re-tag, data.py:36-38)."""
        return [self.pos_tag([w])[0][1] in PENN_NOUN_TAGS for w in words]


def load_tagging_pipeline(name: str) -> Any:
    """``spacy.load(name)`` with the pipes that tags need and the others disabled.

    Raises:
        OSError: the pipeline is not installed (nor a pipeline folder).
        ValueError: it has no tagger or morphologizer.
    """
    import spacy

    try:
        nlp = spacy.load(name)
    except OSError as e:
        raise OSError(
            f"spaCy pipeline {name!r} is not installed: install an English pipeline with a "
            "tagger (e.g. `python -m spacy download en_core_web_sm`), set spacy_pipeline to "
            "an installed one or a pipeline folder, or use tagger='frequency' (or 'auto', "
            "which falls back to it)"
        ) from e
    factories = {pipe: nlp.get_pipe_meta(pipe).factory for pipe in nlp.pipe_names}
    if not set(factories.values()) & set(_POS_PIPES):
        raise ValueError(
            f"spaCy pipeline {name!r} has no tagger or morphologizer (pipes: "
            f"{nlp.pipe_names}): concept mining needs part-of-speech tags; use a pipeline "
            "that has one, or tagger='frequency'"
        )
    nlp.select_pipes(disable=[p for p, f in factories.items() if f not in _TAG_PIPES])
    return nlp


def build_noun_tagger(tagger: ConceptTagger, spacy_pipeline: str) -> NounTagger:
    """The tagger a :class:`ConceptMiner`'s ``tagger`` option names (see the module doc).

    Raises:
        OSError, ValueError: ``tagger="spacy"`` and the pipeline is missing or has no tagger.
    """
    check_choice("tagger", tagger, ConceptTagger)
    if tagger == "frequency":
        return ContentWords()
    try:
        return SpacyNouns(load_tagging_pipeline(spacy_pipeline), f"spacy {spacy_pipeline}")
    except OSError:
        if tagger == "spacy":
            raise
        return ContentWords(f"spaCy pipeline {spacy_pipeline} not installed")
    except ValueError:
        if tagger == "spacy":
            raise
        return ContentWords(f"spaCy pipeline {spacy_pipeline} has no tagger")


def load_concept_vocabulary(path: str | Path, lowercase: bool = True) -> list[str]:
    """Read a concept vocabulary: one concept a line, blank lines and ``#`` lines ignored,
    repeats dropped (case-insensitively when ``lowercase``); spelling kept as written.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no concept (or is not UTF-8).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"concept vocabulary file not found: {path}: write one concept per line, or set "
            "vocabulary=None to mine the concepts from the paired captions"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        from sclip_lightning.data.base import utf8_error

        raise utf8_error(path, e) from None
    names: dict[str, str] = {}
    for line in text.splitlines():
        word = line.strip()
        if word and not word.startswith("#"):
            names.setdefault(word.lower() if lowercase else word, word)
    if not names:
        raise ValueError(
            f"concept vocabulary file {path} holds no concept: write one concept per line "
            "('#' starts a comment), or set vocabulary=None to mine them"
        )
    return list(names.values())


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class ConceptMiner(Component):
    """SemiCLIP's concepts from the paired captions (see the module docstring for the rules).

    Args:
        vocabulary: a text file of concepts, one a line: no mining; an image has concept k
            when k occurs as whole words in one of its captions (case-insensitively when
            ``lowercase``). None: mine the nouns of the captions.
        tagger: ``"auto"``, ``"spacy"`` or ``"frequency"`` (see the module docstring).
        spacy_pipeline: the spaCy pipeline (name or folder) for ``"spacy"`` / ``"auto"``.
        min_images: keep a noun found in at least this many images (release: 5).
        min_length: keep a noun of at least this many characters (release: ``len > 2``).
        max_fraction: keep a noun when ``count / denominator < max_fraction`` (release: 0.3;
            a value above 1 disables the cap with ``fraction_of="images"``).
        fraction_of: the denominator: ``"images"`` (the number of images) or
            ``"vocabulary"`` (the number of candidate nouns, the release's quirk Q1).
        lowercase: lower-case the nouns (and compare the stop nouns and a vocabulary
            case-insensitively); False keeps case as the release does (Q4).
        stop_nouns: words never kept; None: :data:`RELEASE_GENERIC_NOUNS`.
        max_concepts: keep only the most frequent ones (None: all).
        order: ``"frequency"`` (most frequent first, ties alphabetical) or ``"first"``
            (first occurrence, as the release).
        retag_alone: keep a candidate only if the tagger also tags it alone as a noun (the
            release's quirk Q2; no effect with ``tagger="frequency"``).

    Raises:
        ValueError: an option out of its range (the message names it).
    """

    def __init__(
        self,
        vocabulary: str | None = None,
        tagger: ConceptTagger = "auto",
        spacy_pipeline: str = "en_core_web_sm",
        min_images: int = 5,
        min_length: int = 3,
        max_fraction: float = 0.3,
        fraction_of: FractionOf = "images",
        lowercase: bool = True,
        stop_nouns: list[str] | None = None,
        max_concepts: int | None = None,
        order: ConceptOrder = "frequency",
        retag_alone: bool = False,
    ) -> None:
        super().__init__()
        if vocabulary is not None and not (isinstance(vocabulary, str) and vocabulary.strip()):
            raise ValueError(
                f"vocabulary must be a file path as a string, or None to mine, got {vocabulary!r}"
            )
        check_choice("tagger", tagger, ConceptTagger)
        check_choice("fraction_of", fraction_of, FractionOf)
        check_choice("order", order, ConceptOrder)
        if not (isinstance(spacy_pipeline, str) and spacy_pipeline.strip()):
            raise ValueError(f"spacy_pipeline must be a pipeline name, got {spacy_pipeline!r}")
        _check_int("min_images", min_images, 1)
        _check_int("min_length", min_length, 1)
        if max_concepts is not None:
            _check_int("max_concepts", max_concepts, 1)
        if (
            isinstance(max_fraction, bool)
            or not isinstance(max_fraction, (int, float))
            or not max_fraction > 0
        ):
            raise ValueError(f"max_fraction must be a number > 0, got {max_fraction!r}")
        if stop_nouns is not None and not (
            isinstance(stop_nouns, (list, tuple)) and all(isinstance(w, str) for w in stop_nouns)
        ):
            raise ValueError(f"stop_nouns must be a list of words or None, got {stop_nouns!r}")
        for name, flag in (("lowercase", lowercase), ("retag_alone", retag_alone)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.vocabulary = vocabulary
        self.tagger = tagger
        self.spacy_pipeline = spacy_pipeline
        self.min_images = min_images
        self.min_length = min_length
        self.max_fraction = float(max_fraction)
        self.fraction_of = fraction_of
        self.lowercase = lowercase
        self.stop_nouns = list(RELEASE_GENERIC_NOUNS if stop_nouns is None else stop_nouns)
        self.max_concepts = max_concepts
        self.order = order
        self.retag_alone = retag_alone
        self._tagger_override: NounTagger | None = None

    @classmethod
    def released(cls, **overrides: Any) -> ConceptMiner:
        """The release's rules: case kept (``lowercase=False``, Q4), cap divided by the
        number of candidates (``fraction_of="vocabulary"``, Q1), candidates re-tagged alone
        (``retag_alone=True``, Q2), first-occurrence order, the 75 generic nouns compared
        exactly (Q3), ``min_images=5``, ``min_length=3`` (``len > 2``), ``max_fraction=0.3``.

        The release tags with NLTK: with a spaCy pipeline or the ``"frequency"`` fallback
        the candidates differ; :meth:`use_tagger` with :class:`PosTagFunctions` over NLTK
        reproduces them.

        Args:
            **overrides: any other ``__init__`` option (or one of these, changed).
        """
        args: dict[str, Any] = {
            "min_images": 5,
            "min_length": 3,
            "max_fraction": 0.3,
            "fraction_of": "vocabulary",
            "lowercase": False,
            "stop_nouns": None,
            "order": "first",
            "retag_alone": True,
        }
        args.update(overrides)
        return cls(**args)

    def use_tagger(self, tagger: NounTagger | None) -> ConceptMiner:
        """Tag with ``tagger`` instead of the one the ``tagger`` option names (None: back to
        the option). Not part of :meth:`config`: a runtime choice (e.g. NLTK, or a test's
        deterministic tagger). Returns self."""
        self._tagger_override = tagger
        return self

    def mine(self, captions_per_image: Sequence[Sequence[str]]) -> Concepts:
        """The concepts of the paired images and their multi-hot labels.

        Args:
            captions_per_image: the captions of each paired image (a single string counts
                as one caption), in the order of the label rows.

        Returns:
            :class:`Concepts` (names, ``(N, K)`` float32 labels, per-concept image counts).

        Raises:
            ValueError: no image, or no concept kept (the message says which rule removed
                the last candidates and which option to change).
            FileNotFoundError: the vocabulary file does not exist.
            OSError: ``tagger="spacy"`` and the pipeline is not installed.
        """
        per_image = [[c] if isinstance(c, str) else list(c) for c in captions_per_image]
        if not per_image:
            raise ValueError("no images to mine concepts from (captions_per_image is empty)")
        if self.vocabulary is not None:
            return self._from_vocabulary(per_image, self.vocabulary)
        tagger = self._tagger_override or build_noun_tagger(self.tagger, self.spacy_pipeline)

        flat = [text for texts in per_image for text in texts]
        tagged = iter(tagger.nouns(flat))
        image_nouns: list[list[str]] = []
        for texts in per_image:
            words = [w for _ in texts for w in next(tagged)]
            if self.lowercase:
                words = [w.lower() for w in words]
            image_nouns.append(list(dict.fromkeys(words)))
        candidates = list(dict.fromkeys(w for words in image_nouns for w in words))
        n_candidates = len(candidates)
        if self.retag_alone and candidates:
            alone = tagger.alone_nouns(candidates)
            candidates = [w for w, ok in zip(candidates, alone, strict=True) if ok]
        stop = {w.lower() if self.lowercase else w for w in self.stop_nouns}
        candidates = [w for w in candidates if w not in stop]

        first = {w: i for i, w in enumerate(candidates)}
        count: Counter[str] = Counter(w for words in image_nouns for w in words if w in first)
        denominator = len(per_image) if self.fraction_of == "images" else len(candidates)
        frequent = [w for w in candidates if count[w] >= self.min_images]
        long_enough = [w for w in frequent if len(w) >= self.min_length]
        kept = [w for w in long_enough if count[w] / denominator < self.max_fraction]
        if not kept:
            raise ValueError(
                self._none_kept(
                    len(per_image),
                    n_candidates,
                    len(candidates),
                    len(frequent),
                    len(long_enough),
                    denominator,
                    max(count.values(), default=0),
                )
            )

        def by_count(w: str) -> tuple[int, Any]:
            return (-count[w], first[w] if self.order == "first" else w)

        if self.max_concepts is not None and len(kept) > self.max_concepts:
            kept = sorted(kept, key=by_count)[: self.max_concepts]
        names = sorted(kept, key=first.__getitem__ if self.order == "first" else by_count)
        index = {w: k for k, w in enumerate(names)}
        rows = [[index[w] for w in words if w in index] for words in image_nouns]
        concepts = Concepts(names, _multi_hot(rows, len(names)), [count[w] for w in names])
        self._report(
            concepts, f"{len(names)} kept of {n_candidates} candidates (tagger: {tagger.name})"
        )
        return concepts

    def _none_kept(
        self,
        n_images: int,
        n_candidates: int,
        n_filtered: int,
        n_frequent: int,
        n_long: int,
        denominator: int,
        top_count: int,
    ) -> str:
        """The zero-concept error: the counts after each rule and the option to change."""
        head = (
            f"no concept kept from {n_images} images: {n_candidates} candidate nouns, "
            f"{n_filtered} left after the stop nouns{' and the re-tag' if self.retag_alone else ''}"
        )
        if n_filtered == 0:
            return f"{head}; use other stop_nouns or tagger, or caption more images"
        if n_frequent == 0:
            return (
                f"{head}, none in >= min_images={self.min_images} images (the most frequent "
                f"is in {top_count}); lower min_images"
            )
        if n_long == 0:
            return (
                f"{head}, {n_frequent} in >= min_images={self.min_images} images, none with >= "
                f"min_length={self.min_length} characters; lower min_length"
            )
        return (
            f"{head}, {n_long} frequent and long enough, none with count / {denominator} "
            f"({self.fraction_of}) < max_fraction={self.max_fraction}; raise max_fraction"
            + (" or use fraction_of='images'" if self.fraction_of == "vocabulary" else "")
        )

    def _from_vocabulary(self, per_image: list[list[str]], vocabulary: str) -> Concepts:
        """Labels by whole-word (phrase) match of the vocabulary file's concepts."""
        import spacy
        from spacy.matcher import PhraseMatcher

        names = load_concept_vocabulary(vocabulary, self.lowercase)
        nlp = spacy.blank("en")
        matcher = PhraseMatcher(nlp.vocab, attr="LOWER" if self.lowercase else "ORTH")
        for k, name in enumerate(names):
            matcher.add(str(k), [nlp.make_doc(name)])
        flat = [(i, text) for i, texts in enumerate(per_image) for text in texts]
        rows: list[set[int]] = [set() for _ in per_image]
        docs = nlp.pipe((text for _, text in flat), batch_size=256)
        for (i, _), doc in zip(flat, docs, strict=True):
            rows[i].update(int(nlp.vocab.strings[m]) for m, _, _ in matcher(doc))
        labels = _multi_hot([sorted(r) for r in rows], len(names))
        concepts = Concepts(names, labels, [int(c) for c in labels.sum(0).tolist()])
        counts = concepts.counts
        absent = sum(c == 0 for c in counts)
        if absent:
            log.warning(
                "%d of the %d concepts of %s occur in none of the %d images (their labels are "
                "all zero)",
                absent,
                len(names),
                vocabulary,
                len(per_image),
            )
        self._report(concepts, f"{len(names)} from {vocabulary}")
        return concepts

    @staticmethod
    def _report(concepts: Concepts, what: str) -> None:
        """Log and print one line: how many concepts, and the most frequent ones."""
        ranked = sorted(
            zip(concepts.names, concepts.counts, strict=True), key=lambda nc: (-nc[1], nc[0])
        )
        top = ", ".join(f"{n} ({c})" for n, c in ranked[:_TOP_SHOWN])
        line = f"concepts: {what}; top: {top}"
        log.info(line)
        print(line)


def _multi_hot(rows: Sequence[Sequence[int]], k: int) -> torch.Tensor:
    """``(len(rows), k)`` float32 with ones at each row's indices."""
    labels = torch.zeros(len(rows), k, dtype=torch.float32)
    pairs = [(i, j) for i, row in enumerate(rows) for j in row]
    if pairs:
        index = torch.tensor(pairs, dtype=torch.long)
        labels[index[:, 0], index[:, 1]] = 1.0
    return labels
