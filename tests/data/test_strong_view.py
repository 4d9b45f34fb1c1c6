"""SemiCLIP's data needs: the strong view of unpaired images (served only when the module
asks, repeatable per sample seed, live beside the image cache, from shards too)."""

from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures import _image, write_shards

from sclip_lightning import SCLIPDataModule
from sclip_lightning.data.augment import build_strong_transform
from sclip_lightning.data.datasets import UnpairedTrainSet
from sclip_lightning.data.images import load_image
from sclip_lightning.data.shards import ShardLoader, ShardStream
from sclip_lightning.interfaces import DataConsumer


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
