"""Locked towers: which part of an open_clip tower is frozen, and where it ends.

A tower locked with ``lock_image`` / ``lock_text`` (LiT-style adaptation) has a frozen part
whose outputs never change during training, and a trainable rest (the projection, or the
top blocks left unlocked). :func:`image_split` / :func:`text_split` find that boundary, so
the frozen part can run once per sample (the tower-output cache, ``tower_cache``) and
training runs only the rest. :func:`freeze_locked_modules` keeps frozen parts in eval mode
(no dropout, BatchNorm running statistics), so their outputs are a function of the input
alone, with or without the cache.

The cache pass runs each frozen part once over a whole data set; :attr:`TowerSplit.inference`
builds a faster equivalent for that pass where one is known (timm EfficientNet-style trunks:
a copy with BatchNorm folded into the convolution before it, channels-last layout, CPU batches
of :data:`CPU_BATCH`), equal to the frozen part up to float rounding
(``bench/tower_cache.py`` measures both).

Supported boundaries:

- image, open_clip ``TimmModel`` (e.g. the offline EfficientNet-lite0): the frozen prefix of
  the timm trunk; at a block boundary for EfficientNet/MobileNet-style trunks (top blocks
  unlocked with ``lock_image_unlocked_groups``), after the pooled trunk otherwise;
- image, open_clip's own towers (ViT, ModifiedResNet): the whole tower when fully locked;
- text, open_clip ``HFTextEncoder`` (e.g. MiniLM): transformer + pooler when fully locked;
- text, open_clip's own transformer: the whole tower when fully locked.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator
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
        inference: builds, for one pass over a data set, a faster function equal to
            ``frozen`` up to float rounding (see :func:`inference_copy`); None: use
            ``frozen`` itself.
    """

    tower: str
    frozen: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    modules: list[nn.Module]
    boundary: str
    inference: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None

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


#: images per forward of the CPU cache pass: EfficientNet-lite0 at 150 px runs faster in
#: batches of 16-32 than of 128 on a 2-core CPU (smaller activations stay in the processor's
#: caches; docs/performance.md, bench/tower_cache.py --breakdown); other devices take the
#: loader's batch whole
CPU_BATCH = 32


def _fold_pairs() -> dict[Any, tuple[tuple[str, str], ...]]:
    """(convolution, BatchNorm) attribute pairs that a module's forward runs back to back,
    keyed by the forward function (a subclass with its own forward is not matched)."""
    try:
        from timm.models import _efficientnet_blocks as blocks
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # pragma: no cover - timm comes with open_clip's timm towers
        return {}
    s2d = ("conv_s2d", "bn_s2d")
    return {
        blocks.ConvBnAct.forward: (("conv", "bn1"),),
        blocks.DepthwiseSeparableConv.forward: (s2d, ("conv_dw", "bn1"), ("conv_pw", "bn2")),
        blocks.InvertedResidual.forward: (
            s2d,
            ("conv_pw", "bn1"),
            ("conv_dw", "bn2"),
            ("conv_pwl", "bn3"),
        ),
        blocks.EdgeResidual.forward: (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
        EfficientNet.forward_features: (("conv_stem", "bn1"), ("conv_head", "bn2")),
    }


def _fold_pair(conv: Any, bn: Any) -> nn.Module | None:
    """Fold eval-mode BatchNorm ``bn`` into the convolution ``conv`` that feeds it (in place)
    and return what replaces ``bn`` (its dropout and activation); None, and ``conv``
    unchanged, where either is not a plain 2-D convolution / BatchNorm with running stats.

    ``bn(conv(x)) = conv'(x)`` with ``W' = W * s``, ``b' = beta + (b - mean) * s``,
    ``s = gamma / sqrt(var + eps)`` per output channel (computed in float64)."""
    from timm.layers import BatchNormAct2d, Conv2dSame

    conv_forwards = (nn.Conv2d.forward, Conv2dSame.forward)
    if not isinstance(conv, nn.Conv2d) or type(conv).forward not in conv_forwards:
        return None
    if type(bn).forward not in (nn.BatchNorm2d.forward, BatchNormAct2d.forward):
        return None
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    with torch.no_grad():
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        weight = conv.weight.double() * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias = nn.Parameter(
            (beta + (bias - mean) * scale).to(conv.weight.dtype), requires_grad=False
        )
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def fold_batchnorm(root: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of ``root`` that directly follows a convolution in a
    known timm EfficientNet-style forward into that convolution (in place: use on a copy).
    Returns how many were folded."""
    pairs = _fold_pairs()
    folded = 0
    for module in list(root.modules()):
        kind = type(module)
        known = pairs.get(kind.forward) or pairs.get(getattr(kind, "forward_features", None))
        for conv_name, bn_name in known or ():
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            replacement = None if conv is None or bn is None else _fold_pair(conv, bn)
            if replacement is not None:
                setattr(module, bn_name, replacement)
                folded += 1
    return folded


def inference_copy(
    modules: list[nn.Module],
    forward: Callable[[list[nn.Module]], Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[[], Callable[[torch.Tensor], torch.Tensor]]:
    """A builder of the cache pass's version of a frozen image part.

    Args:
        modules: the frozen modules (the split's ``modules``).
        forward: copies of ``modules`` -> the frozen function over them (as ``frozen`` is
            over ``modules``).

    Returns:
        A function that copies the modules (eval mode), folds BatchNorm into the
        convolutions before it (adjacent entries of ``modules`` and, inside each module,
        the pairs of :func:`fold_batchnorm`), converts the copy to channels-last layout, and
        returns pixels -> outputs (contiguous), run in batches of :data:`CPU_BATCH` on a CPU.
        Its outputs equal ``frozen``'s up to float rounding (the summation order of the
        channels-last kernels and of the folded weights differ).
    """

    def build() -> Callable[[torch.Tensor], torch.Tensor]:
        copies = list(copy.deepcopy(nn.ModuleList(modules)).eval())
        for i in range(len(copies) - 1):  # e.g. (conv_stem, bn1) of a cut trunk's stages
            replacement = _fold_pair(copies[i], copies[i + 1])
            if replacement is not None:
                copies[i + 1] = replacement
        for module in copies:
            fold_batchnorm(module)
            module.to(memory_format=torch.channels_last)
        run = forward(copies)

        def frozen(pixels: torch.Tensor) -> torch.Tensor:
            chunks = pixels.split(CPU_BATCH) if pixels.device.type == "cpu" else (pixels,)
            outs = [run(c.contiguous(memory_format=torch.channels_last)) for c in chunks]
            return torch.cat(outs).contiguous()

        return frozen

    return build


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
                "image",
                trunk,
                lambda h: visual.head(h),
                [trunk],
                f"timm {type(trunk).__name__}",
                inference_copy([trunk], lambda copies: copies[0]),
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
                    inference_copy(stages[:k], _run),
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


@contextlib.contextmanager
def running_stats_kept(root: nn.Module, keep: bool = True) -> Iterator[None]:
    """Inside, the training BatchNorm layers of ``root`` normalise with their batch's
    statistics as in train mode but leave their running statistics (and batch count) as
    they are: for a forward of inputs that evaluation should not be calibrated on (SemiCLIP's
    strong views, ``strong_view_norm_stats: keep``). No host synchronisation. ``keep=False``:
    nothing changes (train mode as usual)."""
    if not keep:  # the default path of every step: no walk over the modules
        yield
        return
    norms = [m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.training and m.track_running_stats]
    for m in norms:  # train mode without tracking: batch statistics, no update
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


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
        precision: the Trainer's precision. A converted one (``64-true``, ``16-true``,
            ``bf16-true``) runs the frozen weights in another dtype: other outputs, so it keys
            its own files; ``32-true`` and the mixed precisions (the cache pass runs outside
            autocast) compute in float32 and share the float32 files.
        **key: what the cached outputs depend on besides the data and the frozen weights
            (model name, weights tag, image size).
    """

    def __init__(
        self,
        clip_model: Any,
        towers: str,
        directory: str | None,
        precision: str = "32-true",
        **key: Any,
    ) -> None:
        from sclip_lightning.models import cache_dir

        which = ("image", "text") if towers == "both" else (towers,)
        split = {"image": image_split, "text": text_split}
        self.splits = {t: split[t](clip_model) for t in which}
        if precision.endswith("-true") and precision != "32-true":
            key["precision"] = precision
        self.keys = cache_keys(self.splits, **key)
        self.directory = str(cache_dir() / "tower_outputs") if directory == "default" else directory
        self._memo: dict[Any, torch.Tensor] = {}

    def attach(self, datamodule: Any, device: Callable[[], torch.device]) -> None:
        """Hand the frozen parts to ``datamodule`` (``use_tower_outputs``), which serves their
        outputs from then on; they run on ``device()`` (the module's device at the time), one
        :meth:`frozen_pass` per data set."""

        def opener(tower: str) -> Callable[[], Any] | None:
            return (lambda: self.frozen_pass(tower, device())) if tower in self.splits else None

        datamodule.use_tower_outputs(
            image_pass=opener("image"),
            text_pass=opener("text"),
            image_key=self.keys.get("image"),
            text_key=self.keys.get("text"),
            directory=self.directory,
        )

    @contextlib.contextmanager
    def frozen_pass(
        self, tower: str, device: torch.device | None = None
    ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """The frozen part of ``tower`` for one pass over a data set (the cache pass): the
        split's inference copy where it has one (:func:`inference_copy`), the frozen part
        itself otherwise; inputs are moved to ``device`` (default: the weights' device) and
        pixels to the weights' dtype; no gradient, eval mode."""
        with self._eval(tower) as split:
            frozen = split.inference() if split.inference is not None else split.frozen

            @torch.no_grad()
            def run(inputs: torch.Tensor) -> torch.Tensor:
                return frozen(_as_weights(split, inputs, device))

            yield run

    def head(self, tower: str, outputs: torch.Tensor) -> torch.Tensor:
        """The trainable rest of ``tower`` on its frozen outputs (unnormalised embedding)."""
        return self.splits[tower].head(outputs)

    @torch.no_grad()
    def frozen_outputs(self, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen part of ``tower`` on ``inputs`` (the training modules themselves: eval
        mode, no gradient; pixels in the weights' dtype)."""
        with self._eval(tower) as split:
            return split.frozen(_as_weights(split, inputs, None))

    @contextlib.contextmanager
    def _eval(self, tower: str) -> Iterator[TowerSplit]:
        split = self.splits[tower]
        modes = [m.training for m in split.modules]
        for m in split.modules:
            m.eval()
        try:
            yield split
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


def _as_weights(
    split: TowerSplit, inputs: torch.Tensor, device: torch.device | None
) -> torch.Tensor:
    """``inputs`` on ``device`` (None: the frozen weights' device), pixels in the frozen
    weights' dtype (what the precision plugin does to a batch: 64-true gets float64 pixels)."""
    weight = next(split.modules[0].parameters(), None)
    if device is None and weight is not None:
        device = weight.device
    inputs = inputs.to(device) if device is not None else inputs
    if inputs.is_floating_point() and weight is not None and weight.is_floating_point():
        inputs = inputs.to(weight.dtype)
    return inputs
