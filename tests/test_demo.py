"""`make demo` end to end at a tiny size: every default row trains, tests and is tabled."""

from __future__ import annotations

import csv


def test_demo_runs_its_default_rows(synthetic_root, tmp_path):
    from sclip_lightning import demo

    rows = demo.main(
        ["--root", str(synthetic_root), "--steps", "3", "--warmup", "1", "--batch-size", "8",
         "--workers", "0", "--out", str(tmp_path)]
    )  # fmt: skip
    assert [r["method"] for r in rows] == demo.DEFAULT == ["clip", "sclip", "sclip-bank-uot"]
    assert rows[0]["pseudo-label acc (train)"] == "-"  # the baseline makes no plan
    for r in rows[1:]:
        assert r["pseudo-label acc (train)"] != "-"
    table = list(csv.DictReader((tmp_path / "demo.csv").open()))
    assert [t["method"] for t in table] == demo.DEFAULT
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "demo_runs.csv").is_file()
