"""The S-CLIP LightningModule."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from sclip_lightning import distributed
from sclip_lightning.losses import OBJECTIVE_OPTIONS, PRESETS, SCLIPLoss, build_assigner
from sclip_lightning.losses.assigners import SHARED_OPTIONS, accepted_options, assigner_class
from sclip_lightning.losses.sclip import preset_options
from sclip_lightning.metrics import retrieval_recall
from sclip_lightning.models import build_model, build_tokenizer, register_model_configs
from sclip_lightning.results import markdown_table, write_results

log = logging.getLogger(__name__)

METHODS = ("sclip", "clip")
NONFINITE = ("raise", "skip")


class SCLIPModule(L.LightningModule):
    """Fine-tune an open_clip model with S-CLIP (or the supervised CLIP baseline).

    Subclass and override a hook rather than ``training_step``: ``configure_models``,
    ``configure_losses``, ``encode_images``, ``encode_texts``, ``compute_losses``.

    Args:
        model_name: open_clip model name (``open_clip.list_models()``, or a JSON registered
            with ``model_config_dir``).
        pretrained: open_clip tag, a local weights file, or None (random init).
        model_config_dir: folder of extra open_clip model JSONs to register.
        image_size: override the model's input size.
        method: ``"sclip"`` or ``"clip"`` (supervised baseline: unpaired images unused).
        objective: loss preset, ``"recommended"`` or ``"released"`` (the authors' release).
        contrastive_weight, caption_weight, keyword_weight, assigner, assigner_support,
            sinkhorn_iters, sinkhorn_reg, sinkhorn_solver, detach_plan, keyword_weighting,
            keyword_empty_rows_in_mean, unpaired_negatives, support_bank_size: override single
            options of the preset (None keeps the preset's value; see :class:`SCLIPLoss`).
            ``assigner`` is a built-in name (``ot``, ``unbalanced_ot``, ``soft_nn``,
            ``hard_nn``) or the import path of an ``Assigner`` subclass.
            ``support_bank_size``: -1 keeps one slot per paired training image (the OT support
            then covers all pairs: use it on one GPU with a small per-GPU batch), N > 0 the
            last N pairs, 0 off (the release).
        assigner_kwargs: extra constructor arguments of the assigner (``{"reg_m": 0.1}``).
        gather_distributed: compute the objective over the global batch under DDP.
        keyword_vocabulary: keyword texts; None takes the DataModule's ``keyword_list``.
        keyword_template: text encoded for each keyword (``{}`` = keyword).
        lr: AdamW learning rate (paper 5e-5).
        weight_decay: AdamW weight decay (paper 0.2), none on norms, biases, logit_scale.
        betas, eps: AdamW betas and epsilon.
        warmup_steps: linear warm-up, in optimiser steps (paper 10).
        scheduler: ``"cosine"`` (to 0 at the last step) or ``"constant"``.
        lock_image: freeze the image tower except the last ``lock_image_unlocked_groups``.
        lock_text: freeze the text tower except the last ``lock_text_unlocked_layers``.
        encode_unpaired_separately: encode unpaired images in their own forward (release);
            the default encodes paired and unpaired images in one call (faster; differs only
            for BatchNorm towers).
        max_logit_scale: ``s`` is clamped to this after every step (open_clip: 100).
        pseudo_label_warmup_steps: ramp the caption and keyword loss weights linearly from
            0 to their value over this many optimiser steps (release and paper: 0, full
            weight from the first step). Pseudo-labels of a randomly initialised model are
            noise; a ramp is the usual semi-supervised remedy when training from scratch.
        eval_max_elements: similarity-block budget for retrieval evaluation.
        results_dir: where ``test`` writes results.{md,csv,json} and ``predict`` writes
            predictions.csv (default: the logger's dir).
        predict_top_k: labels (with probabilities) per image written by ``predict``.
        nonfinite: what a non-finite loss or gradient does. Either way the optimiser update
            of that step is not applied (decided on the device: no host sync per step).
            ``"raise"`` stops training with an error naming the first such step and the loss
            terms; ``"skip"`` goes on and counts the skipped steps
            (``train/nonfinite_steps``, warned at every check).
        nonfinite_check_every_n_steps: how often the host reads the device-side flag
            (None: the trainer's ``log_every_n_steps``); also checked at every epoch end and
            before every checkpoint, so a checkpoint never follows an unreported blow-up.
    """

    nonfinite_first_step: torch.Tensor
    nonfinite_first_terms: torch.Tensor
    nonfinite_steps: torch.Tensor

    @property
    def _hp(self) -> Any:
        """``self.hparams`` (typed loosely for mypy)."""
        return self.hparams

    def __init__(
        self,
        model_name: str = "sclip-tiny",
        pretrained: str | None = None,
        model_config_dir: str | None = None,
        image_size: int | None = None,
        method: str = "sclip",
        objective: str = "recommended",
        contrastive_weight: float | None = None,
        caption_weight: float | None = None,
        keyword_weight: float | None = None,
        assigner: str | None = None,
        assigner_support: str | None = None,
        sinkhorn_iters: int | None = None,
        sinkhorn_reg: float | None = None,
        sinkhorn_solver: str | None = None,
        detach_plan: bool | None = None,
        keyword_weighting: str | None = None,
        keyword_empty_rows_in_mean: bool | None = None,
        unpaired_negatives: bool | None = None,
        support_bank_size: int | None = None,
        assigner_kwargs: dict[str, Any] | None = None,
        gather_distributed: bool = True,
        keyword_vocabulary: list[str] | None = None,
        keyword_template: str = "{}",
        lr: float = 5e-5,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 10,
        scheduler: str = "cosine",
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        encode_unpaired_separately: bool = False,
        max_logit_scale: float = 100.0,
        pseudo_label_warmup_steps: int = 0,
        eval_max_elements: int = 1 << 24,
        results_dir: str | None = None,
        predict_top_k: int = 5,
        nonfinite: str = "raise",
        nonfinite_check_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if objective not in PRESETS:
            raise ValueError(f"objective must be one of {sorted(PRESETS)}, got {objective!r}")
        if scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")
        if pseudo_label_warmup_steps < 0:
            raise ValueError(
                f"pseudo_label_warmup_steps must be >= 0, got {pseudo_label_warmup_steps}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if "{}" not in keyword_template:
            raise ValueError(f"keyword_template must contain '{{}}', got {keyword_template!r}")
        self.save_hyperparameters()
        if model_config_dir:
            register_model_configs(model_config_dir)
        self.keywords: list[str] | None = (
            list(keyword_vocabulary) if keyword_vocabulary is not None else None
        )
        self.configure_models()
        self.configure_losses()
        self.test_results: list[dict[str, Any]] = []
        # device-side record of non-finite steps: first step, its loss terms, the count
        self.register_buffer("nonfinite_first_step", torch.tensor(-1), persistent=True)
        self.register_buffer("nonfinite_first_terms", torch.zeros(3), persistent=True)
        self.register_buffer("nonfinite_steps", torch.tensor(0), persistent=True)
        self._step_terms: torch.Tensor | None = None
        self._step_term_names: tuple[str, ...] = ()
        self._nonfinite_term_names: tuple[str, ...] = (
            "contrastive_loss",
            "caption_loss",
            "keyword_loss",
        )
        self._reported_nonfinite = 0

    # ------------------------------------------------------------------ hooks
    def configure_models(self) -> None:
        """Build ``self.model`` (open_clip) and ``self.tokenizer``; apply tower locking."""
        hp: Any = self.hparams
        self.model = build_model(hp.model_name, hp.pretrained, hp.image_size)
        self.tokenizer = build_tokenizer(hp.model_name)
        if hp.lock_image:
            self.model.lock_image_tower(unlocked_groups=hp.lock_image_unlocked_groups)
        if hp.lock_text:
            self.model.lock_text_tower(unlocked_layers=hp.lock_text_unlocked_layers)

    def loss_options(self) -> dict[str, Any]:
        """The :class:`SCLIPLoss` options: the preset with this module's overrides."""
        hp: Any = self.hparams
        opts = preset_options(hp.objective, {k: hp.get(k) for k in OBJECTIVE_OPTIONS})
        if hp.method == "clip":
            opts.update(
                caption_weight=0.0,
                keyword_weight=0.0,
                unpaired_negatives=False,
                support_bank_size=0,
            )
        opts["assigner_kwargs"] = hp.assigner_kwargs
        opts["gather_distributed"] = hp.gather_distributed
        return opts

    def configure_assigner(self) -> torch.nn.Module:
        """The pseudo-label assigner training uses (override to plug in your own).

        Default: ``assigner`` (a name or an import path) built with this module's Sinkhorn,
        support and detach options and ``assigner_kwargs``.
        """
        opts = self.loss_options()
        shared = {k: opts[k] for k in SHARED_OPTIONS}
        cls = assigner_class(opts["assigner"])
        unused = sorted(
            k
            for k in SHARED_OPTIONS
            if self._hp.get(k) is not None and k not in accepted_options(cls, shared)
        )
        if unused:
            rank_zero_warn(f"assigner {cls.__name__} does not use {unused}: they have no effect")
        return build_assigner(cls, {**shared, **(opts["assigner_kwargs"] or {})})

    def configure_losses(self) -> None:
        """Build ``self.criterion`` around :meth:`configure_assigner`'s assigner."""
        self.criterion = SCLIPLoss(**{**self.loss_options(), "assigner": self.configure_assigner()})

    @property
    def uses_unpaired(self) -> bool:
        """Whether training consumes unpaired images (False for the CLIP baseline)."""
        return self._hp.method == "sclip" and self.criterion.uses_unpaired

    @property
    def uses_keywords(self) -> bool:
        return self.uses_unpaired and self.criterion.keyword_weight > 0 and bool(self.keywords)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised features."""
        return self.model.encode_image(images, normalize=True)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, D) L2-normalised features."""
        return self.model.encode_text(tokens, normalize=True)

    def encode_keywords(self) -> torch.Tensor:
        """(K, D) normalised features of the keyword texts, with gradient.

        Keyword texts are a few tokens long. For open_clip's causal CLIP text tower with
        end-of-text pooling, positions after the longest keyword's end token cannot change
        the pooled features, so the padding is cut (exact, and up to context/length times
        cheaper); other text towers get the full :meth:`encode_texts`.
        """
        tokens = self.get_buffer("keyword_tokens")
        length = getattr(self, "_keyword_length", None)
        if length is None:
            return self.encode_texts(tokens)
        m = self.model
        cast = m.transformer.get_cast_dtype()
        short = tokens[:, :length]
        x = m.token_embedding(short).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(
            x, short, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
        )
        if m.text_projection is not None:
            x = (
                m.text_projection(x)
                if isinstance(m.text_projection, torch.nn.Linear)
                else x @ m.text_projection
            )
        return torch.nn.functional.normalize(x, dim=-1)

    def _short_keyword_length(self, tokens: torch.Tensor) -> int | None:
        """Cut length for :meth:`encode_keywords`, or None where cutting is not exact."""
        import open_clip

        m = self.model
        mask = getattr(m, "attn_mask", None)
        if not isinstance(m, open_clip.CLIP) or mask is None or tokens.numel() == 0:
            return None
        if type(m).encode_text is not open_clip.CLIP.encode_text:
            return None  # a subclass changed the text path
        causal = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
        if not (torch.isinf(mask[causal]).all() and (mask[~causal] == 0).all()):
            return None
        if m.text_pool_type == "argmax":
            end = tokens.argmax(dim=-1)
        elif m.text_pool_type == "eos" and getattr(m, "text_eos_id", None) is not None:
            end = (tokens == m.text_eos_id).int().argmax(dim=-1)
        else:
            return None
        return int(end.max()) + 1

    def logit_scale(self) -> torch.Tensor:
        """The scale ``s`` (exponentiated)."""
        return self.model.logit_scale.exp()

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms of one training batch ``{"paired": {...}, "unpaired": {...}}``."""
        paired = batch["paired"]
        unpaired = batch.get("unpaired") if self.uses_unpaired else None
        n_p = paired["image"].shape[0]
        unpaired_feats = None
        if unpaired is None:
            image_feats = self.encode_images(paired["image"])
        elif self._hp.encode_unpaired_separately:
            image_feats = self.encode_images(paired["image"])
            unpaired_feats = self.encode_images(unpaired["image"])
        else:
            feats = self.encode_images(torch.cat([paired["image"], unpaired["image"]]))
            image_feats, unpaired_feats = feats[:n_p], feats[n_p:]
        keyword_feats = candidates = None
        text_feats = self.encode_texts(paired["text"])
        if unpaired is not None and self.uses_keywords:
            keyword_feats = self.encode_keywords()
            candidates = paired["keywords"]
            if candidates.shape[-1] != keyword_feats.shape[0]:
                raise ValueError(
                    f"batch keyword labels have {candidates.shape[-1]} columns but the module "
                    f"has {keyword_feats.shape[0]} keywords: use the same vocabulary in the "
                    "DataModule and the module (or leave module keywords unset)"
                )
        return self.criterion(
            image_feats,
            text_feats,
            self.logit_scale(),
            unpaired_features=unpaired_feats,
            keyword_features=keyword_feats,
            keyword_candidates=candidates,
            paired_ids=paired.get("pair_index"),
            paired_labels=paired.get("label"),
        )

    # -------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.keywords is None and dm is not None:
            if hasattr(dm, "setup") and not getattr(dm, "_prepared", True):
                dm.setup(stage)
            self.keywords = list(getattr(dm, "keyword_list", []) or [])
        words = [self._hp.keyword_template.format(k) for k in (self.keywords or [])]
        tokens = self.tokenizer(words) if words else torch.zeros(0, 1, dtype=torch.long)
        self.register_buffer("keyword_tokens", tokens.to(self.device), persistent=False)
        self._keyword_length = self._short_keyword_length(tokens)
        bank = getattr(self.criterion, "bank", None)
        if bank is not None and bank.size == -1 and bank.capacity is None and dm is not None:
            n_paired = getattr(dm, "num_paired", None)
            if n_paired:
                bank.set_capacity(int(n_paired))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        ramp = self.pseudo_label_ramp()
        if ramp < 1.0:
            losses = {k: v if k == "contrastive_loss" else v * ramp for k, v in losses.items()}
        total = sum(losses.values())
        self._step_term_names = tuple(losses)  # subclasses may return other terms
        self._step_terms = torch.stack([v.detach().float() for v in losses.values()])
        bs = batch["paired"]["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.logit_scale().detach(), prog_bar=True, batch_size=bs)
        unpaired = batch.get("unpaired")
        if unpaired is not None and "label" in unpaired and self.uses_unpaired:
            acc = self.pseudo_label_accuracy(unpaired["label"])
            if acc is not None:
                self.log(
                    "train/pseudo_label_acc",
                    acc,
                    batch_size=unpaired["label"].shape[0],
                    on_epoch=True,
                )
        return total  # type: ignore[return-value]

    @torch.no_grad()
    def pseudo_label_accuracy(self, unpaired_labels: torch.Tensor) -> torch.Tensor | None:
        """Share of unpaired images whose assigned support item (plan argmax) has their class.

        Reads the plan the last training loss used (``criterion.last_assignment``: the same
        assigner, support bank and global batch) and the hidden labels of its support rows;
        labels never reach the losses. None when the last step made no plan. No host sync.
        """
        last = self.criterion.last_assignment
        if last is None or last.support_labels is None:
            return None
        if self.criterion.gather_distributed:
            unpaired_labels = distributed.gather_no_grad(unpaired_labels)
        return (last.support_labels[last.plan.argmax(dim=-1)] == unpaired_labels).float().mean()

    def pseudo_label_ramp(self) -> float:
        """Factor on the caption and keyword losses at the current step (1 after the ramp)."""
        n = self._hp.pseudo_label_warmup_steps
        if n <= 0 or self._trainer is None:
            return 1.0
        return min(1.0, self.trainer.global_step / n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self._hp.max_logit_scale))
        every = self._hp.nonfinite_check_every_n_steps or getattr(
            self.trainer, "log_every_n_steps", 50
        )
        if self.trainer.global_step % max(1, every) == 0:
            self.check_nonfinite()

    def on_fit_start(self) -> None:
        """Under DDP, check before the first step that every rank has the same shapes."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        dm = getattr(self.trainer, "datamodule", None)
        mine = {
            "batch_size": getattr(dm, "hparams", {}).get("batch_size"),
            "unpaired_batch_size": getattr(dm, "hparams", {}).get("unpaired_batch_size"),
            "keywords": len(self.keywords or []),
            "gather_distributed": self._hp.gather_distributed,
            "method": self._hp.method,
        }
        values: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(values, mine)
        check_rank_agreement(values)

    # ------------------------------------------------------- numerical safety
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Flag a non-finite loss or gradient on the device and cancel this update.

        With an optimiser that accepts ``found_inf`` (fused AdamW, the default) the update
        is skipped inside its kernel; otherwise the gradients are dropped after a host check.
        Under ``16-mixed`` the GradScaler owns gradient overflow (it skips and rescales), so
        only the loss is checked.
        """
        if self._step_terms is None:
            return
        bad = (~torch.isfinite(self._step_terms)).any().float()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None:
            bad = torch.maximum(bad, _nonfinite_grads(self.parameters(), bad.device))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips the same steps
        flag = bad > 0
        if self.nonfinite_first_terms.shape != self._step_terms.shape:  # other loss terms
            self.nonfinite_first_terms = torch.zeros_like(self._step_terms)
        self._nonfinite_term_names = self._step_term_names
        new = flag & (self.nonfinite_first_step < 0)
        step = torch.as_tensor(self.trainer.global_step, device=flag.device)
        self.nonfinite_first_step.copy_(torch.where(new, step, self.nonfinite_first_step))
        self.nonfinite_first_terms.copy_(
            torch.where(new, self._step_terms, self.nonfinite_first_terms)
        )
        self.nonfinite_steps.add_(flag.long())
        self.log("train/nonfinite_steps", self.nonfinite_steps.float(), batch_size=1)
        if scaler is not None:
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad  # type: ignore[attr-defined]
        elif bool(flag):  # host sync: only for optimisers without found_inf support
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def check_nonfinite(self) -> None:
        """Read the device-side flag (one host sync); raise or warn per ``nonfinite``."""
        first = int(self.nonfinite_first_step)
        if first < 0:
            return
        names = self._nonfinite_term_names
        terms = ", ".join(
            f"{n}={v:.4g}" for n, v in zip(names, self.nonfinite_first_terms.tolist(), strict=True)
        )
        if self._hp.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss or gradient at training step {first} ({terms}); its update "
                "was not applied. Lower the learning rate, check the data of that step, use "
                "objective='recommended' (bounded keyword weights), or set "
                "model.nonfinite='skip' to skip such steps and count them."
            )
        count = int(self.nonfinite_steps)
        if count > self._reported_nonfinite:
            log.warning(
                "skipped %d training step(s) with a non-finite loss or gradient so far "
                "(first: step %d, %s)",
                count,
                first,
                terms,
            )
            self._reported_nonfinite = count

    def on_train_epoch_end(self) -> None:
        self.check_nonfinite()

    def on_train_end(self) -> None:
        self.check_nonfinite()

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to checkpoint after an unreported blow-up; save the random states."""
        if self._trainer is not None and self.trainer.training:
            self.check_nonfinite()
        checkpoint["sclip_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_tensors(tuple(np.random.get_state())),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random states, so a resumed run draws what the original would have."""
        state = checkpoint.get("sclip_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
        random.setstate(state["python"])

    def configure_optimizers(self):
        hp: Any = self.hparams

        def no_decay(name: str, p: torch.Tensor) -> bool:
            return (
                p.ndim < 2
                or "bn" in name
                or "ln" in name
                or "bias" in name
                or "logit_scale" in name
            )

        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in params if not no_decay(n, p)],
                "weight_decay": hp.weight_decay,
            },
            {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
        ]
        # fused AdamW takes the device-side non-finite flag (see on_before_optimizer_step)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in params)
        opt = torch.optim.AdamW(
            groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused or None
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = hp.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if hp.scheduler == "constant":
                return 1.0
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------- evaluation
    def _specs(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None)
        return dm.eval_specs(stage) if dm is not None and hasattr(dm, "eval_specs") else []

    def _start_eval(self, stage: str) -> None:
        self._specs_now = self._specs(stage)
        self._store: dict[int, dict[str, list]] = {}
        self._class_weights: dict[int, torch.Tensor] = {}
        self._acc: dict[int, tuple[MulticlassAccuracy, MulticlassAccuracy]] = {}
        for i, spec in enumerate(self._specs_now):
            if spec.kind == "zeroshot":
                self._class_weights[i] = self.zeroshot_weights(spec.classes, spec.templates)
                c = len(spec.classes)
                self._acc[i] = (
                    MulticlassAccuracy(c, top_k=1, average="micro").to(self.device),
                    MulticlassAccuracy(c, top_k=min(5, c), average="micro").to(self.device),
                )

    @torch.no_grad()
    def zeroshot_weights(self, classes: list[str], templates: list[str]) -> torch.Tensor:
        """(C, D) class embeddings: mean of the normalised template embeddings, renormalised."""
        texts = [t.format(c) for c in classes for t in templates]
        tokens = self.tokenizer(texts).to(self.device)
        feats = torch.cat([self.encode_texts(chunk) for chunk in tokens.split(512)])
        feats = feats.view(len(classes), len(templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(feats, dim=-1)

    def _eval_step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        spec = self._specs_now[dataloader_idx]
        image_feats = self.encode_images(batch["image"]).float()
        if spec.kind == "zeroshot":
            logits = image_feats @ self._class_weights[dataloader_idx].float().T
            top1, top5 = self._acc[dataloader_idx]
            top1.update(logits, batch["label"])
            top5.update(logits, batch["label"])
            return
        text_feats = self.encode_texts(batch["text"]).float()
        store = self._store.setdefault(
            dataloader_idx, {"img": [], "idx": [], "txt": [], "owner": []}
        )
        store["img"].append(image_feats.cpu())
        store["idx"].append(batch["index"].cpu())
        store["txt"].append(text_feats.cpu())
        store["owner"].append(batch["index"][batch["text_image"]].cpu())

    def _finish_eval(self, stage: str) -> list[dict[str, Any]]:
        rows = []
        for i, spec in enumerate(self._specs_now):
            if spec.kind == "zeroshot":
                top1, top5 = self._acc[i]
                row = {
                    "dataset": spec.name,
                    "task": "zero-shot",
                    "top1": 100 * top1.compute().item(),
                    "top5": 100 * top5.compute().item(),
                }
            else:
                row = {"dataset": spec.name, "task": "retrieval", **self._retrieval(i)}
            rows.append(row)
            for k, v in row.items():
                if isinstance(v, float):
                    self.log(f"{stage}/{spec.name}/{k}", v, sync_dist=False, batch_size=1)
        means = [r["mean_R"] for r in rows if "mean_R" in r]
        if means:
            self.log(
                f"{stage}/retrieval_mean", sum(means) / len(means), prog_bar=True, batch_size=1
            )
        tops = [r["top1"] for r in rows if "top1" in r]
        if tops:
            self.log(f"{stage}/zeroshot_top1", sum(tops) / len(tops), prog_bar=True, batch_size=1)
        return rows

    def _retrieval(self, i: int) -> dict[str, float]:
        store = self._store.get(i)
        if store is None:
            return {}
        parts = {k: torch.cat(v) for k, v in store.items()}
        if distributed.world_size() > 1:
            gathered: list[Any] = [None] * distributed.world_size()
            dist.all_gather_object(gathered, parts)
            parts = {k: torch.cat([g[k] for g in gathered]) for k in parts}
        # deduplicate images (distributed samplers pad) and order them by dataset index
        idx, first = _unique_first(parts["idx"])
        img = parts["img"][first]
        pos = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long)
        pos[idx] = torch.arange(idx.numel())
        # captions: keep those of the first copy of each image
        keep = _captions_of_first_copy(parts["owner"], parts["idx"])
        txt, owner = parts["txt"][keep], pos[parts["owner"][keep]]
        dev = self.device
        return retrieval_recall(
            img.to(dev), txt.to(dev), owner.to(dev), max_elements=self._hp.eval_max_elements
        )

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_predict_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        spec = getattr(dm, "predict_spec", None)
        if spec is None:
            raise ValueError("predict needs an SCLIPDataModule with predict_root set")
        self._predict_classes = spec.classes
        self._predict_weights = self.zeroshot_weights(spec.classes, spec.templates)
        self._predict_rows: list[dict[str, Any]] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        feats = self.encode_images(batch["image"]).float()
        probs = (self.logit_scale() * feats @ self._predict_weights.float().T).softmax(dim=-1)
        k = min(self._hp.predict_top_k, probs.shape[-1])
        scores, idx = probs.topk(k, dim=-1)
        rows = []
        for path, s_row, i_row in zip(batch["path"], scores.tolist(), idx.tolist(), strict=True):
            row: dict[str, Any] = {"path": path}
            for r, (s, i) in enumerate(zip(s_row, i_row, strict=True), start=1):
                row[f"label_{r}"] = self._predict_classes[i]
                row[f"score_{r}"] = round(s, 6)
            rows.append(row)
        self._predict_rows.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        rows = self._predict_rows
        if distributed.world_size() > 1:
            gathered: list[Any] = [None] * distributed.world_size()
            dist.all_gather_object(gathered, rows)
            seen: dict[str, dict[str, Any]] = {}
            for part in gathered:
                for row in part:
                    seen.setdefault(row["path"], row)
            rows = sorted(seen.values(), key=lambda r: r["path"])
        if self.trainer.is_global_zero:
            import csv

            out = Path(
                self._hp.results_dir or self.trainer.log_dir or self.trainer.default_root_dir
            )
            out.mkdir(parents=True, exist_ok=True)
            with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path"])
                writer.writeheader()
                writer.writerows(rows)
            self.print(f"wrote {len(rows)} predictions to {out / 'predictions.csv'}")

    def on_test_epoch_end(self) -> None:
        rows = self._finish_eval("test")
        self.test_results = rows
        if self.trainer.is_global_zero and rows:
            out = self._hp.results_dir or self.trainer.log_dir or self.trainer.default_root_dir
            paths = write_results(rows, Path(out))
            rank_zero_info(f"\n{markdown_table(rows)}\n(written to {paths['md'].parent})")


def check_rank_agreement(values: list[dict[str, Any]]) -> None:
    """Raise if the ranks of a DDP run disagree on a setting that fixes a gathered shape.

    Features (and keyword candidates) are all-gathered every step; different batch sizes or
    keyword vocabularies per rank would hang or crash inside the collective, mid-training.
    """
    keys = [k for k in values[0] if any(v[k] != values[0][k] for v in values)]
    if keys:
        per_rank = "; ".join(
            f"{k}: " + ", ".join(f"rank {r}={v[k]}" for r, v in enumerate(values)) for k in keys
        )
        raise ValueError(
            f"the DDP ranks disagree on {', '.join(keys)} ({per_rank}). Every rank must use the "
            "same batch sizes, keyword vocabulary and method: give all processes the same config "
            "(batch sizes are per device; the global batch is batch_size x devices x nodes)."
        )


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    """NumPy's legacy RNG state as tensors and numbers (loadable with ``weights_only``)."""
    name, keys, pos, has_gauss, gauss = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]


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


def _unique_first(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of ``idx`` and the position of the first occurrence of each."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(idx.numel()), "amin")
    return uniq, first


def _captions_of_first_copy(owner: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
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
