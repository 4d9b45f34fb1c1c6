"""Locked towers: which part of an open_clip tower is frozen, and where it ends.

A tower locked with ``lock_image`` / ``lock_text`` (LiT-style adaptation) has a frozen part
whose outputs never change during training, and a trainable rest (the projection, or the
top blocks left unlocked). :func:`image_split` / :func:`text_split` find that boundary, so
the frozen part can run once per sample (the tower-output cache, ``tower_cache``) and
training runs only the rest. :func:`freeze_locked_modules` keeps frozen parts in eval mode
(no dropout, BatchNorm running statistics), so their outputs are a function of the input
alone, with or without the cache.

Supported boundaries:

- image, open_clip ``TimmModel`` (e.g. the offline EfficientNet-lite0): the frozen prefix of
  the timm trunk; at a block boundary for EfficientNet/MobileNet-style trunks (top blocks
  unlocked with ``lock_image_unlocked_groups``), after the pooled trunk otherwise;
- image, open_clip's own towers (ViT, ModifiedResNet): the whole tower when fully locked;
- text, open_clip ``HFTextEncoder`` (e.g. MiniLM): transformer + pooler when fully locked;
- text, open_clip's own transformer: the whole tower when fully locked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class TowerSplit:
    """A tower cut into a frozen part and the trainable rest.

    Attributes:
        tower: ``"image"`` or ``"text"``.
        frozen: inputs (pixels or tokens) -> frozen outputs (what the cache stores).
        head: frozen outputs -> the tower's (unnormalised) embedding.
        modules: the frozen modules (their weights key the cache).
        boundary: a readable description of the cut (also part of the cache key).
    """

    tower: str
    frozen: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    modules: list[nn.Module]
    boundary: str

    def digest(self) -> str:
        """SHA-1 of the frozen weights and buffers (a changed weight never reuses a cache)."""
        h = hashlib.sha1(self.boundary.encode())
        for module in self.modules:
            for name, t in module.state_dict().items():
                h.update(name.encode())
                h.update(
                    t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
        return h.hexdigest()


def _frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _trainable(module: nn.Module) -> bool:
    return all(p.requires_grad for p in module.parameters())


def _run(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        for m in modules:
            x = m(x)
        return x

    return forward


def _stages(trunk: Any) -> list[nn.Module] | None:
    """The forward order of an EfficientNet/MobileNet-style timm trunk, block by block
    (``conv_stem, bn1, blocks[i][j]..., conv_head, bn2``), or None for other trunks."""
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
    if not all(hasattr(trunk, n) for n in names) or not isinstance(trunk.blocks, nn.Sequential):
        return None
    blocks: list[nn.Module] = []
    for stage in trunk.blocks:
        blocks.extend(stage if isinstance(stage, nn.Sequential) else [stage])
    return [trunk.conv_stem, trunk.bn1, *blocks, trunk.conv_head, trunk.bn2]


def image_split(model: Any) -> TowerSplit:
    """The frozen part of ``model.visual`` and the trainable rest.

    Raises:
        ValueError: the image tower is not locked (nothing frozen), or partly locked in a way
            this module cannot cut (the message says which setting to change).
    """
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(visual, "head"):  # open_clip TimmModel
        if _frozen(trunk):
            return TowerSplit(
                "image", trunk, lambda h: visual.head(h), [trunk], f"timm {type(trunk).__name__}"
            )
        stages = _stages(trunk)
        if stages is not None:
            k = 0
            while k < len(stages) and _frozen(stages[k]):
                k += 1
            if k > 0 and all(_trainable(m) for m in stages[k:]):
                rest = _run(stages[k:])
                return TowerSplit(
                    "image",
                    _run(stages[:k]),
                    lambda h: visual.head(trunk.forward_head(rest(h))),
                    stages[:k],
                    f"timm {type(trunk).__name__} after module {k} of {len(stages)}",
                )
        raise ValueError(
            f"the image tower ({type(trunk).__name__}) has no frozen part this cache can cut "
            "at: set lock_image: true (lock_image_unlocked_groups leaves top blocks of "
            "EfficientNet/MobileNet trunks trainable), or drop 'image' from tower_cache"
        )
    if _frozen(visual):
        return TowerSplit(
            "image", visual, lambda h: h, [visual], f"open_clip {type(visual).__name__}"
        )
    raise ValueError(
        f"the image tower ({type(visual).__name__}) is not fully locked: the tower cache "
        "needs lock_image: true with lock_image_unlocked_groups: 0 for this tower, or drop "
        "'image' from tower_cache"
    )


def text_split(model: Any) -> TowerSplit:
    """The frozen part of the text tower and the trainable rest (see :func:`image_split`)."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "pooler"):
        if _frozen(text.transformer):  # open_clip HFTextEncoder

            def frozen(tokens: torch.Tensor) -> torch.Tensor:
                mask = (tokens != text.config.pad_token_id).long()
                # columns after the longest text are padding for every row: cutting them is
                # exact (masked out of attention and pooling) and saves most of the work
                length = max(1, int(mask.sum(dim=1).max()))
                tokens, mask = tokens[:, :length], mask[:, :length]
                return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

            return TowerSplit(
                "text",
                frozen,
                lambda h: text.proj(h),
                [text.transformer],
                f"hf {type(text.transformer).__name__} + {type(text.pooler).__name__}",
            )
        raise ValueError(
            "the text tower's transformer is not fully locked: the tower cache needs "
            "lock_text: true with lock_text_unlocked_layers: 0, or drop 'text' from tower_cache"
        )
    if text is None and hasattr(model, "token_embedding"):  # open_clip's own text tower
        parts = [
            m
            for m in (
                model.token_embedding,
                model.transformer,
                model.ln_final,
                model.text_projection,
            )
            if isinstance(m, nn.Module)
        ]
        if all(_frozen(m) for m in parts) and not any(
            isinstance(p, nn.Parameter) and p.requires_grad
            for p in (model.positional_embedding, model.text_projection)
        ):
            return TowerSplit(
                "text",
                lambda tokens: model.encode_text(tokens),
                lambda h: h,
                [*parts],
                "open_clip text transformer",
            )
    raise ValueError(
        "the text tower is not fully locked: the tower cache needs lock_text: true with "
        "lock_text_unlocked_layers: 0, or drop 'text' from tower_cache"
    )


def freeze_locked_modules(root: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen in eval mode (LiT-style locking).

    Locked parts then use BatchNorm running statistics and no dropout: their outputs depend
    on the input alone (what the tower cache relies on). Parameter-free modules follow
    their parent.
    """
    for child in root.children():
        if _frozen(child):
            child.eval()
        else:
            freeze_locked_modules(child)


def causal_text_length(model: Any, tokens: torch.Tensor) -> int | None:
    """How many leading token positions decide open_clip's causal text features, or None.

    For open_clip's own text transformer (causal mask, end-of-text pooling) the positions
    after the longest text's end token cannot change the pooled features: cutting them is
    exact, and up to context / length times cheaper for short texts such as keywords. None
    where that does not hold (other towers, other pooling, a subclass's own text path).
    """
    import open_clip

    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.CLIP) or mask is None or tokens.numel() == 0:
        return None
    if type(model).encode_text is not open_clip.CLIP.encode_text:
        return None
    causal = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    if not (torch.isinf(mask[causal]).all() and (mask[~causal] == 0).all()):
        return None
    if model.text_pool_type == "argmax":
        end = tokens.argmax(dim=-1)
    elif model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        end = (tokens == model.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    return int(end.max()) + 1


def encode_text_prefix(model: Any, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)`` from the first ``length`` positions
    (exact where :func:`causal_text_length` returned ``length``)."""
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    short = tokens[:, :length]
    x = model.token_embedding(short).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(
        x, short, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    if model.text_projection is not None:
        projection = model.text_projection
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return nn.functional.normalize(x, dim=-1)


def cache_keys(splits: dict[str, TowerSplit], **model: Any) -> dict[str, dict[str, Any]]:
    """What each tower's cached outputs depend on besides the data: ``model`` (name, weights
    tag, image size), the cut, and the frozen weights' digest."""
    return {
        tower: {**model, "tower": tower, "cut": split.boundary, "weights": split.digest()}
        for tower, split in splits.items()
    }


class CachedTowers:
    """The frozen parts of a model's locked towers, run once per sample by a data module's
    tower-output cache, and the trainable heads the module runs on their outputs.

    Args:
        clip_model: the open_clip model (towers already locked).
        towers: which towers to cut: ``"image"``, ``"text"`` or ``"both"``.
        directory: cache folder for the outputs (``"default"``: ``$SCLIP_CACHE/tower_outputs``),
            or None to keep them in memory.
        **key: what the cached outputs depend on besides the data and the frozen weights
            (model name, weights tag, image size).
    """

    def __init__(self, clip_model: Any, towers: str, directory: str | None, **key: Any) -> None:
        from sclip_lightning.models import cache_dir

        which = ("image", "text") if towers == "both" else (towers,)
        split = {"image": image_split, "text": text_split}
        self.splits = {t: split[t](clip_model) for t in which}
        self.keys = cache_keys(self.splits, **key)
        self.directory = str(cache_dir() / "tower_outputs") if directory == "default" else directory
        self._memo: dict[Any, torch.Tensor] = {}

    def attach(self, datamodule: Any, device: Callable[[], torch.device]) -> None:
        """Hand the frozen parts to ``datamodule`` (``use_tower_outputs``), which serves their
        outputs from then on; they run on ``device()`` (the module's device at the time)."""

        def run(tower: str, inputs: torch.Tensor) -> torch.Tensor:
            return self.frozen_outputs(tower, inputs.to(device()))

        datamodule.use_tower_outputs(
            image_fn=(lambda x: run("image", x)) if "image" in self.splits else None,
            text_fn=(lambda x: run("text", x)) if "text" in self.splits else None,
            image_key=self.keys.get("image"),
            text_key=self.keys.get("text"),
            directory=self.directory,
        )

    def head(self, tower: str, outputs: torch.Tensor) -> torch.Tensor:
        """The trainable rest of ``tower`` on its frozen outputs (unnormalised embedding)."""
        return self.splits[tower].head(outputs)

    @torch.no_grad()
    def frozen_outputs(self, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen part of ``tower`` on ``inputs`` (eval mode, no gradient)."""
        split = self.splits[tower]
        modes = [m.training for m in split.modules]
        for m in split.modules:
            m.eval()
        try:
            return split.frozen(inputs)
        finally:
            for m, was in zip(split.modules, modes, strict=True):
                m.train(was)

    def text_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen text outputs of ``tokens``, computed once per distinct token rows (prompts,
        keywords: encoded again every step or evaluation otherwise)."""
        key = (tokens.shape, hash(tokens.cpu().numpy().tobytes()))
        if key not in self._memo:
            self._memo[key] = self.frozen_outputs("text", tokens).cpu()
        return self._memo[key].to(tokens.device)
