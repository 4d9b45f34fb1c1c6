"""SCLIPModule: training changes weights and lowers the loss, optimiser set-up, hooks."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule
from sclip_lightning.losses import CLIPLoss, SCLIPLoss
from sclip_lightning.metrics import retrieval_ranks, retrieval_recall


def fixed_batch(module: SCLIPModule, bp=8, bu=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = module.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    tokens = module.tokenizer(
        [f"caption number {i} about {['lake', 'forest'][i % 2]}" for i in range(bp)]
    )
    return {
        "paired": {
            "image": torch.randn(bp, 3, size, size, generator=g),
            "text": tokens,
            "keywords": torch.rand(bp, k, generator=g) < 0.5,
        },
        "unpaired": {"image": torch.randn(bu, 3, size, size, generator=g)},
    }


def make_module(**kw) -> SCLIPModule:
    kw.setdefault("keyword_vocabulary", ["lake", "forest", "river", "beach"])
    m = SCLIPModule(model_name="sclip-tiny", **kw)
    m.setup("fit")
    return m


@pytest.mark.parametrize(
    "criterion",
    [
        SCLIPLoss,
        # the release's OT path (POT solver in float64, plan not detached); its linear keyword
        # weighting is swapped for softmax because sim/sum(sim) explodes on this random batch
        # (see test_linear_weighting_breaks_where_softmax_does_not)
        lambda: SCLIPLoss.released(keyword_weighting="softmax"),
        CLIPLoss,
    ],
    ids=["sclip", "released", "clip"],
)
def test_loss_falls_on_a_fixed_batch(criterion):
    torch.manual_seed(0)
    m = make_module(criterion=criterion())
    batch = fixed_batch(m)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    losses = []
    for _ in range(30):
        terms = m.compute_losses(batch)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    changed = [n for n, p in m.named_parameters() if not torch.equal(before[n], p)]
    assert any("visual" in n for n in changed) and any("transformer" in n for n in changed)
    if isinstance(m.criterion, CLIPLoss):
        assert list(terms) == ["contrastive_loss"]
    else:
        assert float(terms["caption_loss"]) > 0 and float(terms["keyword_loss"]) > 0


def test_clip_baseline_ignores_unpaired_images():
    m = make_module(criterion=CLIPLoss())
    batch = fixed_batch(m)
    with_u = m.compute_losses(batch)
    without = m.compute_losses({"paired": batch["paired"]})
    torch.testing.assert_close(with_u["contrastive_loss"], without["contrastive_loss"])
    assert not m.uses_unpaired and make_module().uses_unpaired


def test_optimizer_groups_and_logit_scale_clamp(synthetic_root):
    L.seed_everything(0)
    dm = SCLIPDataModule(num_workers=0, batch_size=8, unpaired_batch_size=8)
    m = SCLIPModule(model_name="sclip-tiny", lr=1.0, warmup_steps=2)  # huge lr: scale explodes
    trainer = quiet_cpu_trainer(max_steps=3)
    trainer.fit(m, dm)
    # clamped in float32: float32(log 100) is within half an ulp (2.4e-7) of log 100
    assert float(m.model.logit_scale) <= math.log(100) + 1e-6
    opt = trainer.optimizers[0]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(m.model.logit_scale) in ids
    for n, p in m.model.named_parameters():
        if p.ndim < 2:
            assert id(p) in ids, n
    assert m.keywords == dm.keyword_list


def test_lr_schedule_warmup_then_cosine(synthetic_root):
    dm = SCLIPDataModule(num_workers=0, batch_size=8, unpaired_batch_size=8)
    m = SCLIPModule(model_name="sclip-tiny", lr=0.1, warmup_steps=4)
    trainer = quiet_cpu_trainer(max_steps=12)
    lrs = []

    class Rec(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer.callbacks.append(Rec())
    trainer.fit(m, dm)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] < 0.01


def test_lock_towers_freeze_parameters():
    m = make_module(lock_image=True, lock_text=True)
    assert not any(p.requires_grad for p in m.model.visual.parameters())
    assert not m.model.transformer.resblocks[0].attn.in_proj_weight.requires_grad


def test_an_objective_option_reaches_the_loss():
    m = make_module(criterion=SCLIPLoss(keyword_weight=0.0), keyword_vocabulary=["lake"])
    terms = m.compute_losses(fixed_batch(m, k=1))
    assert float(terms["keyword_loss"]) == 0 and float(terms["caption_loss"]) > 0
    assert not m.uses_keywords  # the keyword texts are not even encoded


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="tower_cache must be one of"):
        SCLIPModule(model_name="sclip-tiny", tower_cache="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown open_clip model"):
        SCLIPModule(model_name="NoSuchModel-B-99")
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found"):
        SCLIPModule(model_name="sclip-tiny", pretrained="/nope/weights.pt")


def naive_recall(img, txt, owner, k):
    sims = img @ txt.T
    i2t = sum(
        any(owner[j] == i for j in sims[i].topk(k).indices.tolist()) for i in range(img.shape[0])
    )
    t2i = sum(int(owner[j]) in sims[:, j].topk(k).indices.tolist() for j in range(txt.shape[0]))
    return 100 * i2t / img.shape[0], 100 * t2i / txt.shape[0]


@pytest.mark.parametrize("max_elements", [7, 50, 1 << 20])
def test_chunked_retrieval_recall_matches_naive(max_elements):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(13, 8, generator=g), dim=-1)
    owner = torch.repeat_interleave(torch.arange(13), torch.randint(1, 5, (13,), generator=g))
    txt = torch.nn.functional.normalize(
        img[owner] + 0.8 * torch.randn(len(owner), 8, generator=g), dim=-1
    )
    # float32 scores: both ways err by <= gamma_8 = 8 * 2^-24 = 5e-7 each (any summation
    # order), while two scores of one query differ by >= 1.9e-5 here, 1.8e-5 away from the
    # tie tolerance (1e-6) too: no comparison can come out differently
    got = retrieval_recall(img, txt, owner, ks=(1, 5), max_elements=max_elements)
    for k in (1, 5):
        i2t, t2i = naive_recall(img, txt, owner, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    a, b = retrieval_ranks(img, txt, owner, max_elements)
    assert a.shape == (13, 3) and b.shape == (*owner.shape, 3)


PLAN = [[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.25, 0.75], [0, 0, 0, 1.0]]


@pytest.mark.parametrize("preset", [SCLIPLoss, SCLIPLoss.released])
def test_custom_assigner_drives_training_and_the_pseudo_label_metric(preset):
    """A custom assigner is the plan the loss trains on (hand computed) and the plan
    ``train/pseudo_label_acc`` scores, in both presets."""
    from helpers import FixedPlan

    criterion = preset(caption_weight=1.0, keyword_weight=0.0, assigner=FixedPlan(PLAN))
    torch.manual_seed(0)  # weights whose log-softmax tells plans apart (a shifted PLAN: 0.17)
    m = make_module(criterion=criterion, keyword_vocabulary=[])
    # float64 towers: the expected value below encodes the 4 unpaired images alone, the loss
    # with the paired ones (other shapes, other kernels); in float64 both give the loss the
    # same float32 features (SCLIPLoss casts), so only the loss's own float32 arithmetic is left
    m = m.double()
    batch = fixed_batch(m, bp=4, bu=4)
    for part in ("paired", "unpaired"):
        batch[part]["image"] = batch[part]["image"].double()
    batch["paired"]["label"] = torch.tensor([0, 1, 2, 3])
    unpaired_labels = torch.tensor([1, 0, 2, 0])  # argmax of PLAN rows: 1, 0, 3, 3
    terms = m.compute_losses(batch)
    with torch.no_grad():
        u = m.encode_images(batch["unpaired"]["image"])
        y = m.encode_texts(batch["paired"]["text"])
        log_p = torch.log_softmax(m.logit_scale() * u @ y.T, dim=-1)
        expected = -(torch.tensor(PLAN, dtype=log_p.dtype) * log_p).sum(-1).mean()
    # The loss in float32: each logit s * u.y (unit vectors, D = 64, s = 14.3) is within
    # s * (64 + 2) * 2^-24 = 5.6e-5 of its exact value in any summation order; a log-softmax
    # moves by at most twice its logits' largest error, and a mean of rows weighted by plan
    # rows that sum to 1 no more: |error| <= 1.2e-4 (+ ~3e-6 of float32 log-softmax rounding).
    torch.testing.assert_close(terms["caption_loss"].detach().double(), expected, atol=2e-4, rtol=0)
    acc = m.criterion.train_metrics(unpaired_labels)["pseudo_label_acc"]
    assert float(acc) == pytest.approx(2 / 4)


def test_hidden_labels_are_logged_during_training(synthetic_root):
    dm = SCLIPDataModule(num_workers=0, batch_size=8, unpaired_batch_size=8, hidden_labels=True)
    m = SCLIPModule(model_name="sclip-tiny")
    trainer = quiet_cpu_trainer(max_steps=2)
    trainer.fit(m, dm)
    acc = float(trainer.callback_metrics["train/pseudo_label_acc_step"])
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="hidden_labels"):
        table = str(synthetic_root / "captions.csv")
        bad = SCLIPDataModule(dataset="caption_table", root=table, hidden_labels=True)
        bad.setup("fit")


def test_short_keyword_encoding_is_exact():
    m = make_module(keyword_vocabulary=["lake", "baseball field", "dense residential area", "x"])
    assert (
        m._keyword_length is not None
        and m._keyword_length < m.get_buffer("keyword_tokens").shape[1]
    )
    m = m.double().eval()  # float64: the two sequence lengths run other kernels and sums
    full = m.encode_texts(m.get_buffer("keyword_tokens"))
    # float64 defaults (rtol, atol 1e-7): the difference is float64 rounding (~1e-16 here)
    torch.testing.assert_close(m.encode_keywords(), full)


def test_one_test_run_evaluates_several_sets_with_a_template_ensemble(synthetic_root, tmp_path):
    import json

    from fixtures import write_caption_table, write_class_folder

    classes = write_class_folder(tmp_path / "cls", per_class=2, classes=["lake", "forest"])
    table = write_caption_table(tmp_path / "tab", n=10)
    dm = SCLIPDataModule(
        num_workers=0,
        eval_batch_size=7,
        zeroshot=["synthetic", f"class_folder={classes}"],
        retrieval=["synthetic", f"caption_table={table}"],
        templates=["an aerial photograph of {}.", "a satellite image of {}."],
        retrieval_protocol="all",
    )
    m = SCLIPModule(model_name="sclip-tiny", results_dir=str(tmp_path / "res"))
    L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    ).test(m, dm)
    names = [(r["dataset"], r["split"], r["task"]) for r in m.test_results]
    assert names == [  # named by data set, never by root
        ("synthetic", "test", "zero-shot"),
        ("class_folder", "test", "zero-shot"),
        ("synthetic", "test", "retrieval"),
        ("caption_table", "test", "retrieval"),
    ]
    rows = json.loads((tmp_path / "res" / "results.json").read_text())
    assert len(rows) == 4 and all(0 <= r.get("top1", 0) <= 100 for r in rows)
    assert {"i2t_R@1", "t2i_R@10", "mean_R"} <= set(rows[2])
    assert (tmp_path / "res" / "results.md").read_text().count("\n") >= 6


def test_eval_deduplicates_images_repeated_by_distributed_samplers():
    from sclip_lightning.evaluation import captions_of_first_copy, unique_first

    idx = torch.tensor([0, 1, 2, 0])  # image 0 padded in twice
    owner = torch.tensor([0, 0, 1, 2, 0, 0])  # its 2 captions arrive twice
    assert captions_of_first_copy(owner, idx).tolist() == [True, True, True, True, False, False]
    uniq, first = unique_first(idx)
    assert uniq.tolist() == [0, 1, 2] and first.tolist() == [0, 1, 2]
    no_dup = captions_of_first_copy(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert no_dup.tolist() == [True, True]


@pytest.mark.ddp
@pytest.mark.slow  # 50 s of fresh processes: `make test-slow` (make test stays under 15 min)
def test_retrieval_evaluation_memory_stays_within_its_stated_bound():
    """bench/retrieval_memory.py at a small scale, one process and 2 DDP ranks (fresh
    processes: peak RSS is per process): every rank within the bound (which the full 4k x 20k
    similarity matrix would exceed), and the same recalls on every rank and rank count."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "retrieval_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--images", "4000", "--captions", "20000",
         "--max-elements", str(1 << 22), "--ranks", "1", "2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    one, two = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for stats in (one, two):
        for rank in stats["per_rank"]:
            assert rank["peak_rss_mb"] <= rank["bound_mb"], stats
        assert stats["bound_mb"] - stats["rss_with_features_mb"] < stats["full_matrix_mb"], stats
        assert stats["same_on_every_rank"], stats
    assert one["mean_R"] == two["mean_R"]


def test_test_prints_one_table_in_percent(synthetic_root, tmp_path, capsys):
    """`test` prints the results table once (the same as results.md), in percent, and not
    Lightning's own table (which repeats every number under every dataloader)."""
    dm = SCLIPDataModule(num_workers=0, eval_batch_size=64)
    m = SCLIPModule(model_name="sclip-tiny", results_dir=str(tmp_path))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(m, dm)
    out = capsys.readouterr().out
    table = (tmp_path / "results.md").read_text().strip()
    assert out.count(table) == 1 and "(percent" in out
    assert "DataLoader 0" not in out
    retrieval = next(r for r in m.test_results if r["task"] == "retrieval")
    assert retrieval["i2t_R@10"] > 1.0  # tens of images per class: not a fraction


def test_evaluation_numbers_are_percent():
    from sclip_lightning.evaluation import EvalSpec, Evaluation

    feats = torch.nn.functional.normalize(
        torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    ev = Evaluation([EvalSpec("a", "retrieval"), EvalSpec("b", "zeroshot")], {1: feats[:3]})
    ev.add_retrieval(0, feats, torch.arange(6), feats, torch.arange(6))
    ev.add_zeroshot(1, feats[:3], torch.arange(3), torch.arange(3))
    retrieval, zeroshot = ev.compute()
    assert retrieval["i2t_R@1"] == retrieval["t2i_R@1"] == retrieval["mean_R"] == 100.0
    assert zeroshot["top1"] == 100.0


def test_objectives_without_prompts_never_build_a_prompt_encoder(synthetic_root, monkeypatch):
    """Only an objective that overrides bind_text_tower gets the text tower as a
    PromptEncoder: S-CLIP and CLIP train on models PromptEncoder does not support."""
    from sclip_lightning.prompts import PromptEncoder

    def unsupported(*args, **kwargs):
        raise TypeError("no PromptEncoder for this text tower")

    monkeypatch.setattr(PromptEncoder, "for_model", unsupported)
    L.seed_everything(0)
    dm = SCLIPDataModule(num_workers=0, batch_size=8, unpaired_batch_size=8)
    m = SCLIPModule(model_name="sclip-tiny")
    quiet_cpu_trainer(max_steps=1).fit(m, dm)
    assert m.trainer.global_step == 1
