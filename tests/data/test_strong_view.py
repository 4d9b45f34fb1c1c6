"""SemiCLIP's data needs: the strong view of unpaired images (served only when the module
asks, repeatable per sample seed, live beside the image cache, from shards too), the
``TrainInfo`` listings, and the ordered pass over the unpaired images
(``unpaired_dataloader``)."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures import CLASSES, WORDS, _image, write_rsicd, write_shards

from sclip_lightning import SCLIPDataModule
from sclip_lightning.data import split_labeled
from sclip_lightning.data.augment import build_strong_transform
from sclip_lightning.data.datasets import UnpairedTrainSet
from sclip_lightning.data.images import load_image
from sclip_lightning.data.shards import ShardLoader, ShardStream
from sclip_lightning.interfaces import DataConsumer, UnpairedData


def _attach(dm: SCLIPDataModule, **says: bool) -> SCLIPDataModule:
    """Attach a stand-in module (only the DataConsumer properties in ``says``)."""
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(**says))  # type: ignore[assignment]
    return dm


def _synthetic(**kw) -> SCLIPDataModule:
    args = dict(num_workers=0, batch_size=4, unpaired_batch_size=6, label_ratio=0.1, order_seed=5)
    dm = SCLIPDataModule(**(args | kw))
    dm.setup("fit")
    return dm


def _first_unpaired(dm: SCLIPDataModule, skip: int = 0) -> dict:
    batches = iter(dm.train_dataloader())
    for _ in range(skip):
        next(batches)
    batch, *_ = next(batches)
    return batch["unpaired"]


def _mean_pass():
    """A stand-in frozen image tower for the cache: pixels -> their per-channel mean."""
    return contextlib.nullcontext(lambda pixels: pixels.mean((2, 3)))


@pytest.mark.parametrize("size", [224, 32])
def test_strong_transform_is_the_release_recipe_scaled_to_the_input(size, tmp_path):
    tf = build_strong_transform("sclip-tiny", size)
    steps = {type(t).__name__: t for t in tf.transforms}
    assert list(steps) == [
        "MaybeConvertMode", "Resize", "RandomCrop", "RandomHorizontalFlip", "RandAugment",
        "ToTensor", "Normalize", "RandomErasing",
    ]  # fmt: skip
    side = round(size * 16 / 224)
    assert steps["Resize"].size == round(size * 256 / 224)  # 256 at 224
    assert steps["RandomCrop"].padding == round(size * 28 / 224)  # 28 at 224
    assert steps["RandomCrop"].padding_mode == "reflect"
    assert (steps["RandAugment"].num_ops, steps["RandAugment"].magnitude) == (2, 10)
    erase = steps["RandomErasing"]
    assert erase.scale == ((side / size) ** 2,) * 2 and erase.ratio == (1.0, 1.0)
    assert (erase.p, erase.value) == (1.0, 0)
    _image(tmp_path / "a.png", 3, size=40)
    torch.manual_seed(0)
    out = tf(load_image(tmp_path / "a.png").convert("L"))  # any mode becomes the model's (RGB)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    assert int((out == 0).all(0).sum()) >= side * side  # the Cutout square, at the mean colour


def test_strong_view_only_when_the_module_asks(synthetic_root):
    dm = _synthetic()
    assert not dm.loads_strong_view()  # no trainer, no module
    assert "image_strong" not in _first_unpaired(dm)
    assert "image_strong" not in _first_unpaired(_attach(dm, uses_unpaired=True))
    no = _first_unpaired(_attach(dm, uses_unpaired=True, uses_strong_view=False))
    assert "image_strong" not in no
    assert isinstance(dm.trainer.lightning_module, DataConsumer)
    yes = _first_unpaired(_attach(dm, uses_unpaired=True, uses_strong_view=True))
    assert dm.loads_strong_view()
    assert yes["image_strong"].shape == yes["image"].shape == (6, 3, 32, 32)
    assert torch.equal(yes["image"], no["image"])  # the weak view is untouched
    assert torch.equal(yes["index"], no["index"])
    assert (yes["image_strong"] - yes["image"]).abs().amax((1, 2, 3)).min() > 0.1
    # each property is read on its own: a module without uses_strong_view still decides
    # whether unpaired images are loaded at all
    batch, *_ = next(iter(_attach(dm, uses_unpaired=False).train_dataloader()))
    assert "unpaired" not in batch


def test_strong_view_repeats_under_the_sample_seed_and_on_resume(synthetic_root):
    dm = _attach(_synthetic(), uses_unpaired=True, uses_strong_view=True)
    ds = dm.unpaired_train_set()
    assert isinstance(ds, UnpairedTrainSet)
    random.seed(1), np.random.seed(1)
    a = ds[(3, 123)]
    random.seed(2), np.random.seed(2)  # only torch's generator is drawn from
    b = ds[(3, 123)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_strong"], b["image_strong"])
    assert not torch.equal(a["image_strong"], ds[(3, 124)]["image_strong"])
    second = _first_unpaired(dm, skip=1)
    resumed = _attach(_synthetic(), uses_unpaired=True, uses_strong_view=True)
    resumed.load_state_dict({"train_position": {"epoch": 0, "consumed_batches": 1}})
    first = _first_unpaired(resumed)
    assert torch.equal(first["index"], second["index"])
    assert torch.equal(first["image_strong"], second["image_strong"])


def test_strong_view_is_live_pixels_beside_the_image_cache(synthetic_root):
    """Cached weak view (the frozen tower's output), strong view from the image file; with
    ``augment=False`` the strong view is the uncached run's, bit for bit."""
    says = dict(uses_unpaired=True, uses_strong_view=True)
    plain = _attach(_synthetic(augment=False), **says)
    cached = _attach(_synthetic(augment=False), **says)
    cached.use_tower_outputs(image_pass=_mean_pass)
    got, want = _first_unpaired(cached), _first_unpaired(plain)
    assert torch.equal(got["index"], want["index"])
    assert got["image"].shape == (6, 3)
    torch.testing.assert_close(got["image"], want["image"].mean((2, 3)))
    assert got["image_strong"].shape == (6, 3, 32, 32)
    assert torch.equal(got["image_strong"], want["image_strong"])


def test_strong_view_from_shards(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=2, per_shard=5)
    weak = build_strong_transform("sclip-tiny")  # any random transform as the weak one

    def epoch(strong):
        stream = ShardStream(pattern, weak, 5, seed=3, shuffle_buffer=3, strong=strong)
        return list(ShardLoader(stream, 2, lambda: (0, 0), num_workers=0))

    one, two = [epoch(build_strong_transform("sclip-tiny")) for _ in range(2)]
    plain = epoch(None)
    for a, b, c in zip(one, two, plain, strict=True):
        assert a["image_strong"].shape == (5, 3, 32, 32)
        assert torch.equal(a["image_strong"], b["image_strong"]) and a["key"] == c["key"]
        assert torch.equal(a["image"], c["image"]) and "image_strong" not in c


def _rsicd_dm(root: Path, **kw) -> SCLIPDataModule:
    args = dict(dataset="rsicd", root=str(root), label_ratio=0.25, split_seed=0, num_workers=0)
    return SCLIPDataModule(keywords="mine", num_keywords=4, eval_batch_size=4, **(args | kw))


def test_train_info_lists_the_pairs_captions_and_the_unpaired_images(tmp_path):
    root = write_rsicd(tmp_path / "rsicd")  # train images 0..23, class CLASSES[k % 4]
    paired, rest = split_labeled(24, 0.25, 0)
    info = _rsicd_dm(root).train_info()
    assert info.num_paired == len(paired) == 6
    assert info.paired_captions == [
        [f"many buildings near the {WORDS[CLASSES[k % 4]]} number {j}" for j in range(5)]
        for k in paired
    ]
    assert info.unpaired_index == rest
    assert info.unpaired_keys == [
        str(root / "RSICD_images" / f"{CLASSES[k % 4].lower()}_{k}.jpg") for k in rest
    ]
    folder = tmp_path / "unpaired"
    for k in (2, 0, 1):
        _image(folder / f"u{k}.png", k)
    info = _rsicd_dm(root, unpaired_dataset="image_folder", unpaired_root=str(folder)).train_info()
    assert info.unpaired_index == [0, 1, 2]
    assert info.unpaired_keys == [str(folder / f"u{k}.png") for k in range(3)]


def test_unpaired_dataloader_lists_every_unpaired_image_once_in_order(tmp_path):
    root = write_rsicd(tmp_path / "rsicd")
    dm = _rsicd_dm(root)
    assert isinstance(dm, UnpairedData)
    info = dm.train_info()
    batches = list(dm.unpaired_dataloader())
    assert [len(b["index"]) for b in batches] == [4, 4, 4, 4, 2]  # 18 images, last batch kept
    assert set(batches[0]) == {"image", "index"}
    assert torch.cat([b["index"] for b in batches]).tolist() == info.unpaired_index
    pixels = torch.cat([b["image"] for b in batches])
    want = torch.stack([dm.eval_transform(load_image(k)) for k in info.unpaired_keys])
    assert torch.equal(pixels, want)
    train = [torch.cat([b["image"] for b in dm.unpaired_dataloader(True)]) for _ in range(2)]
    assert torch.equal(train[0], train[1])  # each crop seeded by its position
    assert not torch.equal(train[0], pixels)


def test_unpaired_dataloader_with_the_image_cache_and_for_shards(tmp_path):
    root = write_rsicd(tmp_path / "rsicd")
    dm = _rsicd_dm(root, augment=False)
    dm.use_tower_outputs(image_pass=_mean_pass)
    info = dm.train_info()
    for train_view in (False, True):  # the cache holds one view: train_view changes nothing
        batches = list(dm.unpaired_dataloader(train_view))
        assert torch.cat([b["index"] for b in batches]).tolist() == info.unpaired_index
        rows = torch.cat([b["image"] for b in batches])
        want = torch.stack(
            [dm.eval_transform(load_image(k)).mean((1, 2)) for k in info.unpaired_keys]
        )
        torch.testing.assert_close(rows, want)
    shards = write_shards(tmp_path / "s", shards=2, per_shard=6)
    streamed = SCLIPDataModule(dataset="webdataset", root=shards, label_ratio=0.5, num_workers=0)
    with pytest.raises(ValueError, match="shards have no fixed order"):
        streamed.unpaired_dataloader()
    assert streamed.train_info().unpaired_index == streamed.train_info().unpaired_keys == []
