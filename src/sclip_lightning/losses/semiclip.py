"""SemiCLIP's objective: concept head, surrogate captions and trapezoidal consistency.

Gan & Wei, "Semi-Supervised CLIP Adaptation by Enforcing Semantic and Trapezoidal
Consistency", ICLR 2025; release Gank0078/SemiCLIP (``custom/loss.py``, ``custom/model.py``).
Two stages, run as two ``fit`` commands (``configs/semiclip/``):

- stage 1: ``L_clip(X, T) + concept_weight * CE(exp(c) X E^T, y)`` on the pairs (y: the
  concepts in the image's captions); at its end
  :class:`~sclip_lightning.callbacks.ConceptLogitsWriter` writes the concept logits of every
  unpaired image;
- stage 2 (from stage 1's weights, fresh optimiser): ``L_clip + concept_weight * CE(exp(c) Us
  E^T, Q) + in_modal + cross_modal`` with Q the top-k concepts of the stage-1 logits, the
  strong view Us, and the trapezoid terms over the pairs and the unpaired images whose
  surrogate captions (:class:`~sclip_lightning.prompts.SurrogatePrompts`) fit them best.

The concept embeddings E (K x D), the concept log-scale c and the learnable context of the
surrogate captions are parameters of this objective (saved in checkpoints with the concept
names). Each term is the one implementation in its file: ``contrastive.py``, ``concept.py``,
``trapezoid.py``. Deviations from the release are options; :meth:`SemiCLIPLoss.released`
(:data:`RELEASED_SEMICLIP`) reproduces it; docs/method.md lists each.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import torch
import torch.nn as nn

from sclip_lightning.concept_logits import load_concept_logits
from sclip_lightning.concepts import ConceptMiner
from sclip_lightning.interfaces import TrainInfo
from sclip_lightning.losses.component import check_choice
from sclip_lightning.losses.concept import (
    concept_logits,
    concept_loss,
    multi_hot_targets,
    top_k_targets,
)
from sclip_lightning.losses.contrastive import contrastive_loss
from sclip_lightning.losses.objective import Features, Objective
from sclip_lightning.losses.trapezoid import trapezoid_losses

Stage = Literal[1, 2]
#: trapezoid terms times the gathered paired count (release: grows with the GPU count) or not
TrapezoidScaling = Literal["gathered_pairs", "none"]
#: concepts in surrogate captions: their first sub-token (release) or all of them
ConceptTokens = Literal["first", "all"]

#: The release's options where :class:`SemiCLIPLoss`'s defaults differ (docs/method.md).
RELEASED_SEMICLIP: dict[str, Any] = {
    "trapezoid_scaling": "gathered_pairs",
    "in_modal_weight": 1.0,
    "cross_modal_weight": 1.0,
    "concept_tokens": "first",
    "max_concept_scale": None,
    "target_smoothing": 1e-8,
    "concept_empty_rows_in_mean": True,
}


class SemiCLIPLoss(Objective):
    """SemiCLIP (stage 1 or 2): contrastive + concept loss (+ trapezoid terms in stage 2).

    Args:
        stage: 1 (pairs and concepts) or 2 (unpaired images: concept pseudo-labels from
            stage 1, surrogate captions, trapezoid consistency).
        stage1_logits: stage 2: the file stage 1's
            :class:`~sclip_lightning.callbacks.ConceptLogitsWriter` wrote (checked against
            this run's concepts, unpaired images and stage-1 concept embeddings).
        concepts: how concepts are mined from the paired captions
            (:class:`~sclip_lightning.concepts.ConceptMiner`; None: its defaults).
        contrastive_weight, concept_weight: weights of the CLIP loss and the concept loss.
        in_modal_weight, cross_modal_weight: weights of the trapezoid terms (stage 2). The
            defaults (128) are the release's effective weights in its scripts (1 times the
            gathered paired count, 4 GPUs x 32), fixed here.
        trapezoid_scaling: ``"gathered_pairs"`` multiplies the trapezoid terms by the
            gathered paired count (release: their weight then depends on the GPU count);
            ``"none"`` does not.
        top_k: stage-1 concepts per unpaired image in the concept targets (release 3).
        selection_ratio: share of the (global) unpaired batch whose surrogate captions join
            the trapezoid terms: the best-fitting ``floor(ratio * B_u)`` (release 0.3).
        surrogate_words: concepts per surrogate caption (release 4).
        concept_tokens: ``"first"`` sub-token of each concept in surrogate captions (release)
            or ``"all"``.
        context: the words whose token embeddings initialise each concept's context slots.
        concept_prompt: text whose features initialise each concept embedding (``{}``).
        concept_scale_init: initial ``exp(c)`` (release: CLIP's scale, 100 for OpenAI).
        max_concept_scale: ``exp(c)`` clamped to this after every step (None: never, the
            release).
        target_smoothing: added to every target entry before normalising (release 1e-8).
        concept_empty_rows_in_mean: stage 1: paired images without a concept count in the
            concept-loss mean (release: True, they add 0).
        lr, weight_decay: optimiser settings of the concept head and context (the release's
            ``--lr-add``; None: the module's).
        concept_scale_decay: weight decay on c too (the release does so in one process, not
            under its 4-GPU DDP scripts).
        **kwargs: :class:`~sclip_lightning.losses.Objective`'s options.

    Returns (forward): stage 1 ``{"contrastive_loss", "concept_loss"}``; stage 2 also
    ``{"in_modal_loss", "cross_modal_loss"}`` (release: soft_loss / softu_loss,
    inmodal_cyclic_loss, crossmodal_cyclic_loss), each already weighted.
    """

    def __init__(
        self,
        stage: Stage = 1,
        stage1_logits: str | None = None,
        concepts: ConceptMiner | None = None,
        contrastive_weight: float = 1.0,
        concept_weight: float = 1.0,
        in_modal_weight: float = 128.0,
        cross_modal_weight: float = 128.0,
        trapezoid_scaling: TrapezoidScaling = "none",
        top_k: int = 3,
        selection_ratio: float = 0.3,
        surrogate_words: int = 4,
        concept_tokens: ConceptTokens = "all",
        context: str = "a photo includes",
        concept_prompt: str = "a photo includes {}.",
        concept_scale_init: float = 100.0,
        max_concept_scale: float | None = 100.0,
        target_smoothing: float = 0.0,
        concept_empty_rows_in_mean: bool = False,
        lr: float | None = None,
        weight_decay: float | None = None,
        concept_scale_decay: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("stage", stage, Stage)
        check_choice("trapezoid_scaling", trapezoid_scaling, TrapezoidScaling)
        check_choice("concept_tokens", concept_tokens, ConceptTokens)
        for name, w in (
            ("contrastive_weight", contrastive_weight),
            ("concept_weight", concept_weight),
            ("in_modal_weight", in_modal_weight),
            ("cross_modal_weight", cross_modal_weight),
            ("target_smoothing", target_smoothing),
        ):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        for name, v in (("top_k", top_k), ("surrogate_words", surrogate_words)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= selection_ratio <= 1:
            raise ValueError(f"selection_ratio must be in [0, 1], got {selection_ratio}")
        if not concept_scale_init > 0 or (max_concept_scale is not None and max_concept_scale <= 0):
            raise ValueError("concept_scale_init and max_concept_scale must be > 0")
        if "{}" not in concept_prompt:
            raise ValueError(f"concept_prompt must contain '{{}}', got {concept_prompt!r}")
        if stage == 2 and stage1_logits is None:
            raise ValueError(
                "stage 2 needs stage1_logits: the file stage 1's ConceptLogitsWriter callback "
                "wrote (see configs/semiclip/)"
            )
        if concepts is not None and not isinstance(concepts, ConceptMiner):
            raise ValueError(f"concepts must be a ConceptMiner, got {type(concepts).__name__}")
        self.stage = stage
        self.stage1_logits = stage1_logits
        self.miner = concepts if concepts is not None else ConceptMiner()
        self.weights = (
            float(contrastive_weight),
            float(concept_weight),
            float(in_modal_weight),
            float(cross_modal_weight),
        )
        self.trapezoid_scaling = trapezoid_scaling
        self.top_k, self.selection_ratio = top_k, float(selection_ratio)
        self.surrogate_words, self.concept_tokens = surrogate_words, concept_tokens
        self.context_words, self.concept_prompt = context, concept_prompt
        self.max_concept_scale = max_concept_scale
        self.target_smoothing = float(target_smoothing)
        self.concept_empty_rows_in_mean = concept_empty_rows_in_mean
        self.group_lr, self.group_weight_decay = lr, weight_decay
        self.concept_scale_decay = concept_scale_decay
        # E and the context are sized by setup (or by a checkpoint's state dict)
        self.concept_embeddings = nn.Parameter(torch.empty(0, 0))
        self.concept_log_scale = nn.Parameter(torch.tensor(math.log(concept_scale_init)))
        self.context = nn.Parameter(torch.empty(0, 0), requires_grad=stage == 2)
        self.concept_names: list[str] = []
        self.encoder: Any = None  # a PromptEncoder of the module's text tower (bind_text_tower)
        self.surrogates: Any = None
        self.register_buffer("concept_labels", torch.zeros(0, 0), persistent=False)
        self.register_buffer("stage1_table", torch.zeros(0, 0), persistent=False)

    @classmethod
    def released(cls, **overrides: Any) -> SemiCLIPLoss:
        """The authors' release (:data:`RELEASED_SEMICLIP` and the release's concept
        mining), with single options overridden."""
        return cls(**{**RELEASED_SEMICLIP, "concepts": ConceptMiner.released(), **overrides})

    @property
    def uses_unpaired(self) -> bool:
        return self.stage == 2

    @property
    def uses_strong_view(self) -> bool:
        return self.stage == 2

    # ------------------------------------------------------------- set-up
    def bind_text_tower(self, encoder: Any) -> None:
        self.encoder = encoder

    def setup(self, info: TrainInfo) -> None:
        """Mine the concepts, initialise E (and in stage 2 the context) unless a checkpoint
        gave them, and load the stage-1 logits (stage 2)."""
        mined = self.miner.mine(info.paired_captions)
        device = self.concept_log_scale.device
        if self.concept_embeddings.numel() and mined.names != self.concept_names:
            raise ValueError(
                f"the checkpoint's {len(self.concept_names)} concepts differ from the "
                f"{len(mined.names)} mined from this run's paired captions: stage 2 must use "
                "stage 1's data (dataset, label_ratio, split_seed) and concept options"
            )
        self.concept_names = list(mined.names)
        self.concept_labels = mined.labels.to(device)
        encoder = self._require_encoder()
        if not self.concept_embeddings.numel():
            prompts = [self.concept_prompt.format(c.replace("_", " ")) for c in mined.names]
            with torch.no_grad():
                feats = encoder.encode(*_embedded(encoder, prompts)).float()
            self.concept_embeddings.data = feats.to(device)
        if self.stage == 1:
            return
        from sclip_lightning.prompts import SurrogatePrompts

        self.surrogates = SurrogatePrompts(
            encoder, self.concept_names, self.surrogate_words, self.context_words,
            self.concept_tokens,
        )  # fmt: skip
        if not self.context.numel():
            self.context.data = self.surrogates.initial_context().float().to(device)
        assert self.stage1_logits is not None
        self.stage1_table = load_concept_logits(
            self.stage1_logits,
            concepts=self.concept_names,
            unpaired_keys=info.unpaired_keys,
            unpaired_index=info.unpaired_index,
            embedding_digest=self.embedding_digest(),
        ).to(device)

    def _require_encoder(self) -> Any:
        if self.encoder is None:
            raise RuntimeError(
                "SemiCLIPLoss encodes prompts with the model's text tower: the module calls "
                "bind_text_tower() before setup(); outside a module call it yourself with "
                "sclip_lightning.prompts.PromptEncoder.for_model(model, tokenizer)"
            )
        return self.encoder

    def embedding_digest(self) -> str:
        """A short hash of E and c (what the stage-1 logits were computed with)."""
        h = hashlib.sha256()
        for t in (self.concept_embeddings, self.concept_log_scale):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def get_extra_state(self) -> dict[str, Any]:
        return {"concepts": list(self.concept_names)}

    def set_extra_state(self, state: Any) -> None:
        self.concept_names = list((state or {}).get("concepts", []))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # E and the context are sized by setup: a checkpoint loaded first sizes them
        for name in ("concept_embeddings", "context"):
            param, saved = getattr(self, name), state_dict.get(prefix + name)
            if saved is not None and param.numel() == 0 and saved.shape != param.shape:
                param.data = torch.empty(saved.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------ training
    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """E and the context in one group, c in another (decayed only with
        ``concept_scale_decay``), at ``lr`` / ``weight_decay`` or the module's."""
        lr = lr if self.group_lr is None else self.group_lr
        wd = weight_decay if self.group_weight_decay is None else self.group_weight_decay
        main = [p for p in (self.concept_embeddings, self.context) if p.requires_grad]
        return [
            {"params": main, "lr": lr, "weight_decay": wd},
            {
                "params": [self.concept_log_scale],
                "lr": lr,
                "weight_decay": wd if self.concept_scale_decay else 0.0,
            },
        ]

    def after_step(self) -> None:
        if self.max_concept_scale is not None:
            with torch.no_grad():
                self.concept_log_scale.clamp_(max=math.log(self.max_concept_scale))

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) unit image features -> (N, K) concept logits ``exp(c) F E^T``."""
        return concept_logits(features, self.concept_embeddings, self.concept_log_scale)

    def prepare(self, f: Features) -> Features:
        """Stage 2, per rank: look up the stage-1 logits of the unpaired images and encode
        their surrogate captions (top ``surrogate_words`` concepts)."""
        if self.stage == 1:
            return f
        if f.unpaired is None or f.unpaired_index is None or f.unpaired_strong is None:
            raise ValueError(
                "SemiCLIP stage 2 needs the unpaired images' features, strong-view features "
                "and dataset indices (unpaired_features, unpaired_strong_features, "
                "unpaired_index)"
            )
        stage1 = self.stage1_table[f.unpaired_index]
        top = torch.topk(stage1, self.surrogate_words, dim=1).indices
        surrogate = self.surrogates(top, self.context)
        f.extra = {**f.extra, "stage1_logits": stage1, "surrogate": surrogate}
        return f

    def compute(self, f: Features) -> dict[str, torch.Tensor]:
        w_clip, w_concept, w_in, w_cross = self.weights
        out = {"contrastive_loss": w_clip * contrastive_loss(f.image, f.text, f.logit_scale)}
        if self.stage == 1:
            if f.pair_index is None:
                raise ValueError("SemiCLIP stage 1 needs pair_index (the paired items carry it)")
            targets = multi_hot_targets(self.concept_labels[f.pair_index], self.target_smoothing)
            logits = self.concept_logits(f.image)
            out["concept_loss"] = w_concept * concept_loss(
                logits, targets, self.concept_empty_rows_in_mean
            )
            return out
        assert f.unpaired is not None and f.unpaired_strong is not None
        targets = top_k_targets(f.extra["stage1_logits"], self.top_k, self.target_smoothing)
        out["concept_loss"] = w_concept * concept_loss(
            self.concept_logits(f.unpaired_strong), targets
        )
        surrogate = f.extra["surrogate"]
        n_sel = int(f.unpaired.shape[0] * self.selection_ratio)
        fit = (surrogate * f.unpaired).sum(dim=1)
        chosen = torch.topk(fit, n_sel).indices.sort().values  # batch order, as the release
        in_modal, cross_modal = trapezoid_losses(
            torch.cat([f.image, f.unpaired[chosen]]), torch.cat([f.text, surrogate[chosen]])
        )
        scale = f.image.shape[0] if self.trapezoid_scaling == "gathered_pairs" else 1
        out["in_modal_loss"] = w_in * scale * in_modal
        out["cross_modal_loss"] = w_cross * scale * cross_modal
        return out


def _embedded(encoder: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = encoder.tokenize(texts)
    return ids, encoder.token_embeddings(ids)
