"""Zero-shot classification and image-text retrieval over several evaluation sets.

:class:`Evaluation` collects features batch by batch (from a Trainer's evaluation loop or
from your own loop over features: no Trainer needed), then :meth:`Evaluation.compute`
scores every set. Under DDP every rank's rows are gathered with tensor collectives (padded
to the largest rank, gathered, padding dropped), and samples that a distributed sampler
repeated to even out the ranks are counted once (by their dataset index), so each rank
returns exactly the numbers one process would compute over the whole set. Retrieval is
chunked (:mod:`sclip_lightning.metrics`): the full image x caption matrix never exists;
under DDP each rank ranks its share of the queries.
All numbers are percentages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sclip_lightning import distributed
from sclip_lightning.interfaces import EvaluationData, PredictionData
from sclip_lightning.metrics import recall_from_ranks, retrieval_ranks


@dataclass
class EvalSpec:
    """One evaluation set: its name (the data set's), what it measures, for zero-shot its
    class names and prompt templates, and the split it reads."""

    name: str
    kind: str  # "zeroshot" | "retrieval" | "predict"
    classes: list[str] | None = None
    templates: list[str] | None = None
    split: str = ""


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classes: list[str],
    templates: list[str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(C, D) class embeddings: the normalised embeddings of every template filled with the
    class name, averaged per class and renormalised (CLIP's prompt ensembling).

    Args:
        encode_text: (B, L) tokens -> (B, D) normalised text features.
        tokenizer: texts -> (B, L) tokens.
        classes: class names. templates: prompts with ``{}`` for the class name.
        device: where the tokens go.
    """
    texts = [t.format(c) for c in classes for t in templates]
    tokens = tokenizer(texts).to(device)
    feats = torch.cat([encode_text(chunk) for chunk in tokens.split(512)])
    feats = feats.view(len(classes), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(feats, dim=-1)


class Evaluation:
    """One evaluation pass over ``specs`` (zero-shot and retrieval sets).

    Args:
        specs: the sets, in dataloader order.
        class_features: ``{set position: (C, D) normalised class embeddings}`` of the
            zero-shot sets.
        max_elements: similarity-block budget of the chunked retrieval.
        top_k: the second accuracy reported for zero-shot sets (top-1 always).
        device: where retrieval similarities are computed (features are kept on the CPU
            between batches).
    """

    def __init__(
        self,
        specs: list[EvalSpec],
        class_features: dict[int, torch.Tensor] | None = None,
        max_elements: int = 1 << 24,
        top_k: int = 5,
        device: torch.device | str = "cpu",
    ) -> None:
        self.specs = specs
        self.class_features = class_features or {}
        self.max_elements = max_elements
        self.top_k = top_k
        self.device = torch.device(device)
        self._parts: dict[int, dict[str, list[torch.Tensor]]] = {}
        for i, spec in enumerate(specs):
            if spec.kind == "zeroshot" and i not in self.class_features:
                raise ValueError(f"zero-shot set {spec.name!r} needs its class features")

    def _store(self, i: int, **rows: torch.Tensor) -> None:
        store = self._parts.setdefault(i, {k: [] for k in rows})
        for k, v in rows.items():
            store[k].append(v.detach().cpu())

    @torch.no_grad()
    def add_zeroshot(
        self, i: int, image_features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> None:
        """Score a batch of set ``i``: (B, D) normalised features, (B,) labels, (B,) indices."""
        weights = self.class_features[i].to(image_features.device, image_features.dtype)
        logits = image_features @ weights.T
        k = min(self.top_k, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels.to(top.device)[:, None]
        self._store(i, index=index, top1=hits[:, 0], topk=hits.any(dim=1))

    def add_retrieval(
        self,
        i: int,
        image_features: torch.Tensor,
        index: torch.Tensor,
        text_features: torch.Tensor,
        text_image: torch.Tensor,
    ) -> None:
        """Add a batch of set ``i``: (B, D) image features and their dataset indices, (M, D)
        caption features and the dataset index of each caption's image."""
        self._store(i, image=image_features, index=index, text=text_features, owner=text_image)

    def compute(self) -> list[dict[str, Any]]:
        """One row per set: ``{"dataset", "split", "task", "top1", "top5"}`` or recall@k both
        ways and ``mean_R``, all in percent. Collective under DDP: call it on every rank.

        Memory: the collected rows are handed over (the evaluation is empty afterwards) and
        gathered chunk by chunk into one tensor per field; repeated samples are dropped in
        place. A rank holds the set's features once plus one similarity block of the
        chunked retrieval, as a single process does."""
        rows = []
        for i, spec in enumerate(self.specs):
            collected = self._parts.pop(i, {})
            parts = {k: distributed.gather_rows(collected.pop(k)) for k in list(collected)}
            head = {"dataset": spec.name, "split": spec.split}
            if spec.kind == "zeroshot":
                row = {**head, "task": "zero-shot", **self._zeroshot(parts)}
            else:
                row = {**head, "task": "retrieval", **self._retrieval(parts)}
            rows.append(row)
        return rows

    def _zeroshot(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        if not parts:
            return {}
        _, first = unique_first(parts["index"])
        return {
            "top1": 100.0 * parts["top1"][first].float().mean().item(),
            f"top{self.top_k}": 100.0 * parts["topk"][first].float().mean().item(),
        }

    def _retrieval(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """Recall@k of one set; ``parts`` is consumed (its features are compacted in place)."""
        if not parts:
            return {}
        index, owner = parts.pop("index"), parts.pop("owner")
        _, first = unique_first(index)
        kept = first.sort().values  # first copy of each image, in row order
        position = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
        position[index[kept]] = torch.arange(kept.numel())
        captions = captions_of_first_copy(owner, index).nonzero().squeeze(1)
        images = compact_rows(parts.pop("image"), kept)
        texts = compact_rows(parts.pop("text"), captions)
        owner = position[owner[captions]]
        images, texts = images.float().to(self.device), texts.float().to(self.device)
        world, me = distributed.world_size(), distributed.rank()
        n, m = images.shape[0], texts.shape[0]
        # each rank ranks its share of the queries against everything, then the ranks of
        # the queries are gathered: the same numbers as one process, 1/world of the work
        i2t, t2i = retrieval_ranks(
            images, texts, owner.to(self.device), self.max_elements,
            images=(me * n // world, (me + 1) * n // world),
            texts=(me * m // world, (me + 1) * m // world),
        )  # fmt: skip
        return recall_from_ranks(
            distributed.gather_rows(i2t.cpu()), distributed.gather_rows(t2i.cpu())
        )


def compact_rows(x: torch.Tensor, keep: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """``x[keep]`` for ascending row positions ``keep``, computed in place in blocks of rows
    (a view of ``x``'s first ``len(keep)`` rows; no full-size copy). ``x`` is overwritten."""
    if keep.numel() == x.shape[0]:
        return x  # nothing to drop (ascending and complete: keep is 0..n-1)
    for s in range(0, keep.numel(), block):
        # keep[j] >= j: every source row is read before a later block overwrites it
        src = keep[s : s + block]
        x[s : s + src.numel()] = x[src]
    return x[: keep.numel()]


def unique_first(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of ``idx`` and the position of the first occurrence of each."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(idx.numel()), "amin")
    return uniq, first


def captions_of_first_copy(owner: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mask keeping each image's captions once when distributed samplers repeated the image.

    An image seen ``c`` times contributed ``c * n`` captions; keep the first ``n``.
    """
    copies = torch.bincount(idx)
    if int(copies.max()) <= 1:
        return torch.ones(owner.numel(), dtype=torch.bool)
    order = torch.sort(owner, stable=True).indices
    sorted_owner = owner[order]
    per_owner = torch.bincount(owner, minlength=copies.numel())
    group_start = torch.cumsum(per_owner, 0) - per_owner
    rank_in_group = torch.arange(owner.numel()) - group_start[sorted_owner]
    n_captions = per_owner // copies.clamp_min(1)
    keep = torch.zeros(owner.numel(), dtype=torch.bool)
    keep[order] = rank_in_group < n_captions[sorted_owner]
    return keep


if TYPE_CHECKING:  # the mixin's host: a LightningModule
    from lightning import LightningModule as _Host
else:
    _Host = object


class EvaluationSteps(_Host):
    """The validation, test and predict steps of :class:`~sclip_lightning.SCLIPModule`
    (a mixin of LightningModule hooks): zero-shot and retrieval sets from the data module's
    ``eval_specs``, scored by :class:`Evaluation`; predict's top-k labels.

    Uses the module's ``encode_images``, ``encode_texts``, ``text_inputs``, ``tokenizer``,
    ``logit_scale()`` and ``data`` (:class:`~sclip_lightning.interfaces.TrainingData`); fills
    ``test_results`` and ``predictions``, which :class:`~sclip_lightning.callbacks.ResultsWriter`
    writes.
    """

    test_results: list[dict[str, Any]]
    predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    if TYPE_CHECKING:  # what the host module provides
        tokenizer: Any
        _hp: Any
        data: Any

        def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...
        def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor: ...
        def text_inputs(self, tokens: torch.Tensor) -> torch.Tensor: ...
        def logit_scale(self) -> torch.Tensor: ...

    def zeroshot_weights(self, classes: list[str], templates: list[str]) -> torch.Tensor:
        """(C, D) class embeddings from the prompt templates (:func:`zeroshot_classifier`)."""
        return zeroshot_classifier(
            lambda t: self.encode_texts(self.text_inputs(t)),
            self.tokenizer,
            classes,
            templates,
            self.device,
        )

    def _start_eval(self, stage: str) -> None:
        data = self.data
        specs = data.eval_specs(stage) if isinstance(data, EvaluationData) else []
        weights = {
            i: self.zeroshot_weights(spec.classes or [], spec.templates or [])
            for i, spec in enumerate(specs)
            if spec.kind == "zeroshot"
        }
        self._evaluation = Evaluation(
            specs, weights, self._hp.eval_max_elements, device=self.device
        )

    def _eval_step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        evaluation = self._evaluation
        image_feats = self.encode_images(batch["image"]).float()
        if evaluation.specs[dataloader_idx].kind == "zeroshot":
            evaluation.add_zeroshot(dataloader_idx, image_feats, batch["label"], batch["index"])
            return
        text_feats = self.encode_texts(batch["text"]).float()
        owner = batch["index"][batch["text_image"]]
        evaluation.add_retrieval(dataloader_idx, image_feats, batch["index"], text_feats, owner)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        rows = self._evaluation.compute()
        for row in rows:
            for k, v in row.items():
                if isinstance(v, float):
                    self.log(f"val/{row['dataset']}/{k}", v, batch_size=1)
        for name, key in (("retrieval_mean", "mean_R"), ("zeroshot_top1", "top1")):
            values = [r[key] for r in rows if key in r]
            if values:
                self.log(f"val/{name}", sum(values) / len(values), prog_bar=True, batch_size=1)

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """One row per set (percent) into ``test_results`` (the ResultsWriter writes and
        prints them) and to the loggers (not through ``self.log``: Lightning would print its
        own table with every number repeated under every dataloader)."""
        self.test_results = self._evaluation.compute()
        if self.trainer.is_global_zero:
            metrics = {
                f"test/{r['dataset']}/{k}": v
                for r in self.test_results
                for k, v in r.items()
                if isinstance(v, float)
            }
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def on_predict_epoch_start(self) -> None:
        if not isinstance(self.data, PredictionData):
            raise ValueError("predict needs an SCLIPDataModule with predict_root set")
        spec = self.data.predict_spec()
        self._predict_weights = self.zeroshot_weights(spec.classes or [], spec.templates or [])
        self.predictions = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        """Top-k classes of a batch: ``(index, class indices, probabilities)`` tensors (the
        ResultsWriter gathers them into predictions.csv)."""
        feats = self.encode_images(batch["image"]).float()
        probs = (self.logit_scale() * feats @ self._predict_weights.float().T).softmax(dim=-1)
        scores, idx = probs.topk(min(self._hp.predict_top_k, probs.shape[-1]), dim=-1)
        out = (batch["index"].cpu(), idx.cpu(), scores.cpu())
        self.predictions.append(out)
        return out
