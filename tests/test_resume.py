"""Resume: a `sclip fit` killed with SIGKILL mid-epoch and resumed from its last checkpoint
ends with the same weights and metrics as the uninterrupted run; checkpoints are atomic."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sclip_lightning.checkpoint import AtomicCheckpointIO, atomic_torch_save
from sclip_lightning.data.sampling import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 3
  deterministic: true
  limit_val_batches: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{out}", name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "{out}/ckpt", every_n_train_steps: 1, save_top_k: 0, save_last: true}}
model:
  class_path: sclip_lightning.SCLIPModule
  init_args:
    model_name: sclip-tiny-rn
    lr: 1.0e-3
    warmup_steps: 3
    criterion: sclip_lightning.losses.SCLIPLoss
data:
  class_path: sclip_lightning.SCLIPDataModule
  init_args:
    dataset: synthetic
    label_ratio: 0.02      # 60 pairs: 7 batches of 8 per epoch, 21 steps in all
    batch_size: 8
    unpaired_batch_size: 8
    eval_batch_size: 16
    num_workers: 1
"""


def _fit(out: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.yaml"
    cfg.write_text(CONFIG.format(out=out))
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sclip_lightning", "fit", "--config", str(cfg), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if wait:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-4000:]
    return proc


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def _val_rows(out: Path) -> list[dict[str, str]]:
    rows = []
    for f in sorted((out / "logs").glob("version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(f.open()) if r.get("val/retrieval_mean")]
    return rows


def _same(a, b, where: str) -> None:
    """Bit-identical tensors, or nested dicts of them (the support bank's extra state)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where} differs after resume"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs after resume"
    else:
        assert a == b, f"{where} differs after resume: {a} != {b}"


@pytest.mark.parametrize(
    "bank, unpaired",
    [(0, "folder"), (-1, "shards")],
    ids=["no_bank", "bank_all_pairs_unpaired_from_shards"],
)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    synthetic_root, tmp_path, bank, unpaired
):
    """With the support bank on, the bank is part of the checkpoint: the resumed run's bank,
    weights and metrics equal the uninterrupted run's bit for bit. With the unpaired images
    streamed from WebDataset shards, the stream resumes on the same samples."""
    extra: tuple[str, ...] = (f"--model.init_args.criterion.init_args.support_bank_size={bank}",)
    if unpaired == "shards":
        from fixtures import write_shards

        pattern = write_shards(tmp_path / "shards", shards=4, per_shard=15, size=24)
        extra += (
            "--data.init_args.unpaired_dataset=webdataset",
            f"--data.init_args.unpaired_root={pattern}",
            "--data.init_args.shuffle_buffer=9",
        )
    full = tmp_path / "full"
    _fit(full, *extra)

    killed = tmp_path / "killed"
    marker = tmp_path / "stalled"
    proc = _fit(
        killed,
        *extra,
        "--trainer.callbacks+=helpers.StallAfterStep",
        "--trainer.callbacks.step=10",  # epoch 2 of 3, 3 of its 7 batches done
        f"--trainer.callbacks.marker={marker}",
        wait=False,
    )
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()[-4000:] if proc.stdout else ""
        assert time.time() < deadline, "the run never reached step 10"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = killed / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 9 and state["epoch"] == 1  # mid-epoch: batch 2 of epoch 2
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "consumed_batches": 2},
        {"epoch": 1, "consumed_batches": 2},
    ]

    _fit(killed, *extra, f"--ckpt_path={last}")
    a, b = _weights(full / "ckpt" / "last.ckpt"), _weights(last)
    _same(a, b, "state_dict")
    if bank:
        state = a["criterion.bank._extra_state"]["state"]
        assert (state["ids"] >= 0).all()  # 3 epochs over 60 pairs: every slot filled
    full_rows, resumed_rows = _val_rows(full), _val_rows(killed)
    assert len(full_rows) == 3
    final = {k: v for k, v in full_rows[-1].items() if k.startswith("val/")}
    assert final == {k: v for k, v in resumed_rows[-1].items() if k.startswith("val/")}


def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_by_skipping():
    ds = list(range(23))
    s = ResumableSampler(ds, seed=5, stream=0, batch_size=4)
    s.set_epoch(2)
    full = list(s)
    again = ResumableSampler(ds, seed=5, stream=0, batch_size=4)
    again.set_epoch(2)
    assert list(again) == full
    second_pass = list(again)  # max_size_cycle re-iterates within an epoch: a new order
    assert [i for i, _ in second_pass] != [i for i, _ in full]
    other = ResumableSampler(ds, seed=6, stream=0, batch_size=4)
    other.set_epoch(2)
    assert [i for i, _ in other] != [i for i, _ in full]
    resumed = ResumableSampler(ds, seed=5, stream=0, batch_size=4)
    resumed.resume_at(epoch=2, consumed_batches=3)
    assert list(resumed) == full[12:]
    cycled = ResumableSampler(ds, seed=5, stream=0, batch_size=4)
    cycled.resume_at(epoch=2, consumed_batches=5 + 1)  # 5 batches per pass: pass 1, batch 1
    assert list(cycled) == second_pass[4:]


def test_atomic_save_keeps_the_old_checkpoint_when_a_save_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    real_fsync = os.fsync

    def crash(fd):  # dies after the bytes were written, before the rename
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=False) == {"step": 3}


def _sampler_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    s = ResumableSampler(list(range(40)), seed=100 + rank, stream=0, batch_size=4)  # seeds differ
    s.set_epoch(1)
    torch.save([i for i, _ in s], f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_ranks_share_rank_zeros_seed_so_shards_partition_the_data(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sampler_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert len(a) == len(b) == 20 and sorted(a + b) == list(range(40))
    single = ResumableSampler(list(range(40)), seed=100, stream=0, batch_size=4)
    single.set_epoch(1)
    order = [i for i, _ in single]
    assert a == order[0::2] and b == order[1::2]  # rank 0's seed, interleaved shards


def test_reloaded_loaders_start_from_the_current_epochs_order(synthetic_root):
    """With reload_dataloaders_every_n_epochs every epoch builds new loaders (and Lightning
    iterates them once before set_epoch): each epoch must still get its own order."""
    import lightning as L
    from helpers import quiet_cpu_trainer

    from sclip_lightning import SCLIPDataModule, SCLIPModule

    seen: dict[int, list[int]] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).extend(batch["paired"]["index"].tolist())

    L.seed_everything(0, verbose=False)
    data = SCLIPDataModule(
        dataset="synthetic", label_ratio=0.02, batch_size=8, unpaired_batch_size=8, num_workers=0
    )
    trainer = quiet_cpu_trainer(
        max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[Record()]
    )
    trainer.fit(SCLIPModule(model_name="sclip-tiny", warmup_steps=0), datamodule=data)
    assert len(seen) == 3 and seen[0] != seen[1] != seen[2] != seen[0]
