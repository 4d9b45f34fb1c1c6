"""A bank of paired features that widens the pseudo-label support beyond the batch.

S-CLIP's assigners match unpaired images against the *paired batch*: with 32 pairs per
step (one GPU), the class of an unpaired image is often absent from the support, and the
balanced OT plan must send it to captions of other classes. The paired set of this method
is small by definition, so all of its features fit in memory: the bank keeps detached
(image, caption) features and keyword candidates of past paired samples, and the support
becomes [the current paired batch, with gradient; the bank rows not in the batch, detached].

Modes (``size``):

- ``0``: off (the release: the support is the batch).
- ``N > 0``: the last ``N`` paired samples, first in first out.
- ``-1``: one slot per paired training image, refreshed by its index (``pair_index``)
  whenever it is in the batch; needs the number of paired images (:meth:`set_capacity`).

Slots never filled, and bank rows of samples that are in the current batch, are masked out
(``support_mask``); no host synchronisation is needed for either. The bank is not a buffer:
its tensors travel as the module's *extra state* (saved in and restored from checkpoints,
moved to the features' device on use, never broadcast by DDP). Under DDP the caller pushes
the gathered global batch, so the bank is identical on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

#: Fields of a bank row: float features, bool keyword candidates, long ids and labels.
FIELDS = ("image", "text", "candidates", "ids", "labels")


class SupportBank(nn.Module):
    """Detached paired features (and keyword candidates) of past steps, for the OT support.

    Args:
        size: ``0`` off, ``N > 0`` FIFO of the last N paired samples, ``-1`` one slot per
            paired training image (:meth:`set_capacity` first).
        capacity: for ``size=-1``, the number of paired training images (can also be set
            later with :meth:`set_capacity`).
    """

    def __init__(self, size: int = 0, capacity: int | None = None) -> None:
        super().__init__()
        if size < -1:
            raise ValueError(f"support_bank_size must be -1, 0 or > 0, got {size}")
        self.size = int(size)
        self.capacity: int | None = self.size if self.size > 0 else capacity
        self.pointer = 0  # next FIFO slot
        self.state: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.size != 0

    def set_capacity(self, capacity: int) -> None:
        """Slots of a ``size=-1`` bank: the number of paired training images."""
        if self.size != -1:
            return
        if capacity < 1:
            raise ValueError(f"the support bank needs >= 1 slot, got {capacity}")
        if self.state and self.state["ids"].shape[0] != capacity:
            raise ValueError(
                f"the support bank holds {self.state['ids'].shape[0]} slots (restored from a "
                f"checkpoint?) but the data has {capacity} paired images"
            )
        self.capacity = int(capacity)

    # ------------------------------------------------------------------ use
    def support(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        candidates: torch.Tensor | None,
        ids: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
    ]:
        """The support: the batch rows (with gradient) then the bank rows (detached).

        Args:
            image, text: (B, D) the paired batch's features.
            candidates: (B, K) bool keyword candidates, or None.
            ids: (B,) long paired-sample ids (used to leave out bank copies of batch
                samples), or None.
            labels: (B,) long hidden labels (diagnostics only), or None.

        Returns:
            ``(image, text, candidates, mask, labels)`` with S = B + bank rows; ``mask`` (S,)
            bool is None while the bank is empty; ``labels`` holds -1 where unknown.
        """
        if not self.state:
            return image, text, candidates, None, labels
        bank = self._on(image.device)
        valid = bank["ids"] != -1  # -1: never filled (-2: filled, id unknown)
        if ids is not None:  # a broadcast comparison, not torch.isin: with more than ~30 ids
            # isin sorts and calls unique(), whose output size costs a host sync on CUDA
            valid &= ~(bank["ids"][:, None] == ids[None, :]).any(dim=1)
        mask = torch.cat([valid.new_ones(image.shape[0]), valid])
        s_image = torch.cat([image, bank["image"].to(image.dtype)])
        s_text = torch.cat([text, bank["text"].to(text.dtype)])
        s_cand = None
        if candidates is not None:
            s_cand = torch.cat([candidates.bool(), bank["candidates"]])
        s_labels = None
        if labels is not None:
            s_labels = torch.cat([labels.long(), bank["labels"]])
        return s_image, s_text, s_cand, mask, s_labels

    @torch.no_grad()
    def push(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        candidates: torch.Tensor | None,
        ids: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Store the batch (detached); FIFO: overwrite the oldest rows; ``-1``: the rows' slots."""
        if not self.enabled:
            return
        b = image.shape[0]
        if ids is None:
            if self.size == -1:
                raise ValueError(
                    "support_bank_size=-1 keeps one slot per paired image and needs their ids "
                    "(pair_index: SCLIPDataModule's batches carry it)"
                )
            ids = torch.full((b,), -2, dtype=torch.long, device=image.device)  # unknown
        if not self.state:
            self._allocate(image, candidates)
        bank = self._on(image.device)
        k = bank["candidates"].shape[1]
        if candidates is None:
            candidates = torch.zeros(b, k, dtype=torch.bool, device=image.device)
        if candidates.shape[1] != k:
            raise ValueError(
                f"keyword candidates have {candidates.shape[1]} columns, the support bank {k}: "
                "the keyword vocabulary changed during training"
            )
        if labels is None:
            labels = torch.full((b,), -1, dtype=torch.long, device=image.device)
        rows = {
            "image": image.float(),
            "text": text.float(),
            "candidates": candidates.bool(),
            "ids": ids.long(),
            "labels": labels.long(),
        }
        if self.size == -1:
            slots = ids.long()
        else:
            n = bank["ids"].shape[0]
            if b > n:  # only the newest n rows fit
                rows = {key: v[b - n :] for key, v in rows.items()}
                b = n
            slots = (torch.arange(b, device=image.device) + self.pointer) % n
            self.pointer = (self.pointer + b) % n
        for key in FIELDS:
            bank[key].index_copy_(0, slots, rows[key])

    def _allocate(self, image: torch.Tensor, candidates: torch.Tensor | None) -> None:
        if self.capacity is None:
            raise ValueError(
                "support_bank_size=-1 needs the number of paired training images: train with "
                "SCLIPDataModule (the module reads it in setup) or call set_capacity(n) first"
            )
        n, dim = self.capacity, image.shape[1]
        k = 0 if candidates is None else candidates.shape[1]
        dev = image.device
        self.state = {
            "image": torch.zeros(n, dim, device=dev),
            "text": torch.zeros(n, dim, device=dev),
            "candidates": torch.zeros(n, k, dtype=torch.bool, device=dev),
            "ids": torch.full((n,), -1, dtype=torch.long, device=dev),
            "labels": torch.full((n,), -1, dtype=torch.long, device=dev),
        }

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.state["ids"].device != device:
            self.state = {k: v.to(device) for k, v in self.state.items()}
        return self.state

    # ----------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "capacity": self.capacity,
            "pointer": self.pointer,
            "state": dict(self.state),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("size", self.size) != self.size:
            raise ValueError(
                f"checkpoint has a support bank of size {state['size']}, this loss "
                f"{self.size}: use the same support_bank_size to resume"
            )
        self.capacity = state.get("capacity", self.capacity)
        self.pointer = int(state.get("pointer", 0))
        self.state = dict(state.get("state", {}))

    def extra_repr(self) -> str:
        filled = int((self.state["ids"] != -1).sum()) if self.state else 0
        return f"size={self.size}, capacity={self.capacity}, filled={filled}"
