"""Callbacks the module installs: the non-finite guard and the result writer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist

from sclip_lightning import distributed
from sclip_lightning.losses.component import check_choice
from sclip_lightning.results import markdown_table, write_predictions, write_results

log = logging.getLogger(__name__)

Nonfinite = Literal["raise", "skip"]


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write this step's step-level metrics (every ``log_every_n_steps``
    and at the last step); values logged on other steps are dropped by Lightning anyway."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class NonFiniteGuard(L.Callback):
    """Cancel the optimiser update of a step whose loss or gradient is not finite.

    The check runs on the device (no host sync per step): the loss terms the module left in
    ``last_loss_terms`` and the gradients of the parameters the optimiser steps. With an
    optimiser that accepts ``found_inf`` (fused AdamW, the module's default) the update is
    skipped inside its kernel; otherwise the gradients are dropped after a host check. Under
    ``16-mixed`` the GradScaler owns gradient overflow (it skips and rescales), so only the
    loss is checked. Under DDP every rank skips the same steps.

    The host reads the device-side record every ``check_every_n_steps`` steps (None: the
    trainer's ``log_every_n_steps``), at every epoch end, at the end of training and before
    every checkpoint (a checkpoint never follows an unreported blow-up). Installed by
    :class:`~sclip_lightning.SCLIPModule` (``nonfinite``, ``nonfinite_check_every_n_steps``);
    its record is saved in checkpoints.

    Args:
        mode: ``"raise"`` stops with an error naming the first such step and its loss terms;
            ``"skip"`` goes on, counts the skipped steps (``train/nonfinite_steps``) and warns.
        check_every_n_steps: how often the host reads the record.
    """

    def __init__(self, mode: Nonfinite = "raise", check_every_n_steps: int | None = None) -> None:
        check_choice("nonfinite", mode, Nonfinite)
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self.first_step: torch.Tensor = torch.tensor(-1)  # device-side record
        self.first_terms: torch.Tensor = torch.zeros(0)
        self.steps: torch.Tensor = torch.tensor(0)
        self.term_names: tuple[str, ...] = ()
        self._reported = 0

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        terms_by_name: dict[str, torch.Tensor] = getattr(pl_module, "last_loss_terms", {}) or {}
        device = pl_module.device
        names = tuple(terms_by_name)
        terms = (
            torch.stack([v.detach().float() for v in terms_by_name.values()])
            if terms_by_name
            else torch.zeros(0, device=device)
        )
        bad = (~torch.isfinite(terms)).any().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:
            stepped = (p for group in optimizer.param_groups for p in group["params"])
            bad = torch.maximum(bad, _nonfinite_grads(stepped, bad.device))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips the same steps
        flag = bad > 0
        self._record(flag, terms, names, trainer.global_step)
        if logs_this_step(trainer):
            pl_module.log("train/nonfinite_steps", self.steps.float(), batch_size=1)
        if scaler is not None:
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad  # type: ignore[attr-defined]
        elif bool(flag):  # host sync: only for optimisers without found_inf support
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def _record(
        self, flag: torch.Tensor, terms: torch.Tensor, names: tuple[str, ...], step: int
    ) -> None:
        device = flag.device
        self.first_step = self.first_step.to(device)
        self.steps = self.steps.to(device)
        if self.first_terms.shape != terms.shape:  # the module's terms (subclasses add some)
            self.first_terms = torch.zeros_like(terms)
        self.first_terms = self.first_terms.to(device)
        self.term_names = names
        new = flag & (self.first_step < 0)
        # new_full fills on the device; torch.as_tensor(step, device=...) would copy a host
        # scalar with a stream sync (one per step on CUDA)
        self.first_step = torch.where(new, self.first_step.new_full((), step), self.first_step)
        self.first_terms = torch.where(new, terms, self.first_terms)
        self.steps = self.steps + flag.long()

    def check(self) -> None:
        """Read the device-side record (one host sync); raise or warn per ``mode``."""
        first = int(self.first_step)
        if first < 0:
            return
        terms = ", ".join(
            f"{n}={v:.4g}" for n, v in zip(self.term_names, self.first_terms.tolist(), strict=False)
        )
        if self.mode == "raise":
            raise FloatingPointError(
                f"non-finite loss or gradient at training step {first} ({terms}); its update "
                "was not applied. Lower the learning rate, check the data of that step, use "
                "objective='recommended' (bounded keyword weights), or set "
                "model.nonfinite='skip' to skip such steps and count them."
            )
        count = int(self.steps)
        if count > self._reported:
            log.warning(
                "skipped %d training step(s) with a non-finite loss or gradient so far "
                "(first: step %d, %s)",
                count,
                first,
                terms,
            )
            self._reported = count

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        every: int = self.check_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50
        if trainer.global_step % max(1, every) == 0:
            self.check()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.training:
            self.check()

    def state_dict(self) -> dict[str, Any]:
        return {
            "first_step": self.first_step.cpu(),
            "first_terms": self.first_terms.cpu(),
            "steps": self.steps.cpu(),
            "term_names": list(self.term_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_step = state_dict["first_step"]
        self.first_terms = state_dict["first_terms"]
        self.steps = state_dict["steps"]
        self.term_names = tuple(state_dict.get("term_names", ()))


def _nonfinite_grads(params: Any, device: torch.device) -> torch.Tensor:
    """1.0 if any gradient holds a NaN or Inf, else 0.0, as a device tensor (no host sync)."""
    found = torch.zeros((), device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (dev, _), grads in groups.items():
        local = torch.zeros((), device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, local, torch.ones((), device=dev))
        found = torch.maximum(found, local.to(device))
    return found


class ResultsWriter(L.Callback):
    """Writes what evaluation and prediction produced, on rank 0, once they are done.

    After ``test``: the module's ``test_results`` as ``results.{md,csv,json}``, and the same
    table printed (percent) once the progress bar has stopped (a print while a rich progress
    display is live recurses inside Jupyter kernels). After ``predict``: every rank's
    predictions gathered (tensor collectives), one row per image (distributed samplers repeat
    images), as ``predictions.csv`` (path, label_1, score_1, ...). Installed by
    :class:`~sclip_lightning.SCLIPModule`.

    Args:
        results_dir: the folder (default: the logger's, else the Trainer's root).
    """

    def __init__(self, results_dir: str | None = None) -> None:
        self.results_dir = results_dir
        self._report: str | None = None

    def _output_dir(self, trainer: L.Trainer) -> Path:
        """Call on every rank (``trainer.log_dir`` broadcasts rank 0's value under DDP)."""
        return Path(self.results_dir or trainer.log_dir or trainer.default_root_dir)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = getattr(pl_module, "test_results", [])
        out_dir = self._output_dir(trainer)
        if trainer.is_global_zero and rows:
            paths = write_results(rows, out_dir)
            self._report = f"\n{markdown_table(rows)}\n(percent; written to {paths['md']})"

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts: list[Any] = list(zip(*getattr(pl_module, "predictions", []), strict=True))
        index, idx, scores = (
            distributed.gather_rows(list(p)) if p else torch.zeros(0)
            for p in (parts or [(), (), ()])
        )
        out_dir = self._output_dir(trainer)
        if not trainer.is_global_zero:
            return
        from sclip_lightning.evaluation import unique_first

        data = trainer.datamodule  # type: ignore[attr-defined]
        paths, classes = data.predict_paths(), data.predict_spec().classes
        rows: list[dict[str, Any]] = []
        if len(index):
            _, first = unique_first(index.long())
            for j in first.tolist():
                row: dict[str, Any] = {"path": paths[int(index[j])]}
                for r, (c, s) in enumerate(zip(idx[j].tolist(), scores[j].tolist(), strict=True)):
                    row[f"label_{r + 1}"] = classes[c]
                    row[f"score_{r + 1}"] = round(s, 6)
                rows.append(row)
        rows.sort(key=lambda r: r["path"])
        self._report = f"wrote {len(rows)} predictions to {write_predictions(rows, out_dir)}"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        report, self._report = self._report, None
        if report:
            print(report, flush=True)


class ConceptLogitsWriter(L.Callback):
    """SemiCLIP stage 1 -> stage 2: at the end of ``fit``, write the concept logits
    ``exp(c) U E^T`` of every unpaired training image (one pass, no gradient, eval mode,
    rank 0) to ``path``, keyed as :mod:`~sclip_lightning.concept_logits` describes.

    Args:
        path: the file stage 2's ``SemiCLIPLoss(stage1_logits=...)`` reads.
        train_view: encode one random training-transform view of each image (the release)
            instead of the evaluation transform (deterministic; the default).
    """

    def __init__(self, path: str, train_view: bool = False) -> None:
        self.path, self.train_view = path, train_view

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from sclip_lightning.concept_logits import save_concept_logits
        from sclip_lightning.interfaces import UnpairedData

        criterion = getattr(pl_module, "criterion", None)
        dm = trainer.datamodule  # type: ignore[attr-defined]
        if not hasattr(criterion, "concept_logits") or not isinstance(dm, UnpairedData):
            raise ValueError(
                "ConceptLogitsWriter needs a module whose criterion has a concept head "
                "(SemiCLIPLoss) and a data module with unpaired_dataloader()"
            )
        if trainer.is_global_zero:
            info = dm.train_info()  # type: ignore[attr-defined]
            feats = unpaired_features(pl_module, dm, self.train_view)
            names = criterion.concept_names  # type: ignore[union-attr]
            with torch.no_grad():  # no unpaired image: an empty (0, K) table
                logits = (
                    criterion.concept_logits(feats).cpu()  # type: ignore[union-attr]
                    if len(feats)
                    else torch.zeros(0, len(names))
                )
            digest = criterion.embedding_digest()  # type: ignore[union-attr]
            view = "train" if self.train_view else "eval"
            path = save_concept_logits(
                self.path, logits, names, info.unpaired_keys, info.unpaired_index, digest, view
            )
            log.info("stage-1 concept logits of %d unpaired images -> %s", len(logits), path)
        if dist.is_available() and dist.is_initialized():
            trainer.strategy.barrier("concept_logits")


@torch.no_grad()
def unpaired_features(module: Any, datamodule: Any, train_view: bool = False) -> torch.Tensor:
    """(N_u, D) float32 features of every unpaired training image, in unpaired order
    (``datamodule.unpaired_dataloader``, :class:`~sclip_lightning.interfaces.UnpairedData`),
    encoded by ``module.encode_images`` in eval mode (the module's mode is restored)."""
    was_training = module.training
    module.eval()
    rows = [
        module.encode_images(batch["image"].to(module.device)).float()
        for batch in datamodule.unpaired_dataloader(train_view)
    ]
    module.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, 0, device=module.device)
