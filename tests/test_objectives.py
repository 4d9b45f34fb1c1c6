"""Objectives and assigners as components: a user's own, defined here with no change to the
package, train and test through `sclip fit` / `sclip test` by class path; checkpoints rebuild
every objective; wrong options are rejected naming what is allowed."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from sclip_lightning import SCLIPModule
from sclip_lightning.cli import main
from sclip_lightning.losses import (
    Assigner,
    CLIPLoss,
    EntropicAssigner,
    Features,
    HardNNAssigner,
    Objective,
    OTAssigner,
    SCLIPLoss,
    SoftNNAssigner,
    UnbalancedOTAssigner,
    contrastive_loss,
)
from sclip_lightning.losses.component import Component

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class ClipPlusSpread(CLIPLoss):
    """A user's objective: CLIP's loss plus a toy term that spreads the unpaired features
    (their mean similarity to each other, weighted)."""

    def __init__(self, spread_weight: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spread_weight = spread_weight
        self.calls = 0

    @property
    def uses_unpaired(self) -> bool:
        return True

    def compute(self, f: Features) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = super().compute(f)
        assert f.unpaired is not None  # the module encodes them because we said so
        out["spread_loss"] = self.spread_weight * (f.unpaired @ f.unpaired.T).mean()
        return out


class NearestCaption(Assigner):
    """A user's assigner: each unpaired image takes the support caption it is closest to."""

    def __init__(self, temperature: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self.calls = 0

    def plan(self, query, support, logit_scale, support_mask):
        self.calls += 1
        scores = query @ support.T / self.temperature
        if support_mask is not None:
            scores = scores.masked_fill(~support_mask, float("-inf"))
        return scores.softmax(dim=-1)


def _run(tmp_path: Path, *extra: str) -> SCLIPModule:
    common = [
        "--config", str(DEMO),
        "--model.init_args.model_name=sclip-tiny",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8",
        "--data.init_args.unpaired_batch_size=8",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.results_dir={tmp_path / 'results'}",
        *extra,
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps=2", "--trainer.log_every_n_steps=1"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    main(["test", *common, f"--ckpt_path={ckpt}"])
    assert "zero-shot" in (tmp_path / "results" / "results.md").read_text()
    return SCLIPModule.load_from_checkpoint(ckpt)


def test_a_custom_objective_trains_and_tests_through_the_cli(tmp_path, synthetic_root):
    objective = tmp_path / "objective.yaml"
    objective.write_text(
        "model:\n  init_args:\n    criterion:\n"
        "      class_path: test_objectives.ClipPlusSpread\n"
        "      init_args:\n        spread_weight: 0.25\n"
    )
    loaded = _run(tmp_path, "--config", str(objective))
    assert type(loaded.criterion) is ClipPlusSpread and loaded.criterion.spread_weight == 0.25
    fit_log = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert "train/spread_loss" in fit_log.read_text().splitlines()[0]  # the term trained


def test_a_custom_assigner_drives_sclip_through_the_cli(tmp_path, synthetic_root):
    loaded = _run(
        tmp_path,
        "--model.init_args.criterion.init_args.assigner=test_objectives.NearestCaption",
        "--model.init_args.criterion.init_args.assigner.init_args.temperature=0.5",
    )
    assert isinstance(loaded.criterion, SCLIPLoss)
    assert type(loaded.criterion.assigner) is NearestCaption
    assert loaded.criterion.assigner.temperature == 0.5


def test_the_custom_assigner_is_the_plan_training_uses(synthetic_root):
    """Through the module, not the CLI: the hook is called every step."""
    import lightning as L
    from helpers import quiet_cpu_trainer

    from sclip_lightning import SCLIPDataModule

    L.seed_everything(0)
    assigner = NearestCaption()
    module = SCLIPModule(model_name="sclip-tiny", criterion=SCLIPLoss(assigner=assigner))
    data = SCLIPDataModule(
        dataset="synthetic", batch_size=8, unpaired_batch_size=8, num_workers=0,
        model_name="sclip-tiny",
    )  # fmt: skip
    quiet_cpu_trainer(max_steps=3).fit(module, data)
    assert assigner.calls == 3


@pytest.mark.parametrize(
    "criterion",
    [
        CLIPLoss(),
        SCLIPLoss(),
        SCLIPLoss.released(),
        SCLIPLoss(support_bank_size=-1, assigner=UnbalancedOTAssigner(reg_m=0.2)),
        SCLIPLoss(assigner=OTAssigner(sinkhorn_solver="log", detach_plan=True)),
        ClipPlusSpread(spread_weight=0.5, gather_distributed=False),
        SCLIPLoss(assigner=NearestCaption(temperature=0.3, assigner_support="text")),
    ],
    ids=["clip", "sclip", "released", "bank-uot", "ot-log-detached", "custom", "custom-assigner"],
)
def test_load_from_checkpoint_rebuilds_the_objective(criterion, tmp_path, synthetic_root):
    """A module built in Python with an objective instance: its checkpoint names the
    objective and every option (nested assigner too), and load_from_checkpoint rebuilds it."""
    import lightning as L
    from helpers import quiet_cpu_trainer

    from sclip_lightning import SCLIPDataModule

    L.seed_everything(0)
    module = SCLIPModule(model_name="sclip-tiny", criterion=criterion)
    data = SCLIPDataModule(
        dataset="synthetic", batch_size=8, unpaired_batch_size=8, num_workers=0,
        model_name="sclip-tiny",
    )  # fmt: skip
    trainer = quiet_cpu_trainer(max_steps=1)
    trainer.fit(module, data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = SCLIPModule.load_from_checkpoint(path)
    assert type(loaded.criterion) is type(criterion)
    assert loaded.criterion.config() == criterion.config()
    saved, again = module.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys()
    for name, value in saved.items():  # weights, and the support bank's extra state
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[name], value), name
        else:
            for key, t in value["state"].items():
                assert torch.equal(again[name]["state"][key], t), (name, key)


def test_a_checkpoint_never_imports_code(tmp_path):
    from sclip_lightning.losses import build_component

    config = {"class_path": "some_unimported_pkg.Loss", "init_args": {}}
    with pytest.raises(ValueError, match="import some_unimported_pkg first"):
        build_component(config, Objective)
    with pytest.raises(ValueError, match="not an imported Objective"):
        build_component({"class_path": "torch.nn.Linear"}, Objective)


@pytest.mark.parametrize(
    "arg,named",
    [
        ("--model.init_args.criterion.init_args.keyword_weighing=linear", "keyword_weighing"),
        ("--model.init_args.criterion.init_args.keyword_weighting=sigmoid", "sigmoid"),
        ("--model.init_args.criterion.init_args.assigner.init_args.sinkhorn_solver=exact", "exact"),
        ("--model.init_args.scheduler=linear", "linear"),
        ("--model.init_args.criterion=sclip_lightning.losses.NoSuchLoss", "NoSuchLoss"),
    ],
)
def test_a_wrong_option_is_rejected_naming_it(arg, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(DEMO), "--config", str(DEMO.parent / "objectives" /
              "sclip_one_gpu.yaml"), arg, "--print_config"])  # fmt: skip
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert named in err, err[-2000:]
    if "=" in arg and "weighing" in arg:  # a misspelt option: what is accepted is listed
        assert "did you mean 'keyword_weighting'" in err


def test_python_callers_get_the_allowed_values():
    with pytest.raises(
        ValueError, match=r"keyword_weighting must be one of \['linear', 'softmax'\]"
    ):
        SCLIPLoss(keyword_weighting="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"assigner_support must be one of \['image', 'text'\]"):
        SoftNNAssigner(assigner_support="caption")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scheduler must be one of"):
        SCLIPModule(model_name="sclip-tiny", scheduler="linear")  # type: ignore[arg-type]


def test_every_option_is_declared_in_one_signature():
    """No objective or assigner option appears in two constructors: subclasses forward their
    bases' options with **kwargs (LightningCLI and the config record follow them)."""
    classes = [
        Objective, CLIPLoss, SCLIPLoss, Assigner, EntropicAssigner, OTAssigner,
        UnbalancedOTAssigner, SoftNNAssigner, HardNNAssigner,
    ]  # fmt: skip
    seen: dict[str, str] = {}
    for cls in classes:
        if "__init__" not in cls.__dict__:
            continue
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or p.kind is p.VAR_KEYWORD:
                continue
            assert name not in seen, f"{name} declared by {seen.get(name)} and {cls.__name__}"
            seen[name] = cls.__name__
    assert {"gather_distributed", "assigner_support", "sinkhorn_iters", "reg_m"} <= set(seen)
    module_args = set(inspect.signature(SCLIPModule.__init__).parameters)
    assert not module_args & set(seen) - {"criterion"}


def test_components_record_their_arguments_even_through_kwargs():
    a = UnbalancedOTAssigner(reg_m=0.3, sinkhorn_iters=4, assigner_support="text")
    assert a.config()["init_args"] == {
        "reg_m": 0.3,
        "sinkhorn_iters": 4,
        "assigner_support": "text",
    }
    with pytest.raises(TypeError, match="plain values"):
        ClipPlusSpread(spread_weight=torch.tensor(1.0)).config()  # type: ignore[arg-type]
    assert isinstance(a, Component)


def test_clip_loss_is_open_clips_and_sclip_without_its_extra_terms():
    g = torch.Generator().manual_seed(0)
    x, y = (torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in "xy")
    s = torch.tensor(14.0)
    clip = CLIPLoss()(x, y, s)
    assert list(clip) == ["contrastive_loss"]
    assert torch.equal(clip["contrastive_loss"], contrastive_loss(x, y, s))
    assert not CLIPLoss().uses_unpaired and SCLIPLoss().uses_unpaired
    plain = SCLIPLoss(caption_weight=0.0, keyword_weight=0.0, unpaired_negatives=False)
    assert not plain.uses_unpaired
    assert torch.equal(plain(x, y, s)["contrastive_loss"], clip["contrastive_loss"])


class ClipPlusViews(CLIPLoss):
    """A user's objective that reads the strong view: CLIP's loss plus the squared distance
    between the weak and strong views' features of each unpaired image."""

    @property
    def uses_unpaired(self) -> bool:
        return True

    @property
    def uses_strong_view(self) -> bool:
        return True

    def compute(self, f: Features) -> dict[str, torch.Tensor]:
        out = super().compute(f)
        assert f.unpaired is not None and f.unpaired_strong is not None
        out["view_loss"] = (f.unpaired - f.unpaired_strong).pow(2).sum(-1).mean()
        return out


class CountingModule(SCLIPModule):
    """A subclass that overrides the image encoder hook (and records the batch sizes)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes = [*getattr(self, "sizes", []), images.shape[0]]
        return super().encode_images(images)


@pytest.mark.parametrize("cache", [None, "image"], ids=["pixels", "image_cache"])
def test_the_strong_view_goes_through_the_encode_images_hook(cache, synthetic_root, tiny_lit):
    """Every image feature of a step, the strong view's too, comes from the (overridden)
    ``encode_images``; under the image cache the frozen part of the strong view runs live
    and the rest through the hook, equal (float64) to the tower on its pixels."""
    import lightning as L
    from helpers import quiet_cpu_trainer

    from sclip_lightning import SCLIPDataModule

    L.seed_everything(0)
    name, _ = tiny_lit
    lock = dict(lock_image=True, lock_image_unlocked_groups=2, tower_cache=cache)
    module = CountingModule(model_name=name, criterion=ClipPlusViews(), **lock)
    data = SCLIPDataModule(
        dataset="synthetic", batch_size=4, unpaired_batch_size=6, num_workers=0,
        model_name=name, augment=False,
    )  # fmt: skip
    quiet_cpu_trainer(max_steps=2, limit_val_batches=0, precision="64-true").fit(module, data)
    assert module.sizes == [10, 6] * 2  # paired + unpaired weak in one call, then strong
    module.sizes = []
    batch = next(iter(data.train_dataloader()))[0]
    strong = batch["unpaired"]["image_strong"].double()
    module.eval()
    if cache:  # as in a step: the hook on the frozen outputs
        assert module.reads_tower_outputs("image")
        got = module.encode_images(module.towers.frozen_outputs("image", strong))
    else:
        got = module.encode_images(strong)
    module.towers = None
    torch.testing.assert_close(got, module.model.encode_image(strong, normalize=True))


def _bn_buffers(module: SCLIPModule) -> dict[str, torch.Tensor]:
    state = module.model.visual.state_dict()
    return {k: v.clone() for k, v in state.items() if "running" in k or "num_batches" in k}


def test_strong_view_norm_stats_keep_leaves_batchnorm_statistics_to_the_weak_views():
    """With a BatchNorm image tower training (sclip-tiny-rn): ``keep`` ends a step with the
    running statistics the weak forward alone gives; ``update`` moves them with the strong
    views too; the losses are the same (train mode normalises by the batch either way)."""
    torch.manual_seed(0)
    first = SCLIPModule(model_name="sclip-tiny-rn", criterion=ClipPlusViews()).double().train()
    tokens = first.tokenizer(["a field", "a river", "a road", "a port"])
    x = torch.randn(3, 4, 3, 32, 32, dtype=torch.float64)
    batch = {
        "paired": {"image": x[0], "text": tokens},
        "unpaired": {"image": x[1], "image_strong": x[2] * 2 + 1},
    }
    state = first.state_dict()
    runs = {}
    for stats in ("keep", "update"):
        m = SCLIPModule(
            model_name="sclip-tiny-rn", criterion=ClipPlusViews(), strong_view_norm_stats=stats
        )
        m.double().train().load_state_dict(state)
        runs[stats] = (m.compute_losses(batch), _bn_buffers(m))
    first.encode_images(torch.cat([x[0], x[1]]))  # the weak forward alone
    weak_only = _bn_buffers(first)
    assert weak_only, "the tower has BatchNorm running statistics"
    for k, v in weak_only.items():  # the same arithmetic on the same inputs
        torch.testing.assert_close(runs["keep"][1][k], v, rtol=0, atol=1e-12)
    moved = [k for k, v in weak_only.items() if not torch.equal(runs["update"][1][k], v)]
    assert moved, "update: the strong views move the running statistics"
    for term, value in runs["keep"][0].items():
        torch.testing.assert_close(runs["update"][0][term], value, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="strong_view_norm_stats"):
        SCLIPModule(model_name="sclip-tiny-rn", strong_view_norm_stats="freeze")


def test_running_stats_kept_covers_timm_batchnorm_and_restores_tracking():
    from timm.layers import BatchNormAct2d

    from sclip_lightning.towers import running_stats_kept

    torch.manual_seed(0)
    bn = BatchNormAct2d(3).double().train()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with running_stats_kept(bn):
        kept = bn(x)
    assert bn.track_running_stats
    for k, v in before.items():
        assert torch.equal(bn.state_dict()[k], v), k
    torch.testing.assert_close(kept, bn(x), rtol=0, atol=1e-12)  # train mode: batch statistics
    assert not torch.equal(bn.running_mean, before["running_mean"])  # this call updated them
