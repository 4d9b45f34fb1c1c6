"""SemiCLIP's concept vocabulary: the mining rules on hand-built captions, the release parity,
the taggers (spaCy pipeline, frequency fallback, injected), vocabulary files and errors."""

from __future__ import annotations

import random
import re

import pytest
import spacy.util
import torch
from semiclip_reference import OOD_NOUNS, concept_multi_hot, mine_concepts

from sclip_lightning.concepts import (
    RELEASE_GENERIC_NOUNS,
    ConceptMiner,
    Concepts,
    PosTagFunctions,
    build_noun_tagger,
)
from sclip_lightning.losses.component import Component, build_component

HAS_SM = spacy.util.is_package("en_core_web_sm")


def frequency(**kw) -> ConceptMiner:
    """The tagger-free miner with the frequency cap off unless asked."""
    return ConceptMiner(**{"tagger": "frequency", "max_fraction": 2.0, **kw})


def test_release_generic_nouns_are_the_release_list_verbatim():
    assert RELEASE_GENERIC_NOUNS == OOD_NOUNS and len(RELEASE_GENERIC_NOUNS) == 75
    assert {"differnet", "palyground", "Lots", "lots", "]"} <= set(RELEASE_GENERIC_NOUNS)


def test_min_images_min_length_order_and_labels(capsys):
    caps = [["a river and a bridge ."]] * 3 + [["an ox and the lake"]] * 2 + [["a forest"], []]
    got = frequency(min_images=2).mine(caps)
    assert isinstance(got, Concepts)
    # "ox": 2 letters < min_length 3; "forest": 1 image < min_images 2; ties alphabetical
    assert got.names == ["bridge", "river", "lake"] and got.counts == [3, 3, 2]
    assert got.labels.dtype == torch.float32 and got.labels.shape == (7, 3)
    assert got.labels.tolist() == [[1, 1, 0]] * 3 + [[0, 0, 1]] * 2 + [[0, 0, 0]] * 2
    assert frequency(min_images=2, min_length=2).mine(caps).names == [
        "bridge",
        "river",
        "lake",
        "ox",
    ]
    assert frequency(min_images=1).mine(caps).names[-1] == "forest"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "concepts: 3 kept of 5 candidates (tagger: frequency); top: bridge (3), river (3), lake (2)"
    )


def test_counts_are_images_not_mentions_and_all_captions_count():
    # "river" three times in image 0 (two captions) counts once; image 1's second caption counts
    caps = [["river river", "a river"], ["a road", "a river"], ["a road"]]
    got = frequency(min_images=1).mine(caps)
    assert dict(zip(got.names, got.counts, strict=True)) == {"river": 2, "road": 2}
    assert got.labels.tolist() == [[1, 0], [1, 1], [0, 1]]


def _cap_captions() -> list[list[str]]:
    """10 images: river in 4, bridge and lake in 2; 17 words seen once make 20 candidates."""
    rare = "alder birch cedar dune elm fjord glade heath inlet jetty knoll levee mesa nook"
    rare += " oasis pier quay"
    words = rare.split()
    return [["river"]] * 4 + [["bridge lake"]] * 2 + [[w] for w in words[:3]] + [words[3:]]


def test_frequency_cap_by_images_or_by_vocabulary_size():
    caps = _cap_captions()
    assert len({w for c in caps for t in c for w in t.split()}) == 20
    # by images: river is in 4/10 = 0.4 >= 0.3 of the images, dropped
    by_images = frequency(min_images=2, max_fraction=0.3).mine(caps)
    assert by_images.names == ["bridge", "lake"]
    # by vocabulary (the release): 4 / 20 candidates = 0.2 < 0.3, kept
    by_vocab = frequency(min_images=2, max_fraction=0.3, fraction_of="vocabulary").mine(caps)
    assert by_vocab.names == ["river", "bridge", "lake"] and by_vocab.counts == [4, 2, 2]
    # with few candidates the vocabulary cap drops everything the image cap keeps
    few = [["river"]] * 2 + [["lake"]] * 2 + [["road"]] * 6
    assert frequency(min_images=2, max_fraction=0.3).mine(few).names == ["lake", "river"]
    with pytest.raises(ValueError, match=r"count / 3 \(vocabulary\).*raise max_fraction"):
        frequency(min_images=2, max_fraction=0.3, fraction_of="vocabulary").mine(few)


def test_lowercase_or_case_kept():
    caps = [["a Bridge"]] * 2 + [["a bridge"]] * 2
    assert frequency(min_images=2).mine(caps).names == ["bridge"]
    assert frequency(min_images=3).mine(caps).counts == [4]
    kept = frequency(min_images=2, lowercase=False).mine(caps)
    assert (
        kept.names == ["Bridge", "bridge"] and kept.labels.tolist() == [[1, 0]] * 2 + [[0, 1]] * 2
    )


def test_stop_nouns_default_custom_and_case():
    caps = [["view of lots and Lots of cars"]] * 3 + [["a View"]] * 3
    assert frequency(min_images=3).mine(caps).names == ["cars"]  # view / lots: generic
    exact = frequency(min_images=3, lowercase=False).mine(caps)
    assert exact.names == ["View", "cars"]  # "View" is not in the case-sensitive list
    custom = frequency(min_images=3, stop_nouns=["cars"]).mine(caps)
    assert custom.names == ["view", "lots"] and custom.counts == [6, 3]
    assert frequency(min_images=3, stop_nouns=[]).mine(caps).names == ["view", "cars", "lots"]


def test_max_concepts_keeps_the_most_frequent_in_each_order():
    caps = [["road"]] * 2 + [["tree lake"]] * 3 + [["road"]] * 2 + [["lake"]] * 2
    assert frequency(min_images=1).mine(caps).names == ["lake", "road", "tree"]
    assert frequency(min_images=1, max_concepts=2).mine(caps).names == ["lake", "road"]
    first = frequency(min_images=1, max_concepts=2, order="first").mine(caps)
    assert first.names == ["road", "lake"] and first.labels.shape == (9, 2)


def test_single_string_captions_count_as_one_caption():
    got = frequency(min_images=2).mine(["a green shirt", "a red shirt", "green"])
    assert got.names == ["green", "shirt"] and got.labels.tolist() == [[1, 1], [0, 1], [1, 0]]


def test_vocabulary_file_labels_by_whole_words_and_phrases(tmp_path, capsys):
    vocab = tmp_path / "concepts.txt"
    vocab.write_text("# remote sensing\nriver\n\nBaseball Field\nRIVER\npond\n")
    caps = [
        ["A baseball field.", "trees"],
        ["rivers and ponds"],  # plural: no whole-word match
        ["the River, a pond"],
        [],
    ]
    got = ConceptMiner(vocabulary=str(vocab)).mine(caps)
    assert got.names == ["river", "Baseball Field", "pond"]
    assert got.labels.tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0]]
    assert got.counts == [1, 1, 1]
    assert f"concepts: 3 from {vocab}; top: Baseball Field (1)" in capsys.readouterr().out
    exact = ConceptMiner(vocabulary=str(vocab), lowercase=False).mine(caps)
    assert exact.names == ["river", "Baseball Field", "RIVER", "pond"]
    assert exact.labels.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_vocabulary_file_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(
        FileNotFoundError, match=rf"{re.escape(str(missing))}.*one concept per line.*None"
    ):
        ConceptMiner(vocabulary=str(missing)).mine([["a river"]])
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))} holds no concept"):
        ConceptMiner(vocabulary=str(empty)).mine([["a river"]])


# ------------------------------------------------------------------- the release parity
# the toy NLTK of bench/semiclip_reference.py's self-check: "park" is a noun after "a" only
LEXICON = {
    "river": "NN", "rivers": "NNS", "bridge": "NN", "Bridge": "NNP", "lots": "NNS",
    "Lots": "NNS", "trees": "NNS", "green": "JJ", "many": "JJ", "near": "IN", "a": "DT",
    "is": "VBZ", "cars": "NNS", "ok": "NN", "park": "VB", "view": "NN", "View": "NNP",
}  # fmt: skip


def toy_tokenize(text: str) -> list[str]:
    return text.replace(".", " .").split()


def toy_tag(words: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, w in enumerate(words):
        tag = LEXICON.get(w, "NN" if w.startswith("w") else ".")
        if w == "park" and i > 0 and words[i - 1] == "a":
            tag = "NN"
        out.append((w, tag))
    return out


def released_toy(**kw) -> ConceptMiner:
    return ConceptMiner.released(**kw).use_tagger(PosTagFunctions(toy_tokenize, toy_tag, "toy"))


def _reference(caps, **kw):
    nouns, per_image = mine_concepts(caps, toy_tokenize, toy_tag, **kw)
    return nouns, concept_multi_hot(per_image, nouns)


def test_released_matches_the_reference_on_its_self_check_captions(capsys):
    caps = (
        [["a river near a Bridge .", "many trees near a park ."]] * 6
        + [["lots of cars ok .", "a bridge ."]] * 5
        + [["green river ."]]
        + [[f"a w{i} ."] for i in range(60)]
    )
    names, labels = _reference(caps)
    assert names == ["river", "Bridge", "trees", "cars", "bridge"]  # the reference's own check
    got = released_toy().mine(caps)
    assert got.names == names and torch.equal(got.labels, labels)
    assert got.counts == [7, 6, 6, 5, 5]
    assert "(tagger: toy)" in capsys.readouterr().out
    # the same captions without the 60 rare nouns: the release's cap empties the vocabulary
    with pytest.raises(ValueError, match="raise max_fraction or use fraction_of='images'"):
        released_toy().mine(caps[:12])
    assert _reference(caps[:12])[0] == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_released_matches_the_reference_on_random_captions(seed):
    rng = random.Random(seed)
    words = [*LEXICON, *(f"w{i}" for i in range(40)), "Lots", "lots", "View", "wx"]
    caps = [
        [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) + " ." for _ in range(3)]
        for _ in range(rng.randint(40, 80))
    ]
    names, labels = _reference(caps, cmin=3)
    got = released_toy(min_images=3).mine(caps)
    assert names and got.names == names and torch.equal(got.labels, labels)


def test_released_rules_and_config_round_trip():
    m = ConceptMiner.released(min_images=2)
    assert (m.fraction_of, m.lowercase, m.order, m.retag_alone) == (
        "vocabulary", False, "first", True,
    )  # fmt: skip
    assert (m.min_images, m.min_length, m.max_fraction) == (2, 3, 0.3)
    assert m.stop_nouns == list(RELEASE_GENERIC_NOUNS)
    cfg = m.config()
    assert cfg["class_path"] == "sclip_lightning.concepts.ConceptMiner"
    assert cfg["init_args"]["fraction_of"] == "vocabulary"
    assert build_component(cfg, Component).init_args == m.init_args


# ------------------------------------------------------------------------------ taggers
@pytest.mark.skipif(HAS_SM, reason="en_core_web_sm is installed: no fallback to test")
def test_auto_falls_back_to_frequency_and_says_so(capsys):
    got = ConceptMiner(min_images=1, max_fraction=2.0).mine([["a green river"]])
    assert got.names == ["green", "river"]
    out = capsys.readouterr().out
    assert "(tagger: frequency; spaCy pipeline en_core_web_sm not installed)" in out
    with pytest.raises(OSError, match="'en_core_web_sm' is not installed.*tagger='frequency'"):
        ConceptMiner(tagger="spacy").mine([["a green river"]])


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    """A spaCy pipeline folder with a tagger (one label) and an attribute ruler that makes
    river / bridge / trees nouns, and "park" a noun after "a" only."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("tagger").add_label("XX")
    ruler = nlp.add_pipe("attribute_ruler")
    nlp.initialize()  # before the patterns: initialising the ruler clears them
    for w in ("river", "bridge", "trees"):
        ruler.add([[{"LOWER": w}]], {"POS": "NOUN"})
    ruler.add([[{"LOWER": "a"}, {"LOWER": "park"}]], {"TAG": "NN"}, index=1)
    path = tmp_path_factory.mktemp("pipelines") / "toy_tagger"
    nlp.to_disk(path)
    no_tagger = spacy.blank("en")
    no_tagger.add_pipe("sentencizer")
    no_tagger.to_disk(path.parent / "no_tagger")
    return path


def test_spacy_tagger_keeps_nouns_and_retags_alone(toy_pipeline, capsys):
    caps = [["a river near a park", "the Bridge"]] * 2 + [["trees and a park"]]
    got = ConceptMiner(
        tagger="spacy", spacy_pipeline=str(toy_pipeline), min_images=1, max_fraction=2
    )
    got = got.mine(caps)
    assert got.names == ["park", "bridge", "river", "trees"]  # "near", "the", "and": no tag
    assert f"(tagger: spacy {toy_pipeline})" in capsys.readouterr().out
    alone = ConceptMiner(
        tagger="auto",
        spacy_pipeline=str(toy_pipeline),
        min_images=1,
        max_fraction=2,
        retag_alone=True,
    ).mine(caps)
    assert alone.names == ["bridge", "river", "trees"]  # "park" alone is not a noun


def test_spacy_pipeline_without_a_tagger_is_an_error_or_a_fallback(toy_pipeline, capsys):
    bare = str(toy_pipeline.parent / "no_tagger")
    with pytest.raises(ValueError, match=r"no_tagger' has no tagger or morphologizer"):
        build_noun_tagger("spacy", bare)
    assert build_noun_tagger("auto", bare).name == f"frequency; spaCy pipeline {bare} has no tagger"


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tagger": "nltk"}, r"tagger must be one of \['auto', 'spacy', 'frequency'\]"),
        ({"fraction_of": "captions"}, r"fraction_of must be one of \['images', 'vocabulary'\]"),
        ({"order": "alpha"}, r"order must be one of \['frequency', 'first'\]"),
        ({"min_images": 0}, r"min_images must be an integer >= 1, got 0"),
        ({"min_length": 1.5}, r"min_length must be an integer >= 1"),
        ({"max_concepts": 0}, r"max_concepts must be an integer >= 1"),
        ({"max_fraction": 0}, r"max_fraction must be a number > 0, got 0"),
        ({"stop_nouns": "lot"}, r"stop_nouns must be a list of words or None"),
        ({"lowercase": "yes"}, r"lowercase must be True or False"),
        ({"vocabulary": ""}, r"vocabulary must be a file path"),
        ({"spacy_pipeline": ""}, r"spacy_pipeline must be a pipeline name"),
    ],
)
def test_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        ConceptMiner(**kw)


def test_no_concept_kept_names_the_counts_and_the_option():
    caps = [["a river"], ["a river"], ["an ox"], ["an ox"]]
    with pytest.raises(ValueError, match=r"no images"):
        frequency().mine([])
    with pytest.raises(ValueError, match=r"none in >= min_images=3 images .*is in 2\); lower min_"):
        frequency(min_images=3).mine(caps)
    with pytest.raises(ValueError, match=r"none with >= min_length=6 characters; lower min_length"):
        frequency(min_images=2, min_length=6).mine(caps)
    with pytest.raises(ValueError, match=r"count / 4 \(images\) < max_fraction=0.5; raise max_f"):
        frequency(min_images=2, max_fraction=0.5).mine(caps)
    with pytest.raises(ValueError, match=r"0 left after the stop nouns; use other stop_nouns"):
        frequency(stop_nouns=["river", "ox"]).mine(caps)


# ------------------------------------------------------- bench/mine_vocabularies.py
def test_vocabulary_bench_runs_on_an_rsicd_layout_and_needs_its_data(tmp_path, capsys):
    import mine_vocabularies  # bench/mine_vocabularies.py (conftest puts bench/ on sys.path)
    from fixtures import write_rsicd

    with pytest.raises(SystemExit, match="not found at .*dataset_rsicd.json"):
        mine_vocabularies.main(["--root", str(tmp_path / "absent")])
    root = write_rsicd(tmp_path / "rsicd")
    argv = ["--root", str(root), "--label-ratio", "1", "--num-keywords", "5", "--markdown"]
    rows = mine_vocabularies.main(argv)
    assert [r.size for r in rows] == [5, 0, 5, 5]
    assert "fraction_of='images'" in rows[1].error  # 24 images, 7 candidates: Q1 empties it
    out = capsys.readouterr().out
    assert out.startswith("rsicd: 24 paired images") and "| `ConceptMiner()` |" in out


@pytest.mark.realdata
def test_vocabulary_bench_on_rsicd_mini(rsicd_mini, capsys):
    import mine_vocabularies

    rows = mine_vocabularies.main(["--root", str(rsicd_mini)])
    assert all(r.size > 0 and not r.error for r in rows)
    assert "720 paired images" in capsys.readouterr().out
