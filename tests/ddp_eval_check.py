"""`trainer.test` on one process or on 2 DDP processes (gloo, CPU); saves the result rows.

The evaluation sets are chosen so that the distributed sampler repeats samples to even out
the ranks (odd sizes: 9 class-folder images, 3 caption-table images) beside a multi-caption
set (the synthetic test split: 500 images, 3 captions each). tests/test_ddp_eval.py compares
the rows of the two runs.

The towers run in float64 (``precision="64-true"``): each rank encodes other batches (other
shapes, kernels and sums), which in float32 would change every feature by rounding on any CPU;
in float64 both runs hand the evaluation (which scores in float32) the same float32 features.

Usage: python tests/ddp_eval_check.py OUT.json DEVICES CLASS_FOLDER CAPTION_TABLE
"""

from __future__ import annotations

import json
import sys
import warnings

import lightning as L
from helpers import quiet_cpu_trainer

from sclip_lightning import SCLIPDataModule, SCLIPModule


def main() -> None:
    out, devices, classes, table = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    model = SCLIPModule(model_name="sclip-tiny", results_dir=None)
    dm = SCLIPDataModule(
        model_name="sclip-tiny",
        num_workers=0,
        eval_batch_size=16,
        zeroshot=["synthetic", f"class_folder={classes}"],
        retrieval=["synthetic", f"caption_table={table}"],
    )
    trainer = quiet_cpu_trainer(
        devices=devices, strategy="ddp" if devices > 1 else "auto", precision="64-true"
    )
    trainer.test(model, dm, verbose=False)
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(model.test_results, f)


if __name__ == "__main__":
    main()
