"""WebDataset shards: shard lists, the key-based L = U split, a deterministic resumable
stream split across ranks and workers without overlap, corrupt members, and training."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fixtures import write_shards

from sclip_lightning.data.images import CorruptImageError
from sclip_lightning.data.shards import (
    ShardCaptioned,
    ShardLoader,
    ShardStream,
    expand_shards,
    is_paired,
)
from sclip_lightning.models import build_transforms

TRANSFORM = build_transforms("sclip-tiny", True)  # random crops: seeded per sample


def _keys(loader, position=None) -> list[list[str]]:
    if position is not None:
        loader.load_state_dict({"epoch": position[0], "consumed_batches": position[1]})
    return [batch["key"] for batch in loader]


def _loader(pattern, batches, position=(0, 0), workers=0, batch_size=5, **kw):
    stream = ShardStream(pattern, TRANSFORM, batch_size, seed=3, shuffle_buffer=7, **kw)
    return ShardLoader(stream, batches, lambda: position, num_workers=workers)


def test_shard_lists(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=3, per_shard=2)
    urls = expand_shards(pattern)
    assert [os.path.basename(u) for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(urls[::-1]) + "\n\n")
    assert expand_shards(str(listing)) == urls[::-1]
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*00006\.tar"):
        expand_shards(str(tmp_path / "s" / "{00006..00007}.tar"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no shards"):
        expand_shards(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="shard list file not found"):
        expand_shards(str(tmp_path / "nope.txt"))


def test_key_split_is_deterministic_and_materialised_once(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=4, per_shard=25)
    keys = [f"{s:05d}{i:04d}" for s in range(4) for i in range(25)]
    paired = [k for k in keys if is_paired(k, 0.2, seed=5)]
    assert 8 <= len(paired) <= 32 and paired == [k for k in keys if is_paired(k, 0.2, 5)]
    assert paired != [k for k in keys if is_paired(k, 0.2, 6)]  # another split seed
    ds = ShardCaptioned(pattern, label_ratio=0.2, split_seed=5, cache=tmp_path / "cache")
    assert ds.keys == paired and len(ds) == len(paired)
    assert ds.captions[0][0].startswith("an aerial view of")
    assert ds[0]["image"].size == (16, 16)
    index = next((tmp_path / "cache").rglob("index.json"))
    stamp = index.stat().st_mtime_ns
    again = ShardCaptioned(pattern, label_ratio=0.2, split_seed=5, cache=tmp_path / "cache")
    assert again.keys == paired and index.stat().st_mtime_ns == stamp  # read, not rewritten
    rest = ShardCaptioned(pattern, 0.2, 5, part="unpaired", cache=tmp_path / "cache")
    assert sorted(rest.keys + paired) == keys


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_a_function_of_seed_and_epoch_and_resumes_exactly(tmp_path, workers):
    pattern = write_shards(tmp_path / "s", shards=4, per_shard=10)
    first = _keys(_loader(pattern, 12, (0, 0), workers))  # 60 samples: 1.5 passes
    assert len(first) == 12 and all(len(b) == 5 for b in first)
    flat = [k for b in first for k in b]
    assert len(set(flat[:40])) == 40  # one pass: every sample once
    assert _keys(_loader(pattern, 12, (0, 0), workers)) == first
    assert _keys(_loader(pattern, 12, (1, 0), workers)) != first  # the next epoch
    resumed = _keys(_loader(pattern, 12, (0, 0), workers), position=(0, 7))
    assert resumed == first[7:]  # 7 batches consumed before the kill: the rest, exactly
    images = [b["image"] for b in _loader(pattern, 2, (0, 0), workers)]
    again = [b["image"] for b in _loader(pattern, 2, (0, 0), workers)]
    assert all(torch.equal(a, b) for a, b in zip(images, again, strict=True))  # augmentations


def test_stream_leaves_out_the_paired_keys(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=2, per_shard=20)
    excluded = set()

    def exclude(key):
        if is_paired(key, 0.3, 0):
            excluded.add(key)
            return True
        return False

    keys = [k for b in _keys(_loader(pattern, 4, exclude=exclude)) for k in b]
    assert excluded and not excluded & set(keys)
    everything = _loader(pattern, 4, exclude=lambda key: True)
    with pytest.raises(ValueError, match="no unpaired sample"):
        _keys(everything)


def test_corrupt_members_raise_naming_shard_and_key_or_are_skipped(tmp_path, caplog):
    pattern = write_shards(tmp_path / "s", shards=2, per_shard=6, corrupt=(3,))
    with pytest.raises(CorruptImageError, match=r"00000\.tar key '000000003'.*skip_corrupt"):
        _keys(_loader(pattern, 2, batch_size=6))
    loader = _loader(pattern, 2, batch_size=5, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in _keys(loader) for k in b]
    assert "000000003" not in keys and len(keys) == 10
    assert "skip_corrupt: skipped unreadable image" in caplog.text and "000000003" in caplog.text
    resumed = [k for b in _keys(_loader(pattern, 2, batch_size=5, skip_corrupt=True), (0, 1))
               for k in b]  # fmt: skip
    assert resumed == keys[5:]  # the skip of the corrupt image is replayed on resume


def test_too_few_shards_for_the_workers_is_a_clear_error(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=1, per_shard=4)
    with pytest.raises(Exception, match="1 shard.*cannot be split across 1 rank.*2 worker"):
        _keys(_loader(pattern, 1, workers=2, batch_size=2))


def _ranks_worker(rank, world, init, pattern, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    keys = _keys(_loader(pattern, 4, (0, 0), workers=2))  # 20 samples per rank: one pass
    torch.save(keys, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.ddp
def test_shards_split_across_two_ranks_and_two_workers_without_overlap(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=8, per_shard=5)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "keys")
        mp.spawn(_ranks_worker, args=(2, os.path.join(tmp, "init"), pattern, out), nprocs=2)
        per_rank = [
            [k for b in torch.load(f"{out}.{r}", weights_only=True) for k in b] for r in range(2)
        ]
    assert all(len(keys) == len(set(keys)) == 20 for keys in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    shards_of = [{k[:5] for k in keys} for keys in per_rank]
    assert not shards_of[0] & shards_of[1] and len(shards_of[0] | shards_of[1]) == 8


def test_fit_and_test_on_shards_paired_split_by_key_and_unpaired_streamed(tmp_path):
    """``dataset: webdataset``: the pairs are the keys of the L = U split, the unpaired
    images stream from the other keys of the same shards; training sees both, and a shard set
    given as a retrieval entry is evaluated. Nothing in the unpaired batches is a pair."""
    import lightning as L
    from helpers import quiet_cpu_trainer

    from sclip_lightning import SCLIPDataModule, SCLIPModule

    train = write_shards(tmp_path / "train", shards=4, per_shard=12)
    val = write_shards(tmp_path / "val", shards=1, per_shard=9)
    dm = SCLIPDataModule(
        dataset="webdataset", root=train, label_ratio=0.25, split_seed=1,
        batch_size=4, unpaired_batch_size=4, eval_batch_size=8, num_workers=0,
        model_name="sclip-tiny", keywords="mine", num_keywords=8, shuffle_buffer=5,
        retrieval=[f"webdataset={val}"], zeroshot=[],
    )  # fmt: skip
    seen: dict[str, set[str]] = {"paired": set(), "unpaired": set()}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["unpaired"].update(batch["unpaired"]["key"])

    model = SCLIPModule(model_name="sclip-tiny", lr=1e-3, results_dir=str(tmp_path / "res"))
    trainer = quiet_cpu_trainer(max_epochs=2, callbacks=[Record()], log_every_n_steps=1)
    trainer.fit(model, dm)
    pairs = set(dm.train_base.keys)
    assert 4 <= len(pairs) <= 24 and all(is_paired(k, 0.25, 1) for k in pairs)
    assert seen["unpaired"] and not seen["unpaired"] & pairs
    assert trainer.global_step == 2 * (len(pairs) // 4)  # epochs of the paired loader (drop_last)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    trainer.test(model, dm)
    (row,) = model.test_results
    assert (row["dataset"], row["task"]) == ("webdataset", "retrieval")
    assert 0 <= row["mean_R"] <= 100
