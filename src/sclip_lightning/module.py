"""The S-CLIP LightningModule: the hooks, the steps and the optimiser.

Everything else has its own home: the losses and assigners (``losses/``), locked towers and
their cache (``towers.py``, ``data/tower_cache.py``), evaluation (``evaluation.py``), result
files (``results.py``), the non-finite guard (``callbacks.py``), random states in checkpoints
(``checkpoint.py``), rank agreement (``distributed.py``).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from sclip_lightning import distributed
from sclip_lightning.callbacks import NONFINITE, NonFiniteGuard
from sclip_lightning.checkpoint import RandomStateCheckpoint
from sclip_lightning.evaluation import EvalSpec, Evaluation
from sclip_lightning.losses import OBJECTIVE_OPTIONS, PRESETS, SCLIPLoss, build_assigner
from sclip_lightning.losses.assigners import SHARED_OPTIONS, accepted_options, assigner_class
from sclip_lightning.losses.sclip import preset_options
from sclip_lightning.models import build_model, build_tokenizer, cache_dir, register_model_configs
from sclip_lightning.results import markdown_table, write_predictions, write_results
from sclip_lightning.towers import (
    TowerSplit,
    cache_keys,
    causal_text_length,
    encode_text_prefix,
    freeze_locked_modules,
    image_split,
    text_split,
)

log = logging.getLogger(__name__)

METHODS = ("sclip", "clip")
TOWER_CACHE = (None, "image", "text", "both")
#: options that describe a run, not the model: a checkpoint never overrides them
#: (``sclip test --ckpt_path ... --model.init_args.results_dir X`` writes to X)
RUNTIME_OPTIONS = (
    "results_dir",
    "predict_top_k",
    "eval_max_elements",
    "tower_cache_dir",
    "nonfinite_check_every_n_steps",
)


class SCLIPModule(L.LightningModule):
    """Fine-tune an open_clip model with S-CLIP (or the supervised CLIP baseline).

    Subclass and override a hook rather than ``training_step``: ``configure_models``,
    ``configure_assigner``, ``configure_losses``, ``encode_images``, ``encode_texts``,
    ``compute_losses``. Each is used in every configuration (DDP, mixed precision, the
    tower-output cache, evaluation).

    What the module takes from the data (when the Trainer has a data module): the keyword
    vocabulary and the number of paired images, from ``datamodule.train_info()``; the
    evaluation sets from ``datamodule.eval_specs(stage)``; ``predict``'s classes from
    ``datamodule.predict_spec``. :class:`~sclip_lightning.SCLIPDataModule` provides all three.

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
        keyword_vocabulary: keyword texts; None takes the data module's.
        keyword_template: text encoded for each keyword (``{}`` = keyword).
        lr: AdamW learning rate (paper 5e-5).
        weight_decay: AdamW weight decay (paper 0.2), none on norms, biases, logit_scale.
        betas, eps: AdamW betas and epsilon.
        warmup_steps: linear warm-up, in optimiser steps (paper 10).
        scheduler: ``"cosine"`` (to 0 at the last step) or ``"constant"``.
        lock_image: freeze the image tower except the last ``lock_image_unlocked_groups``.
        lock_text: freeze the text tower except the last ``lock_text_unlocked_layers``.
            Locked parts always run in eval mode (no dropout, BatchNorm running statistics),
            as in LiT.
        encode_unpaired_separately: encode unpaired images in their own forward (release);
            the default encodes paired and unpaired images in one call (faster; differs only
            for BatchNorm towers).
        max_logit_scale: ``s`` is clamped to this after every step (open_clip: 100).
        tower_cache: run the frozen part of locked towers once per sample instead of every
            step: ``"image"``, ``"text"``, ``"both"`` or None (off). The data module then
            serves the frozen outputs (computed on first use, with a progress bar) and
            training runs only the trainable rest (projections, unlocked top blocks, logit
            scale): same results, a fraction of the time. Needs the tower(s) locked
            (``lock_image`` / ``lock_text``) and, for images, ``data.augment: false``.
            ``encode_images`` / ``encode_texts`` then receive the frozen outputs in training
            and evaluation (``predict`` keeps pixels and tokens).
        tower_cache_dir: keep the cached outputs in files under this folder (``"default"``:
            ``$SCLIP_CACHE/tower_outputs``), named by the SHA-1 of everything they depend on
            (model, frozen weights, cut, image size, transform, data files, captions); None
            keeps them in memory only.
        pseudo_label_warmup_steps: ramp the caption and keyword loss weights linearly from
            0 to their value over this many optimiser steps (release and paper: 0).
        eval_max_elements: similarity-block budget for retrieval evaluation.
        results_dir: where ``test`` writes results.{md,csv,json} and ``predict`` writes
            predictions.csv (default: the logger's dir).
        predict_top_k: labels (with probabilities) per image written by ``predict``.
        nonfinite: what a non-finite loss or gradient does (:class:`NonFiniteGuard`, which
            the module installs): the update is cancelled either way; ``"raise"`` stops
            naming the step and the loss terms, ``"skip"`` goes on and counts.
        nonfinite_check_every_n_steps: how often the host reads the guard's device-side
            record (None: the trainer's ``log_every_n_steps``).
    """

    @property
    def _hp(self) -> Any:
        """``self.hparams`` (typed loosely for mypy)."""
        return self.hparams

    @property
    def _datamodule(self) -> Any:
        """The Trainer's data module, or None."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

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
        tower_cache: str | None = None,
        tower_cache_dir: str | None = None,
        pseudo_label_warmup_steps: int = 0,
        eval_max_elements: int = 1 << 24,
        results_dir: str | None = None,
        predict_top_k: int = 5,
        nonfinite: str = "raise",
        nonfinite_check_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(locals())
        self.save_hyperparameters()
        if model_config_dir:
            register_model_configs(model_config_dir)
        self.keywords: list[str] | None = (
            list(keyword_vocabulary) if keyword_vocabulary is not None else None
        )
        self.tower_splits: dict[str, TowerSplit] = {}  # filled by configure_tower_cache
        self._text_memo: dict[Any, torch.Tensor] = {}
        self.last_loss_terms: dict[str, torch.Tensor] = {}  # read by NonFiniteGuard
        self.test_results: list[dict[str, Any]] = []
        self._report: str | None = None  # what teardown prints (test table, predict note)
        self.configure_models()
        self.configure_losses()

    # ------------------------------------------------------------------ hooks
    def configure_models(self) -> None:
        """Build ``self.model`` (open_clip) and ``self.tokenizer``; apply tower locking."""
        hp = self._hp
        self.model = build_model(hp.model_name, hp.pretrained, hp.image_size)
        self.tokenizer = build_tokenizer(hp.model_name)
        if hp.lock_image:
            self.model.lock_image_tower(unlocked_groups=hp.lock_image_unlocked_groups)
        if hp.lock_text:
            self.model.lock_text_tower(unlocked_layers=hp.lock_text_unlocked_layers)
        freeze_locked_modules(self.model)

    def loss_options(self) -> dict[str, Any]:
        """The :class:`SCLIPLoss` options: the preset with this module's overrides."""
        hp = self._hp
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

    def configure_callbacks(self) -> list[L.Callback]:
        """The non-finite guard and the random-state checkpointing this module relies on
        (a guard given to the Trainer is kept, as is one from an earlier ``fit``)."""
        hp = self._hp
        present = {type(c) for c in getattr(self._trainer, "callbacks", None) or []}
        wanted = [
            NonFiniteGuard(hp.nonfinite, hp.nonfinite_check_every_n_steps),
            RandomStateCheckpoint(),
        ]
        return [c for c in wanted if type(c) not in present]

    def configure_tower_cache(self, datamodule: Any) -> None:
        """Cut the locked towers (:mod:`sclip_lightning.towers`) and hand their frozen parts
        to the data module, which serves their outputs from then on."""
        hp = self._hp
        if datamodule is None or not hasattr(datamodule, "use_tower_outputs"):
            raise ValueError(
                "tower_cache needs a data module that serves tower outputs (SCLIPDataModule)"
            )
        towers = ("image", "text") if hp.tower_cache == "both" else (hp.tower_cache,)
        self.tower_splits = {
            t: image_split(self.model) if t == "image" else text_split(self.model) for t in towers
        }
        keys = cache_keys(
            self.tower_splits,
            model=hp.model_name,
            pretrained=str(hp.pretrained),
            image_size=hp.image_size,
        )
        directory = hp.tower_cache_dir
        if directory == "default":
            directory = str(cache_dir() / "tower_outputs")
        datamodule.use_tower_outputs(
            image_fn=partial(self._frozen_outputs, "image") if "image" in towers else None,
            text_fn=partial(self._frozen_outputs, "text") if "text" in towers else None,
            image_key=keys.get("image"),
            text_key=keys.get("text"),
            directory=directory,
        )

    @property
    def uses_unpaired(self) -> bool:
        """Whether training consumes unpaired images (False for the CLIP baseline)."""
        return self._hp.method == "sclip" and self.criterion.uses_unpaired

    @property
    def uses_keywords(self) -> bool:
        return self.uses_unpaired and self.criterion.keyword_weight > 0 and bool(self.keywords)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, D) L2-normalised features.

        With ``tower_cache`` covering images, batches of training and evaluation carry the
        frozen image tower's outputs instead of pixels and only the trainable rest runs.
        """
        if self.reads_tower_outputs("image"):
            return F.normalize(self.tower_splits["image"].head(images), dim=-1)
        return self.model.encode_image(images, normalize=True)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, D) L2-normalised features (frozen text-tower outputs instead of
        tokens with ``tower_cache`` covering text, as :meth:`encode_images`)."""
        if self.reads_tower_outputs("text"):
            return F.normalize(self.tower_splits["text"].head(tokens), dim=-1)
        return self.model.encode_text(tokens, normalize=True)

    def encode_keywords(self) -> torch.Tensor:
        """(K, D) normalised features of the keyword texts, with gradient, through
        :meth:`encode_texts` (for open_clip's own text tower the padding after the longest
        keyword is cut: exact, see :func:`~sclip_lightning.towers.causal_text_length`)."""
        tokens = self.get_buffer("keyword_tokens")
        length = getattr(self, "_keyword_length", None)
        overridden = type(self).encode_texts is not SCLIPModule.encode_texts
        if length is None or overridden or self.reads_tower_outputs("text"):
            return self.encode_texts(self.text_inputs(tokens))
        return encode_text_prefix(self.model, tokens, length)

    def reads_tower_outputs(self, tower: str) -> bool:
        """Whether the current stage feeds ``tower``'s cached frozen outputs (not raw inputs)
        to the encoders: the cache covers it and a Trainer runs fit, validate or test."""
        if tower not in self.tower_splits or self._trainer is None:
            return False
        return self.trainer.state.fn in ("fit", "validate", "test")

    def text_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """What :meth:`encode_texts` takes for ``tokens`` now: the tokens, or (text cache)
        their frozen outputs (computed once per distinct token rows: prompts, keywords)."""
        if not self.reads_tower_outputs("text"):
            return tokens
        key = (tokens.shape, hash(tokens.cpu().numpy().tobytes()))
        if key not in self._text_memo:
            self._text_memo[key] = self._frozen_outputs("text", tokens).cpu()
        return self._text_memo[key].to(self.device)

    @torch.no_grad()
    def _frozen_outputs(self, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen part of ``tower`` on ``inputs`` (eval mode, no gradient)."""
        split = self.tower_splits[tower]
        modes = [m.training for m in split.modules]
        for m in split.modules:
            m.eval()
        try:
            return split.frozen(inputs.to(self.device))
        finally:
            for m, was in zip(split.modules, modes, strict=True):
                m.train(was)

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
                    "data module and the module (or leave module keywords unset)"
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
        """Take the keyword vocabulary and the number of pairs from the data module
        (``train_info()``), tokenize the keywords, and hand locked towers to the cache."""
        dm = self._datamodule
        info = dm.train_info() if hasattr(dm, "train_info") else None
        if self.keywords is None:
            self.keywords = list(info.keywords) if info is not None else []
        words = [self._hp.keyword_template.format(k) for k in self.keywords]
        tokens = self.tokenizer(words) if words else torch.zeros(0, 1, dtype=torch.long)
        self.register_buffer("keyword_tokens", tokens.to(self.device), persistent=False)
        self._keyword_length = causal_text_length(self.model, tokens)
        if self._hp.tower_cache is not None and stage != "predict":
            self.configure_tower_cache(dm)
        bank = self.criterion.bank
        if bank is not None and bank.size == -1 and bank.capacity is None and info is not None:
            bank.set_capacity(info.num_paired)

    def train(self, mode: bool = True) -> SCLIPModule:
        """Train mode, except for locked parts of the towers (always eval: LiT-style)."""
        super().train(mode)
        if mode:
            freeze_locked_modules(self.model)
        return self

    def on_fit_start(self) -> None:
        """Under DDP, check before the first step that every rank has the same shapes."""
        if distributed.world_size() < 2:
            return
        data_hp = getattr(self._datamodule, "hparams", {})
        distributed.check_rank_agreement(
            distributed.all_ranks(
                {
                    "batch_size": data_hp.get("batch_size"),
                    "unpaired_batch_size": data_hp.get("unpaired_batch_size"),
                    "keywords": len(self.keywords or []),
                    "gather_distributed": self._hp.gather_distributed,
                    "method": self._hp.method,
                }
            )
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        ramp = self.pseudo_label_ramp()
        if ramp < 1.0:
            losses = {k: v if k == "contrastive_loss" else v * ramp for k, v in losses.items()}
        total = sum(losses.values())
        self.last_loss_terms = {k: v.detach() for k, v in losses.items()}
        bs = batch["paired"]["image"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        if self.logs_this_step():  # a Lightning log call costs ~1-2 ms of CPU: only when kept
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
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

    def logs_this_step(self) -> bool:
        """Whether the loggers write this step's step-level metrics (every
        ``log_every_n_steps`` and at the last step); values logged on other steps are
        dropped by Lightning anyway."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

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
        assigned = last.support_labels[last.plan.argmax(dim=-1)]
        known = (unpaired_labels >= 0).float()  # -1: no hidden label for this image
        hit = (assigned == unpaired_labels).float() * known
        return hit.sum() / known.sum().clamp_min(1.0)

    def pseudo_label_ramp(self) -> float:
        """Factor on the caption and keyword losses at the current step (1 after the ramp)."""
        n = self._hp.pseudo_label_warmup_steps
        if n <= 0 or self._trainer is None:
            return 1.0
        return min(1.0, self.trainer.global_step / n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self._hp.max_logit_scale))

    def configure_optimizers(self):
        hp = self._hp

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
        # fused AdamW takes the guard's device-side non-finite flag (NonFiniteGuard)
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
    @torch.no_grad()
    def zeroshot_weights(self, classes: list[str], templates: list[str]) -> torch.Tensor:
        """(C, D) class embeddings: mean of the normalised template embeddings, renormalised."""
        texts = [t.format(c) for c in classes for t in templates]
        tokens = self.tokenizer(texts).to(self.device)
        feats = torch.cat([self.encode_texts(self.text_inputs(c)) for c in tokens.split(512)])
        feats = feats.view(len(classes), len(templates), -1).mean(dim=1)
        return F.normalize(feats, dim=-1)

    def _start_eval(self, stage: str) -> None:
        dm = self._datamodule
        specs: list[EvalSpec] = dm.eval_specs(stage) if hasattr(dm, "eval_specs") else []
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
        means = [r["mean_R"] for r in rows if "mean_R" in r]
        if means:
            self.log("val/retrieval_mean", sum(means) / len(means), prog_bar=True, batch_size=1)
        tops = [r["top1"] for r in rows if "top1" in r]
        if tops:
            self.log("val/zeroshot_top1", sum(tops) / len(tops), prog_bar=True, batch_size=1)

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """One table for all sets (percent): printed, written to results.{md,csv,json} and
        sent to the loggers (not through ``self.log``: Lightning would print its own table
        with every number repeated under every dataloader)."""
        rows = self._evaluation.compute()
        self.test_results = rows
        out_dir = Path(self._output_dir())  # on every rank: trainer.log_dir is a collective
        if not (self.trainer.is_global_zero and rows):
            return
        metrics = {
            f"test/{r['dataset']}/{k}": v
            for r in rows
            for k, v in r.items()
            if isinstance(v, float)
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        paths = write_results(rows, out_dir)
        # printed in teardown, after the progress bar has stopped: a print while a rich
        # progress display is live recurses inside Jupyter kernels
        self._report = f"\n{markdown_table(rows)}\n(percent; written to {paths['md']})"

    def teardown(self, stage: str) -> None:
        """Print the test table (rank 0), once the progress bar is gone."""
        report, self._report = self._report, None
        if report:
            print(report, flush=True)

    def _output_dir(self) -> str:
        """results_dir, else the logger's folder, else the Trainer's root. Call it on every
        rank (``trainer.log_dir`` broadcasts rank 0's value under DDP)."""
        return str(self._hp.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)

    def on_predict_epoch_start(self) -> None:
        spec = getattr(self._datamodule, "predict_spec", None)
        if spec is None:
            raise ValueError("predict needs an SCLIPDataModule with predict_root set")
        self._predict_classes = spec.classes
        self._predict_weights = self.zeroshot_weights(spec.classes, spec.templates)
        self._predict_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        """Top-k classes of a batch: ``(index, class indices, probabilities)`` tensors."""
        feats = self.encode_images(batch["image"]).float()
        probs = (self.logit_scale() * feats @ self._predict_weights.float().T).softmax(dim=-1)
        scores, idx = probs.topk(min(self._hp.predict_top_k, probs.shape[-1]), dim=-1)
        out = (batch["index"].cpu(), idx.cpu(), scores.cpu())
        self._predict_rows.append(out)  # type: ignore[arg-type]
        return out

    def on_predict_epoch_end(self) -> None:
        """Gather every rank's predictions (tensor collectives), one row per image, and write
        ``predictions.csv`` (path, label_1, score_1, ...)."""
        parts: list[Any] = list(zip(*self._predict_rows, strict=True)) or [(), (), ()]
        index, idx, scores = (
            distributed.gather_rows(list(p)) if p else torch.zeros(0) for p in parts
        )
        out_dir = Path(self._output_dir())  # on every rank: trainer.log_dir is a collective
        if not self.trainer.is_global_zero:
            return
        from sclip_lightning.evaluation import unique_first

        paths = self._datamodule.predict_paths
        rows: list[dict[str, Any]] = []
        if len(index):
            _, first = unique_first(index.long())  # distributed samplers repeat images
            for j in first.tolist():
                row: dict[str, Any] = {"path": paths[int(index[j])]}
                for r, (c, s) in enumerate(zip(idx[j].tolist(), scores[j].tolist(), strict=True)):
                    row[f"label_{r + 1}"] = self._predict_classes[c]
                    row[f"score_{r + 1}"] = round(s, 6)
                rows.append(row)
        rows.sort(key=lambda r: r["path"])
        path = write_predictions(rows, out_dir)
        self._report = f"wrote {len(rows)} predictions to {path}"


def _check_arguments(args: dict[str, Any]) -> None:
    """ValueError naming the argument, its value and what is allowed."""
    choices = {
        "nonfinite": NONFINITE,
        "method": METHODS,
        "objective": tuple(sorted(PRESETS)),
        "scheduler": ("cosine", "constant"),
        "tower_cache": TOWER_CACHE,
    }
    for name, allowed in choices.items():
        if args[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {args[name]!r}")
    for name in ("pseudo_label_warmup_steps", "warmup_steps"):
        if args[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {args[name]}")
    if "{}" not in args["keyword_template"]:
        raise ValueError(f"keyword_template must contain '{{}}', got {args['keyword_template']!r}")
