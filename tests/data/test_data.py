"""Data: label-ratio split, generic loaders, keywords, the DataModule's batches."""

from __future__ import annotations

import pytest
import torch
from fixtures import write_caption_table, write_class_folder, write_rsicd

from sclip_lightning.data import (
    RSICD,
    CaptionTable,
    ClassFolder,
    CorruptImageError,
    ImageFolderUnpaired,
    KeywordMatcher,
    RSICDClasses,
    SCLIPDataModule,
    clean_class_name,
    load_keywords,
    mine_keywords,
    split_labeled,
)


@pytest.mark.parametrize("n,ratio", [(100, 0.1), (7207, 0.1), (33, 0.5), (10, 1.0)])
def test_split_is_disjoint_sized_and_seeded(n, ratio):
    paired, rest = split_labeled(n, ratio, seed=3)
    assert len(paired) == int(n * ratio) and len(rest) == n - len(paired)
    assert not set(paired) & set(rest) and set(paired) | set(rest) == set(range(n))
    assert split_labeled(n, ratio, seed=3) == (paired, rest)
    if len(rest) > 0:
        assert split_labeled(n, ratio, seed=4)[0] != paired


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_split_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="label_ratio"):
        split_labeled(10, ratio, 0)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("DenseResidential", "dense residential"),
        ("dense_residential", "dense residential"),
        ("baseballField", "baseball field"),
        ("storage-tanks", "storage tanks"),
    ],
)
def test_clean_class_name(raw, expected):
    assert clean_class_name(raw) == expected
    assert clean_class_name("aGrass", drop_letter_prefix=True) == "grass"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_caption_table_groups_captions(tmp_path, fmt):
    path = write_caption_table(tmp_path, n=10, fmt=fmt)
    ds = CaptionTable(path, split="train")
    assert len(ds) == 6
    item = ds[0]
    assert len(item["captions"]) == 2 and item["image"].mode == "RGB"
    assert len(CaptionTable(path)) == 10


def test_caption_table_errors_name_the_problem(tmp_path):
    path = write_caption_table(tmp_path, n=4)
    with pytest.raises(KeyError, match="caption_column"):
        CaptionTable(path, caption_column="text")
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\nimages/0.png,\n")
    with pytest.raises(ValueError, match=r"line 2: empty caption .*images/0.png"):
        CaptionTable(bad)
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        CaptionTable(tmp_path / "missing.csv")


def test_corrupt_image_is_named_or_skipped(tmp_path):
    path = write_caption_table(tmp_path, n=4)
    (tmp_path / "images" / "1.png").write_bytes(b"not an image")
    ds = CaptionTable(path)
    with pytest.raises(CorruptImageError, match="1.png.*skip_corrupt"):
        ds[1]
    skipping = CaptionTable(path, skip_corrupt=True)
    item = skipping[1]
    assert item["path"].endswith("2.png") and skipping.skipped == {1}
    assert item["record"] == 2 and ds[3]["record"] == 3  # the record served
    from sclip_lightning.data.base import ConcatCaptioned

    both = ConcatCaptioned([CaptionTable(path), skipping])  # records of the whole set
    assert [both[i]["record"] for i in (0, 4, 5, -1)] == [0, 4, 6, 7]


def test_rsicd_and_classes(tmp_path):
    root = write_rsicd(tmp_path)
    assert [len(RSICD(root, s)) for s in ("train", "val", "test")] == [24, 8, 8]
    assert len(RSICD(root, "train")[0]["captions"]) == 5
    cls = RSICDClasses(root)
    assert cls.classes == ["airport", "beach", "dense residential", "forest"]
    assert len(cls) == 40 and len(RSICDClasses(root, split="test")) == 8
    with pytest.raises(FileNotFoundError, match="dataset_rsicd.json"):
        RSICD(tmp_path / "nowhere")


def test_class_folder_and_unpaired(tmp_path):
    root = write_class_folder(tmp_path / "c", classes=["aGrass", "bRiver"])
    ds = ClassFolder(root, drop_letter_prefix=True)
    assert ds.classes == ["grass", "river"] and len(ds) == 6 and ds[5]["label"] == 1
    assert len(ImageFolderUnpaired(root)) == 6
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderUnpaired(tmp_path / "c" / "aGrass" / "..", extensions=(".tif",))


def test_rsscn7_letter_prefixes_are_recognised_without_a_flag(tmp_path):
    rsscn7 = ["aGrass", "bField", "cIndustry", "dRiverLake", "eForest", "fResident", "gParking"]
    ds = ClassFolder(write_class_folder(tmp_path / "rsscn7", per_class=1, classes=rsscn7))
    assert ds.classes == [
        "grass",
        "field",
        "industry",
        "river lake",
        "forest",
        "resident",
        "parking",
    ]
    # ordinary class names, one of which happens to look like a prefix, are left alone
    other = ["airport", "denseResidential", "mResort"]
    ds = ClassFolder(write_class_folder(tmp_path / "other", per_class=1, classes=other))
    assert ds.classes == ["airport", "dense residential", "m resort"]
    forced = ClassFolder(tmp_path / "rsscn7", drop_letter_prefix=False)
    assert forced.classes[0] == "a grass"


def test_keyword_matcher_whole_words_and_phrases():
    m = KeywordMatcher(["parking", "baseball field", "lake"])
    assert m("Many cars in a PARKING lot").tolist() == [True, False, False]
    assert m("parkings and lakes").tolist() == [False, False, False]
    assert m("a baseball field near a lake.").tolist() == [False, True, True]
    assert KeywordMatcher([])("anything").shape == (0,)


def test_keyword_file_and_mining(tmp_path):
    f = tmp_path / "kw.txt"
    f.write_text("# comment\nforest\n\nForest\nbare land\n")
    assert load_keywords(f) == ["forest", "bare land"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty"):
        load_keywords(tmp_path / "empty.txt")
    caps = ["a green forest near a river", "the forest and the river", "green fields"] * 3
    words = mine_keywords(caps, top_k=4, bigram_min_count=2)
    assert words[:2] == ["forest", "green"] or words[:2] == ["forest", "river"]
    assert "the" not in words and "green forest" in mine_keywords(caps, 10, 2)


def test_datamodule_batches_and_split(synthetic_root):
    dm = SCLIPDataModule(num_workers=0, batch_size=8, unpaired_batch_size=6, label_ratio=0.1)
    dm.setup("fit")
    n = len(dm.train_base)
    assert len(dm.paired_indices) == int(0.1 * n)
    assert not set(dm.paired_indices) & set(dm.unpaired_indices)
    assert len(dm.paired_indices) + len(dm.unpaired_indices) == n
    loader = dm.train_dataloader()
    batch, *_ = next(iter(loader))
    assert batch["paired"]["image"].shape == (8, 3, 32, 32)
    assert batch["paired"]["text"].shape == (8, 32)
    assert batch["paired"]["keywords"].shape == (8, len(dm.keyword_list)) == (8, 10)
    assert batch["paired"]["keywords"].dtype == torch.bool
    assert batch["unpaired"]["image"].shape == (6, 3, 32, 32)
    assert set(batch["unpaired"]["index"].tolist()) <= set(dm.unpaired_indices)


def test_datamodule_guards(synthetic_root):
    with pytest.raises(ValueError, match="label_ratio"):
        SCLIPDataModule(label_ratio=0)
    with pytest.raises(ValueError, match="unknown data set"):
        SCLIPDataModule(dataset="nope")
    dm = SCLIPDataModule(num_workers=0, label_ratio=1.0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="unpaired set has 0 images"):
        dm.train_dataloader()


def test_split_matches_the_release_permutation():
    # the release: indices = torch.randperm(n, generator=manual_seed(seed)); first int(n*r)
    n, r, seed = 7207, 0.1, 42
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    paired, _ = split_labeled(n, r, seed)
    assert paired == sorted(perm[:720].tolist())


def test_keyword_matcher_release_mode():
    m = KeywordMatcher(["forest", "bare land"], mode="release")
    assert m("a forest next to bare land").tolist() == [True, True]
    assert m("a dense forest.").tolist() == [False, False]  # punctuation: the release misses it
    assert m("Forest here").tolist() == [False, False]  # case-sensitive
    assert KeywordMatcher(["forest"])("a dense forest.").tolist() == [True]
    with pytest.raises(
        ValueError, match=r"keyword_matching must be one of \['tokens', 'release'\]"
    ):
        KeywordMatcher(["x"], mode="regex")  # type: ignore[arg-type]


def test_long_captions_are_truncated_not_errors(tmp_path):
    from fixtures import _image

    _image(tmp_path / "a.png", 1)
    long = "a very long caption about a lake " * 80
    (tmp_path / "t.csv").write_text(f"image,caption\na.png,{long}\n")
    from sclip_lightning.data.datamodule import PairedTrainSet
    from sclip_lightning.models import build_tokenizer, build_transforms

    ds = CaptionTable(tmp_path / "t.csv")
    tok = build_tokenizer("sclip-tiny")
    item = PairedTrainSet(
        ds, [0], build_transforms("sclip-tiny", True), tok, KeywordMatcher(["lake"])
    )[0]
    assert item["text"].shape == (32,) and item["keywords"].tolist() == [True]


def test_noun_chunk_mining_needs_a_pipeline():
    import spacy.util

    if spacy.util.is_package("en_core_web_sm"):
        words = mine_keywords(["a green forest near the river"] * 3, top_k=5, use_noun_chunks=True)
        assert "green forest" in words
    else:
        with pytest.raises(OSError, match="not installed.*use_noun_chunks=False"):
            mine_keywords(["a green forest"], use_noun_chunks=True)


def test_empty_unpaired_folder_and_missing_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="unpaired image folder not found"):
        ImageFolderUnpaired(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderUnpaired(tmp_path / "empty")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ClassFolder(tmp_path / "empty")


def test_epoch_follows_the_paired_loader_by_default(synthetic_root):
    dm = SCLIPDataModule(num_workers=0, batch_size=10, unpaired_batch_size=10)
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)
    assert len(loader) == len(dm.paired_indices) // 10  # as the release
    cyc = SCLIPDataModule(
        num_workers=0, batch_size=10, unpaired_batch_size=10, combined_mode="max_size_cycle"
    )
    cyc.setup("fit")
    loader = cyc.train_dataloader()
    iter(loader)
    assert len(loader) == len(cyc.unpaired_indices) // 10


# ----------------------------------------------------------------------- YAKE keywords
TANKS = [
    "Many storage tanks are near a river.",
    "storage tanks and a road",
    "white storage tanks beside trees",
    "a few storage tanks next to a road",
    "the port has storage tanks",
    "a quiet river",
    "",
]


def test_yake_keywords_top_count_and_determinism(tmp_path, capsys):
    from sclip_lightning.data.keywords import mine_keywords_yake, resolve_keywords

    words = mine_keywords_yake(TANKS, top_k=4)
    assert words[0] == "storage tanks" and len(words) == 4 and "river" in words
    assert mine_keywords_yake(TANKS, top_k=4) == words  # deterministic
    assert mine_keywords_yake(TANKS, top_k=2) == words[:2]  # the count is respected
    assert mine_keywords_yake(TANKS, top_k=3, max_ngram=1)[:2] == ["storage", "tanks"]
    assert all(w == w.lower() and " a " not in f" {w} " for w in words)  # no stop word ends
    assert resolve_keywords("yake", None, tmp_path, TANKS, 3) == words[:3]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        "keywords: 4 mined by YAKE (n <= 2) from 6 captions; top (score, lower is better): "
        "storage tanks ("
    )


def test_yake_keywords_need_captions_and_valid_options():
    from sclip_lightning.data.keywords import mine_keywords_yake

    with pytest.raises(ValueError, match="no caption to mine keywords from"):
        mine_keywords_yake(["", "  "])
    with pytest.raises(ValueError, match="YAKE found no keyword in 2 captions"):
        mine_keywords_yake(["the of and", "a an"])
    for kw, match in [({"top_k": 0}, "top_k"), ({"max_ngram": 0}, "max_ngram")]:
        with pytest.raises(ValueError, match=f"{match} must be >= 1"):
            mine_keywords_yake(TANKS, **kw)


def test_frequency_mining_prints_its_count_and_top_keywords(capsys):
    mine_keywords(["a green forest", "the forest"], top_k=2, bigram_min_count=1)
    assert capsys.readouterr().out == (
        "keywords: 2 mined by frequency from 2 captions; top (count): forest (2), green (1)\n"
    )
