"""Overrides that run any config of configs/ at tiny size on fixture data (shared by the
config tests and the documented-commands test)."""

from __future__ import annotations

import re
from pathlib import Path

from fixtures import (
    write_class_folder,
    write_fashion200k,
    write_fashiongen,
    write_karpathy,
    write_polyvore,
    write_rsicd,
    write_scicap,
)

#: tiny batches on one CPU process in float32, whatever the config asks for
TINY_RUN = [
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--data.init_args.unpaired_batch_size=4",
    "--data.init_args.eval_batch_size=16",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
]


_WRITTEN: dict[tuple[str, str], list[str]] = {}  # (data sets named, folder)


def data_overrides(cfgs: list[Path], tmp_path: Path) -> list[str]:
    """Write fixture data in the configs' native layout (once per folder: a run may still
    hold an HDF5 file open); return the root overrides."""
    text = "\n".join(c.read_text() for c in cfgs)
    key = (" ".join(sorted(set(re.findall(r"(?:unpaired_)?dataset: \w+", text)))), str(tmp_path))
    if key not in _WRITTEN:
        _WRITTEN[key] = _write_data(text, tmp_path)
    return list(_WRITTEN[key])


def _write_data(text: str, tmp_path: Path) -> list[str]:
    big = {"train": 60, "val": 8, "test": 8}
    out: list[str] = []
    if "dataset: rsicd" in text:
        out.append(f"--data.init_args.root={write_rsicd(tmp_path / 'rsicd', big)}")
    if "dataset: rs_all" in text:
        root = tmp_path / "rs"
        write_rsicd(root / "RSICD", big)
        write_karpathy(root / "UCM_captions")
        write_karpathy(root / "Sydney_captions")
        out.append(f"--data.init_args.root={root}")
    if "unpaired_dataset: resisc45" in text:
        res = write_class_folder(tmp_path / "resisc45", per_class=3, classes=["airport", "lake"])
        out.append(f"--data.init_args.unpaired_root={res}")
    if "dataset: fashion_all" in text:
        root = tmp_path / "fashion"
        write_fashion200k(root / "fashion200k", items_per_cat=8)
        write_fashiongen(root / "FashionGen")
        write_polyvore(root / "PolyvoreOutfits")
        out.append(f"--data.init_args.root={root}")
    if "dataset: simpsons" in text:
        from fixtures import write_simpsons

        out.append(f"--data.init_args.root={write_simpsons(tmp_path / 'simpsons', n=50)}")
    if "unpaired_dataset: class_folder" in text:
        chars = write_class_folder(tmp_path / "chars", per_class=3, classes=["homer", "marge"])
        out.append(f"--data.init_args.unpaired_root={chars}")
    if "unpaired_dataset: webdataset" in text:
        from fixtures import write_shards

        out.append(f"--data.init_args.unpaired_root={write_shards(tmp_path / 'shards')}")
    if "dataset: scicap" in text:
        out.append(f"--data.init_args.root={write_scicap(tmp_path / 'scicap', n=45)}")
    return out


def semiclip_overrides(cfgs: list[Path]) -> list[str]:
    """SemiCLIP at fixture size: half the captions as pairs (enough images per concept), two
    concepts per surrogate caption on the tiny HF tower (16 tokens), frequent concepts kept
    on the fashion fixture (its captions share most words)."""
    names = [Path(c).name for c in cfgs]
    if not any(Path(c).parent.name == "semiclip" for c in cfgs):
        return []
    out = ["--data.init_args.label_ratio=0.5"]
    if any(Path(c).parent.name == "real" for c in cfgs):
        out.append("--model.init_args.criterion.init_args.surrogate_words=2")
    if "fashion.yaml" in names:
        out.append(
            "--model.init_args.criterion.init_args.concepts="
            '{"class_path": "sclip_lightning.concepts.ConceptMiner", '
            '"init_args": {"max_fraction": 1.0, "min_images": 2}}'
        )
    return out


def model_overrides(cfgs: list[Path], tiny_lit) -> list[str]:
    """A tiny model for every config (SemiCLIP's fixture-size options too:
    :func:`semiclip_overrides`); the rsicd-mini protocols keep their locked, cached towers
    (the tiny timm + Hugging Face model)."""
    return _tiny_model(cfgs, tiny_lit) + semiclip_overrides(cfgs)


def _tiny_model(cfgs: list[Path], tiny_lit) -> list[str]:
    if any(
        Path(c).parent.name == "real" for c in cfgs
    ):  # the LiT protocol: the tiny timm + HF model, locked, cached
        _, folder = tiny_lit
        return [
            "--model.init_args.model_name=sclip-tiny-lit",
            f"--model.init_args.model_config_dir={folder}",
            "--model.init_args.image_size=null",
            "--model.init_args.pretrained=null",
            "--model.init_args.tower_cache_dir=null",
            "--data.init_args.keywords=mine",
            "--data.init_args.num_keywords=5",
        ]
    return ["--model.init_args.model_name=sclip-tiny", "--model.init_args.pretrained=null"]
