"""The LightningModule: the model, the steps and the optimiser. Objectives and assigners live
in ``losses/``, locked towers and their cache in ``towers.py``, evaluation in
``evaluation.py``, result files and the non-finite guard in ``callbacks.py``."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from sclip_lightning import distributed
from sclip_lightning.callbacks import Nonfinite, NonFiniteGuard, ResultsWriter, logs_this_step
from sclip_lightning.checkpoint import RandomStateCheckpoint, load_weights
from sclip_lightning.evaluation import EvaluationSteps
from sclip_lightning.interfaces import TowerOutputData, TrainingData
from sclip_lightning.losses import Objective, SCLIPLoss, build_component
from sclip_lightning.losses.component import check_choice
from sclip_lightning.models import build_model, build_tokenizer, register_model_configs
from sclip_lightning.optim import adamw_with_schedule
from sclip_lightning.prompts import PromptEncoder
from sclip_lightning.towers import (
    CachedTowers,
    causal_text_length,
    encode_text_prefix,
    freeze_locked_modules,
    running_stats_kept,
)

Scheduler = Literal["cosine", "constant"]
TowerCache = Literal["image", "text", "both"]
#: options that describe a run, not the model: a checkpoint never overrides them
#: (``sclip test --ckpt_path ... --model.init_args.results_dir X`` writes to X)
RUNTIME_OPTIONS: tuple[str, ...] = ("results_dir", "predict_top_k", "eval_max_elements")
RUNTIME_OPTIONS += ("tower_cache_dir", "nonfinite_check_every_n_steps")


class SCLIPModule(EvaluationSteps, L.LightningModule):
    """Fine-tune an open_clip model with a semi-supervised objective (S-CLIP by default).

    The objective is a component (``criterion``): :class:`~sclip_lightning.losses.SCLIPLoss`,
    :class:`~sclip_lightning.losses.CLIPLoss` (the supervised baseline) or your own
    :class:`~sclip_lightning.losses.Objective`; in YAML ``criterion: {class_path: ...,
    init_args: {...}}``. Checkpoints record it, so ``load_from_checkpoint`` and
    ``sclip test --ckpt_path`` rebuild the same objective. Subclass and override a hook rather
    than ``training_step``: ``configure_models``, ``encode_images``, ``encode_texts``,
    ``compute_losses``. The data module is read through
    :class:`~sclip_lightning.interfaces.TrainingData`; validation, test and predict are
    :class:`~sclip_lightning.evaluation.EvaluationSteps`.

    Args:
        model_name: open_clip model name (``open_clip.list_models()``, or a JSON registered
            with ``model_config_dir``).
        pretrained: open_clip tag, a local weights file, or None (random init).
        model_config_dir: folder of extra open_clip model JSONs to register.
        image_size: override the model's input size.
        criterion: the training objective; None: ``SCLIPLoss()`` (S-CLIP, recommended numerics).
        init_from: start ``fit`` from this checkpoint's weights (model and objective; the
            optimiser, schedule and step start fresh): SemiCLIP's stage 2 from stage 1.
        keyword_vocabulary: keyword texts; None takes the data module's.
        keyword_template: text encoded for each keyword (``{}`` = keyword).
        lr, weight_decay, betas, eps: AdamW's (paper 5e-5, 0.2, (0.9, 0.98), 1e-6); no weight
            decay on norms, biases, logit_scale.
        warmup_steps: linear warm-up, in optimiser steps (paper 10).
        scheduler: cosine (to 0 at the last step) or constant after the warm-up.
        lock_image, lock_image_unlocked_groups: freeze the image tower but its top groups;
            locked parts run in eval mode (no dropout, BatchNorm running statistics), as LiT.
        lock_text, lock_text_unlocked_layers: the same for the text tower (top layers).
        encode_unpaired_separately: unpaired images in their own forward (release), not in
            one call with the paired ones (faster; the same but for BatchNorm towers).
        strong_view_norm_stats: ``keep``: the strong view's forward (SemiCLIP) leaves BatchNorm
            running statistics to the weak views; ``update``: train mode (release: ViT, no BN).
        max_logit_scale: ``s`` is clamped to this after every step (open_clip: 100).
        tower_cache: run the frozen part of locked towers once per sample (same results, a
            fraction of the time; :class:`~sclip_lightning.towers.CachedTowers`). Needs the
            tower(s) locked and, for images, ``data.augment: false``.
        tower_cache_dir: keep the cached outputs in files under this folder (``"default"``:
            ``$SCLIP_CACHE/tower_outputs``); None: in memory only.
        pseudo_label_warmup_steps: ramp every term but ``contrastive_loss`` linearly from 0
            over this many optimiser steps (release and paper: 0).
        eval_max_elements: similarity-block budget for retrieval evaluation.
        results_dir: where ``test`` writes results.{md,csv,json} and ``predict`` writes
            predictions.csv (default: the logger's dir).
        predict_top_k: labels (with probabilities) per image written by ``predict``.
        nonfinite: a non-finite loss or gradient cancels the update; ``"raise"`` then stops
            naming the step and the terms, ``"skip"`` goes on and counts.
        nonfinite_check_every_n_steps: how often the host reads the guard's device-side
            record (None: the trainer's ``log_every_n_steps``).
    """

    def __init__(
        self,
        model_name: str = "sclip-tiny",
        pretrained: str | None = None,
        model_config_dir: str | None = None,
        image_size: int | None = None,
        criterion: Objective | None = None,
        init_from: str | None = None,
        keyword_vocabulary: list[str] | None = None,
        keyword_template: str = "{}",
        lr: float = 5e-5,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 10,
        scheduler: Scheduler = "cosine",
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        encode_unpaired_separately: bool = False,
        strong_view_norm_stats: Literal["update", "keep"] = "update",
        max_logit_scale: float = 100.0,
        tower_cache: TowerCache | None = None,
        tower_cache_dir: str | None = None,
        pseudo_label_warmup_steps: int = 0,
        eval_max_elements: int = 1 << 24,
        results_dir: str | None = None,
        predict_top_k: int = 5,
        nonfinite: Nonfinite = "raise",
        nonfinite_check_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("scheduler", scheduler, Scheduler)
        check_choice("tower_cache", tower_cache, TowerCache | None)
        check_choice("nonfinite", nonfinite, Nonfinite)
        check_choice("strong_view_norm_stats", strong_view_norm_stats, Literal["update", "keep"])
        for name in ("pseudo_label_warmup_steps", "warmup_steps"):
            if locals()[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {locals()[name]}")
        if "{}" not in keyword_template:
            raise ValueError(f"keyword_template must contain '{{}}', got {keyword_template!r}")
        self.save_hyperparameters(ignore=["criterion"])
        if model_config_dir:
            register_model_configs(model_config_dir)
        # a config (a checkpoint's) is rebuilt from imported classes only; checkpoints record it
        self.criterion = SCLIPLoss() if criterion is None else build_component(criterion, Objective)
        self.hparams["criterion"] = self.criterion.config()
        self.keywords = list(keyword_vocabulary) if keyword_vocabulary is not None else None
        self.towers: CachedTowers | None = None  # set in setup when tower_cache is on
        self.last_loss_terms: dict[str, torch.Tensor] = {}  # read by NonFiniteGuard
        self.test_results: list[dict[str, Any]] = []  # written by ResultsWriter
        self.predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.configure_models()

    @property
    def _hp(self) -> Any:  # self.hparams, typed loosely
        return self.hparams

    @property
    def data(self) -> Any:
        """The Trainer's data module (or None); read through :mod:`~sclip_lightning.interfaces`."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

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

    def configure_callbacks(self) -> list[L.Callback]:
        """The non-finite guard, random-state checkpointing and the result writer (one given
        to the Trainer is kept, as is one from an earlier ``fit``)."""
        hp = self._hp
        present = {type(c) for c in getattr(self._trainer, "callbacks", None) or []}
        guard = NonFiniteGuard(hp.nonfinite, hp.nonfinite_check_every_n_steps)
        wanted = [guard, RandomStateCheckpoint(), ResultsWriter(hp.results_dir)]
        return [c for c in wanted if type(c) not in present]

    @property
    def uses_unpaired(self) -> bool:
        """Whether training consumes unpaired images (the objective's say)."""
        return self.criterion.uses_unpaired

    @property
    def uses_strong_view(self) -> bool:
        """Whether training reads a strong view of the unpaired images (the objective's say)."""
        return self.uses_unpaired and self.criterion.uses_strong_view

    @property
    def uses_keywords(self) -> bool:
        return self.uses_unpaired and self.criterion.uses_keywords and bool(self.keywords)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, D) L2-normalised features (with ``tower_cache`` on
        images, training and evaluation batches carry the frozen outputs instead)."""
        if self.reads_tower_outputs("image"):
            assert self.towers is not None
            return F.normalize(self.towers.head("image", images), dim=-1)
        return self.model.encode_image(images, normalize=True)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, D) L2-normalised features (frozen outputs instead of tokens
        with ``tower_cache`` on text, as :meth:`encode_images`)."""
        if self.reads_tower_outputs("text"):
            assert self.towers is not None
            return F.normalize(self.towers.head("text", tokens), dim=-1)
        return self.model.encode_text(tokens, normalize=True)

    def encode_keywords(self) -> torch.Tensor:
        """(K, D) normalised features of the keyword texts, with gradient (for open_clip's
        own text tower the padding after the longest keyword is cut: exact, see
        :func:`~sclip_lightning.towers.causal_text_length`)."""
        tokens = self.get_buffer("keyword_tokens")
        length = getattr(self, "_keyword_length", None)
        overridden = type(self).encode_texts is not SCLIPModule.encode_texts
        if length is None or overridden or self.reads_tower_outputs("text"):
            return self.encode_texts(self.text_inputs(tokens))
        return encode_text_prefix(self.model, tokens, length)

    def reads_tower_outputs(self, tower: str) -> bool:
        """Whether the current stage feeds ``tower``'s cached frozen outputs (not raw inputs)
        to the encoders: the cache covers it and a Trainer runs fit, validate or test."""
        if self.towers is None or tower not in self.towers.splits or self._trainer is None:
            return False
        return self.trainer.state.fn in ("fit", "validate", "test")

    def text_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """What :meth:`encode_texts` takes for ``tokens`` now: the tokens, or (text cache)
        their frozen outputs."""
        if not self.reads_tower_outputs("text"):
            return tokens
        assert self.towers is not None
        return self.towers.text_outputs(tokens)

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
        keyword_feats = candidates = strong = None
        text_feats = self.encode_texts(paired["text"])
        if unpaired is not None and self.uses_keywords:
            keyword_feats, candidates = self.encode_keywords(), paired["keywords"]
        if unpaired is not None and self.uses_strong_view:  # the image cache holds no random view
            pixels = unpaired["image_strong"]
            if self.reads_tower_outputs("image"):
                pixels = self.towers.frozen_outputs("image", pixels)  # type: ignore[union-attr]
            with running_stats_kept(self, self._hp.strong_view_norm_stats == "keep"):
                strong = self.encode_images(pixels)
        return self.criterion(
            image_feats,
            text_feats,
            self.logit_scale(),
            unpaired_features=unpaired_feats,
            keyword_features=keyword_feats,
            keyword_candidates=candidates,
            pair_index=paired.get("pair_index"),
            label=paired.get("label"),
            unpaired_strong_features=strong,
            unpaired_index=None if unpaired is None else unpaired.get("index"),
        )

    # -------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        """Take the keyword vocabulary and the number of pairs from the data module, tokenize
        the keywords, set up the objective, and hand locked towers to the cache."""
        dm = self.data
        info = dm.train_info() if isinstance(dm, TrainingData) else None
        if self.keywords is None:
            self.keywords = list(info.keywords) if info is not None else []
        words = [self._hp.keyword_template.format(k) for k in self.keywords]
        tokens = self.tokenizer(words) if words else torch.zeros(0, 1, dtype=torch.long)
        self.register_buffer("keyword_tokens", tokens.to(self.device), persistent=False)
        self._keyword_length = causal_text_length(self.model, tokens)
        if stage == "fit" and self._hp.init_from:
            load_weights(self, self._hp.init_from)
        if info is not None and stage == "fit":
            if type(self.criterion).bind_text_tower is not Objective.bind_text_tower:  # asks
                self.criterion.bind_text_tower(PromptEncoder.for_model(self.model, self.tokenizer))
            self.criterion.setup(info)
        if self._hp.tower_cache is not None and stage != "predict":
            self.configure_tower_cache(dm)

    def configure_tower_cache(self, datamodule: Any) -> None:
        """Cut the locked towers; hand their frozen parts to the data module's cache."""
        hp = self._hp
        if not isinstance(datamodule, TowerOutputData):
            raise ValueError("tower_cache needs a data module that serves tower outputs")
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        self.towers = CachedTowers(
            self.model, hp.tower_cache, hp.tower_cache_dir, precision, model=hp.model_name,
            pretrained=str(hp.pretrained), image_size=hp.image_size,
        )  # fmt: skip
        self.towers.attach(datamodule, lambda: self.device)

    def train(self, mode: bool = True) -> SCLIPModule:
        """Train mode, except for locked parts of the towers (always eval: LiT-style)."""
        super().train(mode)
        if mode:
            freeze_locked_modules(self.model)
        return self

    def on_fit_start(self) -> None:  # under DDP: every rank has the same shapes
        distributed.check_fit_settings(self.trainer, len(self.keywords or []), self.criterion)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        n = self._hp.pseudo_label_warmup_steps  # ramp every term but the contrastive one
        ramp = min(1.0, self.global_step / n) if n > 0 else 1.0
        if ramp < 1.0:
            losses = {k: v if k == "contrastive_loss" else v * ramp for k, v in losses.items()}
        total = sum(losses.values())
        self.last_loss_terms = {k: v.detach() for k, v in losses.items()}
        bs = batch["paired"]["image"].shape[0]
        # on the loggers' steps only: a progress-bar value is a host sync, a log call ~1-2 ms
        if logs_this_step(self.trainer):
            self.log("train/loss", total, prog_bar=True, batch_size=bs)
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
            self.log("train/logit_scale", self.logit_scale().detach(), prog_bar=True, batch_size=bs)
        labels = (batch.get("unpaired") or {}).get("label")
        if labels is not None and self.uses_unpaired:
            for k, v in self.criterion.train_metrics(labels).items():
                self.log(f"train/{k}", v, batch_size=labels.shape[0], on_epoch=True)
        return total  # type: ignore[return-value]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self._hp.max_logit_scale))
        self.criterion.after_step()

    def configure_optimizers(self):
        """AdamW (no decay on norms, biases and scales; the objective's own groups) with a
        linear warm-up and a cosine (or constant) schedule per step."""
        hp = self._hp
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return adamw_with_schedule(
            self, self.criterion.optimizer_groups(hp.lr, hp.weight_decay), hp.lr,
            hp.weight_decay, tuple(hp.betas), hp.eps, hp.warmup_steps, hp.scheduler, total,
        )  # fmt: skip
