"""Every paper data set read from a tiny fixture in its native on-disk layout."""

from __future__ import annotations

import pytest
import torch
from fixtures import (
    write_fashion200k,
    write_fashiongen,
    write_karpathy,
    write_polyvore,
    write_rsicd,
    write_scicap,
)

from sclip_lightning.data import (
    RSICD,
    Fashion200k,
    Fashion200kClasses,
    FashionGen,
    FashionGenClasses,
    Polyvore,
    PolyvoreClasses,
    RSICDClasses,
    SciCap,
    SydneyCaptions,
    UCMCaptions,
)


@pytest.mark.parametrize("cls", [UCMCaptions, SydneyCaptions])
def test_karpathy_style(tmp_path, cls):
    root = write_karpathy(tmp_path)
    assert [len(cls(root, s)) for s in ("train", "val", "test")] == [6, 2, 2]
    item = cls(root, "val")[0]
    assert len(item["captions"]) == 5 and item["image"].size == (24, 24)


def test_fashion200k_items_and_classes(tmp_path):
    root = write_fashion200k(tmp_path)
    ds = Fashion200k(root, "train")
    assert len(ds) == 10 and ds.missing == 5
    item = ds[0]
    assert item["captions"] == ["red cotton dress"]
    assert {p.name for p in ds.item_images[0]} == {"dresstrain0_0.jpeg", "dresstrain0_1.jpeg"}
    with pytest.raises(FileNotFoundError, match="image not found"):
        Fashion200k(root, "train", strict=True)
    cls = Fashion200kClasses(root, "test")
    assert cls.classes == ["dresss", "jackets", "pantss", "skirts", "tops"]
    assert len(cls) == 20
    sub = Fashion200kClasses(root, "test", level="subcategory")
    assert "casual dresss" in sub.classes


def test_fashiongen_products_and_categories(tmp_path):
    root = write_fashiongen(tmp_path)
    ds = FashionGen(root, "train")
    assert len(ds) == 3
    item = ds[1]
    assert item["captions"] == ["Shirt 1. Soft café cotton."] and item["image"].size == (16, 16)
    cls = FashionGenClasses(root, "val")
    assert cls.classes == ["jeans", "tops"] and len(cls) == 6 and cls[0]["label"] == 1
    assert FashionGenClasses(root, "val", level="subcategory").classes == ["shirts", "slim"]


def test_polyvore(tmp_path):
    root = write_polyvore(tmp_path)
    ds = Polyvore(root, "train")
    assert len(ds) == 4 and ds[0]["captions"] == ["tops item.nice"]
    cls = PolyvoreClasses(root, "test")
    assert cls.classes == ["shoes", "tops"] and [cls[i]["label"] for i in range(2)] == [1, 0]


def test_scicap_skips_subfigures(tmp_path):
    root = write_scicap(tmp_path)
    ds = SciCap(root, "train")
    assert len(ds) == 3
    assert len(SciCap(root, "train", max_chars=77)[0]["captions"][0]) == 77


def test_rsicd_mini_real_data_marker_free_counts(tmp_path):
    root = write_rsicd(tmp_path)
    assert len(RSICD(root, None)) == 40


@pytest.mark.realdata
def test_rsicd_mini(rsicd_mini):
    sizes = [len(RSICD(rsicd_mini, s)) for s in ("train", "val", "test")]
    assert sizes == [7207, 1766, 1027]
    ds = RSICD(rsicd_mini, "test")
    assert all(len(c) == 5 for c in ds.captions)
    cls = RSICDClasses(rsicd_mini)
    assert len(cls.classes) == 30
    assert ds[0]["image"].size == (150, 150)


def test_combinations_rs_all_and_fashion_all(tmp_path):
    from sclip_lightning.data.registry import build_captioned

    write_rsicd(tmp_path / "rs" / "RSICD")
    write_karpathy(tmp_path / "rs" / "UCM_captions")
    write_karpathy(tmp_path / "rs" / "Sydney_captions")
    rs = build_captioned("rs_all", tmp_path / "rs", "train")
    assert len(rs) == 24 + 6 + 6 and len(rs.captions) == len(rs)
    assert rs[30]["captions"] == rs.captions[30]
    write_fashion200k(tmp_path / "f" / "fashion200k")
    write_fashiongen(tmp_path / "f" / "FashionGen")
    write_polyvore(tmp_path / "f" / "PolyvoreOutfits")
    fa = build_captioned("fashion_all", tmp_path / "f", "train")
    assert len(fa) == 10 + 3 + 4
    assert fa[12]["captions"][0].startswith("Shirt")


def test_random_product_photos_are_read_as_their_own_record(tmp_path):
    """Fashion200k and FashionGen draw one of a product's photos per visit: the photo's path
    is no record's path, yet the item names its record (the training and retrieval sets
    look up that record's caption keywords and cached outputs by it). Looking the record up
    by path once raised StopIteration inside the DataLoader, which silently ended every
    Fashion-ALL epoch and evaluation after no batch."""
    from sclip_lightning.data.datasets import PairedTrainSet, _captioned_image
    from sclip_lightning.data.keywords import KeywordMatcher
    from sclip_lightning.data.registry import build_captioned
    from sclip_lightning.data.tower_cache import TowerOutputs

    write_fashion200k(tmp_path / "fashion200k")
    write_fashiongen(tmp_path / "FashionGen")
    write_polyvore(tmp_path / "PolyvoreOutfits")
    fa = build_captioned("fashion_all", tmp_path, "train")
    paths = {str(p) for p in fa.paths}
    other_photos = 0
    for seed in range(4):
        torch.manual_seed(seed)
        for i in range(len(fa)):
            item, _, source = _captioned_image(fa, TowerOutputs(), lambda im: im, i)
            assert source == i
            other_photos += item["path"] not in paths
    assert other_photos > 0  # the fixture's products have photos besides the first
    assert [fa[i]["record"] for i in range(len(fa))] == list(range(len(fa)))
    pairs = PairedTrainSet(fa, range(len(fa)), lambda im: im, lambda c: c, KeywordMatcher([]))
    assert [pairs[(i, 7)]["index"] for i in range(len(fa))] == list(range(len(fa)))


@pytest.mark.parametrize("form", ["hf", "table"])
def test_simpsons_captions(tmp_path, form):
    from fixtures import write_simpsons

    from sclip_lightning.data import SimpsonsCaptions

    root = write_simpsons(tmp_path / "s", n=20, form=form)
    train, val = SimpsonsCaptions(root, "train"), SimpsonsCaptions(root, "val")
    assert (len(train), len(val)) == (18, 2)
    assert not {str(p) for p in train.paths} & {str(p) for p in val.paths}
    item = val[0]
    assert item["image"].mode == "RGB" and item["captions"][0].startswith("a cartoon of")


def test_remote_sensing_class_folder_sources(tmp_path):
    from fixtures import write_class_folder

    from sclip_lightning.data.registry import build_classes, build_unpaired, get_source

    write_class_folder(tmp_path / "UCMerced_LandUse" / "Images", 2, ["agricultural", "beach"])
    write_class_folder(tmp_path / "RSSCN7", 2, ["aGrass", "bRiver"])
    write_class_folder(tmp_path / "AID", 2, ["BareLand", "Park"])
    ucm = build_classes("ucm_cls", tmp_path / "UCMerced_LandUse", None)
    assert ucm.classes == ["agricultural", "beach"] and len(ucm) == 4
    assert len(build_unpaired("ucm_cls", tmp_path / "UCMerced_LandUse")) == 4
    assert build_classes("rsscn7", tmp_path / "RSSCN7", None).classes == ["grass", "river"]
    for name in ("aid", "whu_rs19", "resisc45"):
        assert build_classes(name, tmp_path / "AID", None).classes == ["bare land", "park"]
        assert get_source(name).templates == ["an aerial photograph of {}."]
