"""The loss benchmark runs end to end at a tiny size (its numbers are for bench runs only)."""

from __future__ import annotations

import loss as loss_bench  # bench/loss.py (conftest puts bench/ on sys.path)


def test_loss_bench_table(capsys):
    loss_bench.main(["--sizes", "8", "--reps", "1", "--dim", "16", "--keywords", "3"])
    out = capsys.readouterr().out
    row = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| 8 |")]
    assert len(row) == 1 and len(row[0]) == 11, out  # B, six times, four ratios
    assert all(float(v) > 0 for v in row[0][1:]), out
