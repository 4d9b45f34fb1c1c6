"""Resumable training order: a run killed mid-epoch resumes on exactly the same batches.

The order of every training loader is a pure function of ``(seed, stream, epoch, pass)``
(``pass`` counts re-iterations inside one epoch, as ``max_size_cycle`` does for the shorter
loader), and every sample carries its own seed for its random augmentation and caption
choice. A loader's state is therefore two integers, the epoch and the number of batches
already consumed in it. :class:`~sclip_lightning.SCLIPDataModule` saves it in each
checkpoint and, on resume, hands it to the loaders it builds, which skip the consumed
batches by index (no image is decoded for them). The loaders also expose it as
``state_dict``/``load_state_dict``, so Lightning treats them as resumable; Lightning's own
call comes only after the loaders were first iterated when ``configure_optimizers`` asks for
``estimated_stepping_batches``, hence the data module's path. The main process's random state
is saved by :class:`sclip_lightning.SCLIPModule`, so the whole run is reproducible.

The sampler is a :class:`~torch.utils.data.DistributedSampler` (it shards by rank when a
process group is initialised), so Lightning leaves it in place under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps; stable across runs and platforms)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


class ResumableSampler(DistributedSampler):
    """Yields ``(index, sample_seed)``: a seeded permutation per (epoch, pass), sharded by rank.

    Args:
        dataset: the dataset (only its length is used).
        seed: base seed of the order.
        stream: distinguishes loaders sharing a seed (paired 0, unpaired 1).
        shuffle: permute (True) or keep the dataset order.
        batch_size: batch size of the loader, to translate consumed batches into samples.
    """

    def __init__(
        self, dataset: Dataset, seed: int, stream: int, shuffle: bool = True, batch_size: int = 1
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if initialised and dist.get_world_size() > 1:
            # every rank must permute with the same seed, or the shards overlap; without
            # seed_everything each process has its own torch.initial_seed()
            shared = [seed]
            dist.broadcast_object_list(shared, src=0)
            seed = int(shared[0])  # type: ignore[call-overload]
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=dist.get_world_size() if initialised else 1,
            rank=dist.get_rank() if initialised else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.stream = stream
        self.batch_size = batch_size
        self.passes = 0  # iterations started in the current epoch
        self._resume: tuple[int, int, int] | None = None  # (epoch, pass, first sample)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.passes = 0
        super().set_epoch(epoch)

    def resume_at(self, epoch: int, consumed_batches: int) -> None:
        """Start the next iteration ``consumed_batches`` batches into ``epoch``."""
        per_pass = max(1, self.num_samples // self.batch_size)
        self.epoch = epoch
        self._resume = (epoch, consumed_batches // per_pass, consumed_batches % per_pass)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            _, self.passes, first_batch = self._resume
            start = first_batch * self.batch_size
        self._resume = None
        this_pass = self.passes
        self.passes += 1
        n = len(self.dataset)  # type: ignore[arg-type]
        order_seed = mix_seed(self.seed, self.stream, self.epoch, this_pass)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed))
        else:
            order = torch.arange(n)
        mine = order[: self.total_size][self.rank :: self.num_replicas].tolist()
        for pos in range(start, len(mine)):
            yield mine[pos], mix_seed(order_seed, self.rank, pos)


class ResumableLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` with a two-integer state.

    Args:
        dataset: a dataset whose ``__getitem__`` accepts ``(index, sample_seed)``.
        batch_size: batch size (incomplete last batches are dropped).
        seed, stream: see :class:`ResumableSampler`.
        progress: returns ``(epoch, batches consumed in it)`` from the trainer at save time.
        **kwargs: other DataLoader arguments (workers, pinning).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        stream: int,
        progress: Callable[[], tuple[int, int]],
        shuffle: bool = True,
        **kwargs: Any,
    ) -> None:
        sampler = ResumableSampler(dataset, seed, stream, shuffle, batch_size)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            # workers are seeded from this generator, not from the global random state
            generator=torch.Generator().manual_seed(mix_seed(seed, stream, 7)),
            **kwargs,
        )
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self._progress()
        return {"epoch": int(epoch), "consumed_batches": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        sampler.resume_at(int(state["epoch"]), int(state["consumed_batches"]))


def seeded(key: Any, fetch: Callable[[int], Any]) -> Any:
    """``fetch(index)`` with the torch random state seeded by the sample's own seed.

    ``key`` is an int (no seeding: evaluation, direct indexing) or ``(index, seed)`` from a
    :class:`ResumableSampler`; the caller's random state is restored afterwards.
    """
    if isinstance(key, tuple):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds every accelerator backend,
            # and where none is initialised each of those records a stack trace for a
            # deferred call (~3 ms per sample on CPU)
            torch.default_generator.manual_seed(seed)
            return fetch(int(index))
    return fetch(int(key))


def eval_loader(ds: Dataset, batch_size: int, num_workers: int, **kw: Any) -> DataLoader:
    """In-order loader for evaluation and prediction. Its private generator seeds the
    workers, so evaluating (e.g. a sanity check after a resume) never draws from the global
    random state that training continues with."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
        **kw,
    )


def training_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, training batches consumed in it)`` of a Trainer's fit: the position a
    resume must start at (the next epoch, from its start, once an epoch is over)."""
    if trainer is None:
        return 0, 0
    done = getattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed", 0)
    if done >= trainer.num_training_batches:
        return trainer.current_epoch + 1, 0
    return trainer.current_epoch, done
