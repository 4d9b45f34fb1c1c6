"""WebDataset shards (the tar format img2dataset writes and open_clip trains from).

Unpaired images are *streamed* (:class:`ShardStream`): shards are split across ranks and
workers without overlap, read sequentially with the ``webdataset`` library's tar reader
(local paths, ``pipe:`` commands, URLs), shuffled within a buffer, and drawn alongside the
paired loader (an epoch of the paired loader stays the unit). The order is a function of
(seed, epoch, rank, worker), so a run resumed from a checkpoint continues on the same
samples. Paired captions are *materialised* (:class:`ShardCaptioned`): the few paired
samples are read once, their images copied under the cache folder, their captions kept, so
the paired side keeps random access, the resumable sampler and the tower-output cache.

A captioned shard set can be split into pairs and unpaired images (L = U) by ``label_ratio``
deterministically by key: a sample is paired when the SHA-1 of ``"<split_seed>:<key>"`` falls
in the first ``label_ratio`` of the hash range (:func:`is_paired`).

Why WebDataset and not Lightning's ``litdata``: litdata streams its own chunk format, so
users' existing img2dataset shards would have to be converted first; WebDataset reads them
as they are, from local disk or object storage (``pipe:aws s3 cp s3://... -``), and its tar
reader is what open_clip uses. What litdata adds (resumable streaming, DDP-aware sharding)
is done here on top of WebDataset's reader: a two-integer position (epoch, batches consumed)
and a deterministic shard schedule.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from sclip_lightning import distributed
from sclip_lightning.data.base import CaptionedDataset, Transform
from sclip_lightning.data.images import CorruptImageError, to_rgb
from sclip_lightning.data.sampling import mix_seed

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBERS = ("txt", "json")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns (``/data/{00000..00099}.tar``), files listing one
    URL or path a line (``.txt``, ``.list``, ``.shards``), or lists of both.

    Raises:
        ValueError: the list is empty.
        FileNotFoundError: a local shard (or list file) does not exist (named).
    """
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item).strip()
        if Path(item).suffix in (".txt", ".list", ".shards") and "://" not in item:
            listing = Path(item)
            if not listing.is_file():
                raise FileNotFoundError(f"shard list file not found: {listing}")
            lines = listing.read_text(encoding="utf-8").splitlines()
            urls += [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
        else:
            urls += list(braceexpand.braceexpand(item))
    if not urls:
        raise ValueError(f"no shards in {spec!r}: give a brace pattern, paths or a list file")
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise FileNotFoundError(
                f"shard not found: {url} (from {spec!r}); check the brace pattern or list"
            )
    return urls


def is_paired(key: str, label_ratio: float, seed: int) -> bool:
    """Whether sample ``key`` is in the paired part of an L = U split (deterministic)."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < label_ratio


def samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", "<ext>": bytes}``) of ``urls`` in order, read
    with webdataset's tar reader; members other than images and captions are not loaded."""
    from webdataset import tariterators as tar

    def wanted(name: str) -> bool:
        return name.rsplit(".", 1)[-1].lower() in IMAGE_MEMBERS + CAPTION_MEMBERS

    opened = tar.url_opener({"url": u} for u in urls)
    files = tar.tar_file_expander(opened, select_files=wanted)
    yield from tar.group_by_keys(files)


def image_of(sample: dict[str, Any]) -> bytes | None:
    """The sample's image member (``jpg``, ``jpeg``, ``png`` or ``webp``), or None."""
    for ext in IMAGE_MEMBERS:
        if ext in sample:
            return sample[ext]
    return None


def where(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__')} key {sample.get('__key__')!r}"


def decode(sample: dict[str, Any]) -> Image.Image:
    """The sample's image as RGB.

    Raises:
        CorruptImageError: no image member, or bytes that do not decode (names shard, key).
    """
    data = image_of(sample)
    if data is None:
        raise CorruptImageError(f"no image member ({', '.join(IMAGE_MEMBERS)}) in {where(sample)}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(
            f"cannot decode the image of {where(sample)}: {e}. Repair the shard, or pass "
            "skip_corrupt=True to skip unreadable images (they are counted and logged)."
        ) from e


def captions(sample: dict[str, Any], field: str = "caption") -> list[str]:
    """The sample's captions: the lines of ``.txt``, or ``.json``'s ``field`` (a string or a
    list of strings). Empty captions are errors naming the shard and the key."""
    found: list[str] = []
    if "txt" in sample:
        found += [line.strip() for line in sample["txt"].decode("utf-8").splitlines()]
    elif "json" in sample:
        value = json.loads(sample["json"]).get(field)
        found += [value] if isinstance(value, str) else list(value or [])
    found = [str(c).strip() for c in found]
    if not found or not all(found):
        raise ValueError(
            f"{where(sample)}: empty or missing caption (.txt, or .json field {field!r}); "
            "fill it or drop the sample"
        )
    return found


class ShardCaptioned(CaptionedDataset):
    """Captioned samples of WebDataset shards, materialised for random access.

    Every selected sample's image is copied once into ``cache/<digest>/`` (named by the
    shard list, the split and the seed: a second run reads the copies) and its captions are
    kept in memory. Use it for the paired part of a training set (few samples by
    definition) and for evaluation sets.

    Args:
        shards: brace pattern(s) or list file(s) (:func:`expand_shards`).
        label_ratio, split_seed, part: keep samples with ``is_paired(key, label_ratio,
            split_seed) == (part == "paired")``; ``label_ratio=None`` keeps all.
        caption_field: the ``.json`` field holding captions (a ``.txt`` member wins).
        cache: folder for the image copies (default ``$SCLIP_CACHE/shards``).
        transform, skip_corrupt: see :class:`~sclip_lightning.data.ImageRecords`.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        label_ratio: float | None = None,
        split_seed: int = 0,
        part: str = "paired",
        caption_field: str = "caption",
        cache: str | Path | None = None,
        transform: Transform = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(transform, skip_corrupt)
        from sclip_lightning.models import cache_dir

        self.urls = expand_shards(shards)
        tag = json.dumps([self.urls, label_ratio, split_seed, part, caption_field])
        folder = Path(cache or cache_dir() / "shards") / hashlib.sha1(tag.encode()).hexdigest()
        index = folder / "index.json"
        if not index.is_file():
            records: list[dict[str, Any]] = []
            folder.mkdir(parents=True, exist_ok=True)
            for sample in samples(self.urls):
                key = sample["__key__"]
                if label_ratio is not None and is_paired(key, label_ratio, split_seed) != (
                    part == "paired"
                ):
                    continue
                data = image_of(sample)
                if data is None:
                    raise CorruptImageError(f"no image member in {where(sample)}")
                ext = next(e for e in IMAGE_MEMBERS if e in sample)
                name = f"{len(records):08d}.{ext}"
                (folder / name).write_bytes(data)
                records.append({"file": name, "key": key, "url": sample["__url__"],
                                "captions": captions(sample, caption_field)})  # fmt: skip
            if not records:
                raise ValueError(f"no {part} sample in shards {shards!r}")
            tmp = index.with_suffix(".tmp")
            tmp.write_text(json.dumps(records), encoding="utf-8")
            tmp.replace(index)  # the index last: a crash mid-copy is redone, not reused
        self.records = json.loads(index.read_text(encoding="utf-8"))
        for rec in self.records:
            self._add(folder / rec["file"], rec["captions"], f"{rec['url']} key {rec['key']!r}")
        self.keys = [rec["key"] for rec in self.records]


class ShardStream(IterableDataset):
    """Unpaired images streamed from WebDataset shards, deterministic and resumable.

    Epoch ``e``, pass ``p`` over the shards: the shard list is permuted with a seed of
    (seed, stream, e, p); rank ``r`` of ``R`` takes every R-th shard, worker ``w`` of ``W``
    every W-th of those (no shard is read twice in a pass); samples are shuffled in a buffer
    seeded by (seed, e, p, r, w). Each worker yields whole batches, worker ``w`` the batches
    ``w, w + W, ...`` of the epoch (DataLoader's round robin), so a resumed run skips exactly
    the consumed ones (the images of skipped samples are decoded, no more, to tell corrupt
    ones apart as the first run did), its workers taking the roles that put the next batch
    first. Passes repeat until the epoch has
    ``batches_per_epoch`` batches (the paired loader's length).

    Items: ``{"image", "index", "key"}`` (``index``: position in this rank's epoch stream;
    ``key``: the sample's key in its shard), and ``"image_strong"`` with a ``strong``
    transform (drawn after ``"image"``, under the same per-sample seed).

    Args:
        shards: brace pattern(s) or list file(s).
        transform: image transform (random ones are seeded per sample).
        batch_size: batch size of the loader.
        seed, stream: order seeds (``stream`` tells loaders sharing a seed apart).
        exclude: ``key -> bool``, samples to leave out (the paired part of an L = U split).
        shuffle_buffer: samples in the shuffle buffer (0: shard order).
        skip_corrupt: skip undecodable images (counted and logged, naming shard and key)
            instead of raising.
        strong: the strong view's transform, or None.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Transform,
        batch_size: int,
        seed: int,
        stream: int = 1,
        exclude: Callable[[str], bool] | None = None,
        shuffle_buffer: int = 1000,
        skip_corrupt: bool = False,
        strong: Transform = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(shards)
        self.transform, self.strong, self.batch_size = transform, strong, batch_size
        self.seed, self.stream, self.exclude = seed, stream, exclude
        self.shuffle_buffer, self.skip_corrupt = shuffle_buffer, skip_corrupt
        self.batches_per_epoch = 1
        self.position = (0, 0)  # (epoch, batches already consumed in it)
        self.rank, self.world = 0, 1  # set in the main process: workers see no process group
        self.skipped = 0

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _my_shards(self, epoch: int, pass_: int, worker: int, workers: int) -> list[str]:
        world, rank = self.world, self.rank
        if len(self.urls) < world * workers:
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot be split across {world} rank(s) x "
                f"{workers} worker(s) without overlap: write more, smaller shards or use "
                "fewer data-loader workers"
            )
        order = list(self.urls)
        random.Random(mix_seed(self.seed, self.stream, epoch, pass_)).shuffle(order)
        return order[rank::world][worker::workers]

    def _raw(self, epoch: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """This worker's samples, pass after pass, shuffled in a seeded buffer."""
        rank = self.rank
        for pass_ in range(1 << 30):
            rng = random.Random(mix_seed(self.seed, self.stream, epoch, pass_, rank, worker))
            buffer: list[dict[str, Any]] = []
            produced = 0
            for sample in samples(self._my_shards(epoch, pass_, worker, workers)):
                if self.exclude is not None and self.exclude(sample["__key__"]):
                    continue
                produced += 1
                if self.shuffle_buffer <= 1:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
            rng.shuffle(buffer)
            yield from buffer
            if produced == 0:
                raise ValueError(
                    f"worker {worker} of rank {rank} found no unpaired sample in its shards "
                    f"({len(self.urls)} shard(s) in all)"
                )

    def _image(self, sample: dict[str, Any]) -> Image.Image | None:
        """The decoded image, or None for a corrupt one skipped with ``skip_corrupt``."""
        try:
            return decode(sample)
        except CorruptImageError:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            log.warning(
                "skip_corrupt: skipped unreadable image %s (%d skipped so far in this worker)",
                where(sample),
                self.skipped,
            )
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, consumed = self.position
        # the DataLoader pulls batches from workers 0, 1, ... in turn: after resuming at
        # batch c, worker p plays the part of worker (p + c) % W so batch c comes first
        worker = (physical + consumed) % workers
        mine = range(worker, self.batches_per_epoch, workers)  # this worker's batches
        skip = sum(1 for k in mine if k < consumed) * self.batch_size
        total = len(mine) * self.batch_size
        rank = self.rank
        done = 0
        for sample in self._raw(epoch, worker, workers):
            if done >= total:
                return
            image = self._image(sample)
            if image is None:
                continue
            if done >= skip:
                seed = mix_seed(self.seed, self.stream, epoch, rank, worker, done)
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)
                    pixels = self.transform(image) if self.transform else image
                    views = {"image_strong": self.strong(image)} if self.strong else {}
                index = (done // self.batch_size * workers + worker) * self.batch_size
                yield {
                    "image": pixels,
                    "index": index + done % self.batch_size,
                    "key": sample["__key__"],
                    **views,
                }
            done += 1


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` with the two-integer resumable state of
    :class:`~sclip_lightning.data.sampling.ResumableLoader`.

    Args:
        dataset: the stream.
        batches_per_epoch: batches per epoch (the paired loader's length).
        progress: ``() -> (epoch, batches consumed)`` from the trainer.
        **kwargs: other DataLoader arguments (workers, pinning).
    """

    def __init__(
        self,
        dataset: ShardStream,
        batches_per_epoch: int,
        progress: Callable[[], tuple[int, int]],
        **kwargs: Any,
    ) -> None:
        dataset.batches_per_epoch = batches_per_epoch
        super().__init__(dataset, batch_size=dataset.batch_size, **kwargs)
        self._progress = progress
        self._resume: tuple[int, int] | None = None

    def __iter__(self):  # type: ignore[override]
        stream = self.dataset
        assert isinstance(stream, ShardStream)
        stream.position = self._resume if self._resume is not None else self._progress()
        stream.rank, stream.world = distributed.rank(), distributed.world_size()
        self._resume = None
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self._progress()
        return {"epoch": int(epoch), "consumed_batches": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["consumed_batches"]))


def stream_loader(
    stream: ShardStream,
    batches_per_epoch: int,
    progress: Callable[[], tuple[int, int]],
    num_workers: int,
    resume: dict[str, int] | None = None,
) -> ShardLoader:
    """The training loader of ``stream`` (workers not persistent: each epoch sends its
    position), starting at ``resume`` (a loader state) when given."""
    loader = ShardLoader(
        stream, batches_per_epoch, progress, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    if resume is not None:
        loader.load_state_dict(resume)
    return loader


def check_streamed(hidden_labels: bool, combined_mode: str, images_cached: bool = False) -> None:
    """ValueError for settings that streamed unpaired images cannot honour."""
    if hidden_labels:
        raise ValueError("hidden_labels is not available for unpaired images from shards")
    if combined_mode != "min_size":
        raise ValueError(
            "unpaired images streamed from shards are drawn alongside the paired loader: "
            "use combined_mode='min_size' (an epoch is one pass over the pairs)"
        )
    if images_cached:
        raise ValueError(
            "the image tower-output cache reads every image once up front; unpaired "
            "images streamed from shards are not cached: use tower_cache: text"
        )
