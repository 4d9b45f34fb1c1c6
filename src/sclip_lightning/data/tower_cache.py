"""Frozen-tower outputs computed once per sample: the tower-output cache.

When a tower is locked and its inputs are deterministic, recomputing its frozen part every
step is waste. :class:`TowerOutputCache` runs the frozen part once over every image (and
every caption) of a data set, in batches with a progress bar, and keeps the outputs in
memory or in a file under a cache folder. A file's name is the SHA-1 of everything its
content depends on (model, frozen weights, where the tower is cut, image size and
transform or tokenizer, the data set's files and captions), so a stale file is never reused.

Under DDP each rank computes a share of the samples and the shares are all-gathered
(tensor collectives), so every rank ends with the same full table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from sclip_lightning import distributed

log = logging.getLogger(__name__)


@dataclass
class TowerOutputs:
    """Frozen-tower outputs of one data set (rows in the data set's own order).

    Attributes:
        images: (N, ...) image outputs, or None (image tower not cached).
        image_source: (N,) the record each image row was read from (differs from the row
            only where ``skip_corrupt`` skipped an unreadable image), or None.
        captions: (C, ...) outputs of every caption, item by item, or None.
        caption_start: (N + 1,) first caption row of each item (and the end), or None.
    """

    images: torch.Tensor | None = None
    image_source: torch.Tensor | None = None
    captions: torch.Tensor | None = None
    caption_start: torch.Tensor | None = None

    def caption_rows(self, index: int) -> torch.Tensor:
        """(n_i, ...) outputs of item ``index``'s captions."""
        assert self.captions is not None and self.caption_start is not None
        return self.captions[self.caption_start[index] : self.caption_start[index + 1]]


class _Images(Dataset):
    """``(transform(base[i]["image"]), source record)`` for the cache pass."""

    def __init__(self, base: Any, transform: Callable, indices: Sequence[int]) -> None:
        self.base, self.transform, self.indices = base, transform, list(indices)
        self.where = {str(p): i for i, p in enumerate(getattr(base, "paths", []))}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = self.indices[k]
        item = self.base[i]
        if "record" in item:  # the record read (skip_corrupt may serve the next one)
            return self.transform(item["image"]), int(item["record"])
        return self.transform(item["image"]), self.where.get(str(item.get("path")), i)


#: opens the frozen part of a tower for one pass over a data set: a context manager giving
#: inputs -> outputs (the frozen part's modules in eval mode for the pass's duration)
Pass = Callable[[], contextlib.AbstractContextManager[Callable[[torch.Tensor], torch.Tensor]]]


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class TowerOutputCache:
    """Computes, stores and serves frozen-tower outputs of data sets.

    Args:
        image_pass: opens the frozen image part for one pass over a data set (a context
            manager giving pixels (B, 3, H, W) -> frozen outputs, e.g.
            :meth:`~sclip_lightning.towers.CachedTowers.frozen_pass`), or None (images not
            cached).
        text_pass: the same for tokens (B, L) -> frozen text outputs, or None (captions not
            cached).
        image_key, text_key: what the outputs depend on besides the data (model, frozen
            weights digest, cut, image size, transform / tokenizer); part of the file name.
        transform: the (deterministic) image transform.
        tokenizer: the text tokenizer.
        directory: folder for the cache files, or None to keep them in memory only.
        batch_size, num_workers: of the cache pass.
    """

    def __init__(
        self,
        image_pass: Pass | None,
        text_pass: Pass | None,
        image_key: dict[str, Any],
        text_key: dict[str, Any],
        transform: Callable,
        tokenizer: Callable,
        directory: str | Path | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        self.image_pass, self.text_pass = image_pass, text_pass
        self.image_key, self.text_key = image_key, text_key
        self.transform, self.tokenizer = transform, tokenizer
        self.directory = None if directory is None else Path(directory)
        self.batch_size, self.num_workers = batch_size, num_workers
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def outputs(self, name: str, base: Any, captions: bool) -> TowerOutputs:
        """The outputs of data set ``base`` (``name`` says which set and split, for logs).

        Args:
            name: e.g. ``"rsicd/train"``.
            base: a data set of ``{"image", ...}`` items (``.paths`` and ``.captions`` used
                when present).
            captions: also compute every caption's text outputs.
        """
        out = TowerOutputs()
        data = {
            "name": name,
            "n": len(base),
            "paths": _digest([str(p) for p in getattr(base, "paths", [])]),
        }
        if self.image_pass is not None:
            key = {**self.image_key, **data, "transform": repr(self.transform)}
            images, source = self._cached(
                f"{name} images", key, lambda: self._compute_images(name, base)
            )
            out.images, out.image_source = images, source
        if captions and self.text_pass is not None:
            caps = base.captions
            key = {**self.text_key, **data, "captions": _digest(caps)}
            out.captions, _ = self._cached(
                f"{name} captions", key, lambda: (self._compute_texts(name, caps), None)
            )
            lengths = torch.tensor([0] + [len(c) for c in caps])
            out.caption_start = torch.cumsum(lengths, 0)
        return out

    def _cached(
        self, what: str, key: dict[str, Any], compute: Callable[[], tuple]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        digest = _digest(key)
        if digest in self._memo:
            return self._memo[digest]
        path = None if self.directory is None else self.directory / f"{digest}.pt"
        if path is not None and path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == digest:
                log.info("tower outputs of %s read from %s", what, path)
                self._memo[digest] = (stored["outputs"], stored.get("source"))
                return self._memo[digest]
        result = compute()
        self._memo[digest] = result
        if path is not None and distributed.rank() == 0:
            from sclip_lightning.checkpoint import atomic_torch_save

            meta = json.dumps(key, sort_keys=True, default=str)
            atomic_torch_save(
                {"key": digest, "meta": meta, "outputs": result[0], "source": result[1]}, path
            )
            log.info("tower outputs of %s written to %s", what, path)
        return result

    @torch.no_grad()
    def _compute_images(self, name: str, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.image_pass is not None
        indices = _my_share(len(base))
        loader = DataLoader(
            _Images(base, self.transform, indices),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        outs, sources = [], []
        with self.image_pass() as frozen:
            for pixels, source in _progress(loader, f"tower outputs: {name} images"):
                out = _stored(frozen(pixels))
                outs.append(out)
                sources.append(source.to(out.device))  # NCCL gathers device tensors only
        return _gather_share(torch.cat(outs), len(base)), _gather_share(
            torch.cat(sources), len(base)
        )

    @torch.no_grad()
    def _compute_texts(self, name: str, captions: Sequence[Sequence[str]]) -> torch.Tensor:
        assert self.text_pass is not None
        flat = [c for caps in captions for c in caps]
        unique = sorted(set(flat), key=lambda c: (len(c), c))  # similar lengths batch together
        mine = _my_share(len(unique))
        outs = []
        chunks = [mine[s : s + self.batch_size] for s in range(0, len(mine), self.batch_size)]
        with self.text_pass() as frozen:
            for chunk in _progress(chunks, f"tower outputs: {name} captions"):
                outs.append(_stored(frozen(self.tokenizer([unique[i] for i in chunk]))))
        table = _gather_share(torch.cat(outs), len(unique))
        row = {c: i for i, c in enumerate(unique)}
        return table[torch.tensor([row[c] for c in flat], dtype=torch.long)]


def _stored(out: torch.Tensor) -> torch.Tensor:
    """Outputs as stored: float32, float64 kept (a float64 run stays exact end to end)."""
    return out if out.dtype == torch.float64 else out.float()


def _my_share(n: int) -> list[int]:
    """This rank's rows of ``range(n)``: ``rank::world``, padded to equal length (the last
    row repeated) so every rank runs the same number of batches and gathers equal shapes."""
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1 or n < world:
        return list(range(n))
    rows = list(range(rank, n, world))
    per = -(-n // world)
    return rows + [rows[-1]] * (per - len(rows))


def _gather_share(mine: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_my_share`: every rank's rows back in order, on the CPU."""
    world = distributed.world_size()
    if world == 1 or n < world:
        return mine.cpu()
    import torch.distributed as dist

    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous())
    stacked = torch.stack(parts, dim=1)  # (per, world, ...): row r * world + rank
    return stacked.reshape(-1, *mine.shape[1:])[:n].cpu()


def _progress(iterable: Any, desc: str) -> Any:
    if distributed.rank() != 0:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        return iterable
    return tqdm(iterable, desc=desc, leave=False)
