"""open_clip model, tokenizer and preprocessing construction.

The package registers its own model JSONs (``model_configs/``: ``sclip-tiny`` for tests and
the demo) with ``open_clip.add_model_config`` on import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2

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


def model_config(model_name: str) -> dict[str, Any]:
    """The open_clip config of ``model_name``, with a helpful error for unknown names."""
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


def build_transforms(model_name: str, is_train: bool, image_size: int | None = None):
    """open_clip preprocessing for ``model_name`` (the config's ``preprocess_cfg`` honoured)."""
    cfg = model_config(model_name)
    size = image_size or cfg["vision_cfg"].get("image_size", 224)
    pp = {
        k: v for k, v in cfg.get("preprocess_cfg", {}).items() if k in PreprocessCfg.__annotations__
    }
    pp["size"] = size
    return image_transform_v2(PreprocessCfg(**pp), is_train=is_train)


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
    return open_clip.create_model(model_name, pretrained=pretrained or None, **kwargs)
