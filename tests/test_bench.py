"""The loss benchmark runs end to end at a tiny size (its numbers are for bench runs only)."""

from __future__ import annotations

import loss as loss_bench  # bench/loss.py (conftest puts bench/ on sys.path)


def test_loss_bench_table(capsys):
    loss_bench.main(["--sizes", "8", "--reps", "1", "--dim", "16", "--keywords", "3"])
    out = capsys.readouterr().out
    row = [line.split() for line in out.splitlines() if line.split()[:1] == ["8"]]
    assert len(row) == 1 and len(row[0]) == 11, out  # B and ten numbers
    assert all(float(v) > 0 for v in row[0][1:]), out


def test_loss_bench_breakdown(capsys):
    loss_bench.main(["--breakdown", "8", "--reps", "1", "--dim", "16", "--keywords", "3"])
    out = capsys.readouterr().out
    for name in ("default", "no keyword term", "plan detached", "neither", "ClipLoss",
                 "loop form", "floor, 9 products", "floor, 7 products"):  # fmt: skip
        assert f"{name} " in out, (name, out)
    assert "2x ClipLoss" in out and "loop form / 5" in out, out
