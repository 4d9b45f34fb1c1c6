"""Export a trained SCLIPModule checkpoint to plain open_clip weights.

``sclip-export CHECKPOINT OUT.pt`` (or ``python -m sclip_lightning.export``) writes the
open_clip model's state dict; then, anywhere open_clip is installed::

    model = open_clip.create_model("<model_name>", pretrained="OUT.pt")

A sidecar ``OUT.json`` records the model name (and the model config when it is not one of
open_clip's built-in ones, so it can be registered with ``open_clip.add_model_config``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

PREFIX = "model."


def open_clip_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The open_clip weights inside a Lightning checkpoint of :class:`SCLIPModule`."""
    state = checkpoint.get("state_dict")
    if state is None:
        raise KeyError("not a Lightning checkpoint: no 'state_dict' entry")
    out = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not out:
        raise KeyError(f"no '{PREFIX}*' weights in the checkpoint: was it saved by SCLIPModule?")
    return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's content, loaded with ``weights_only=True`` (tensors, numbers, strings,
    containers: never code). SCLIPModule checkpoints hold nothing else.

    Raises:
        ValueError: the file holds pickled Python objects; loading them could run code.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it holds pickled Python objects, and unpickling an "
            "untrusted checkpoint can run arbitrary code (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]}). Checkpoints written by SCLIPModule hold only tensors "
            "and plain values; if you trust this file, load it yourself with "
            "torch.load(..., weights_only=False) and save its 'state_dict'."
        ) from None


def export(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write ``out_path`` (open_clip state dict) and ``out_path.json`` (model name, config)."""
    import open_clip

    ckpt_path = Path(checkpoint_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    state = open_clip_state_dict(ckpt)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    hp = ckpt.get("hyper_parameters", {})
    name = hp.get("model_name")
    meta: dict[str, Any] = {"model_name": name, "source_checkpoint": str(ckpt_path)}
    if name is not None:
        from sclip_lightning.models import CONFIG_DIR

        if (CONFIG_DIR / f"{name}.json").is_file() or hp.get("model_config_dir"):
            meta["model_config"] = open_clip.get_model_config(name)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="Lightning checkpoint of an SCLIPModule (.ckpt)")
    p.add_argument("out", help="output file for the open_clip state dict (.pt)")
    args = p.parse_args(argv)
    path = export(args.checkpoint, args.out)
    meta = json.loads(path.with_suffix(".json").read_text())
    print(
        f"wrote {path} (open_clip.create_model({meta['model_name']!r}, pretrained={str(path)!r}))"
    )


if __name__ == "__main__":
    main()
