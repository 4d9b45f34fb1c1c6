"""The results chart: one panel per metric, one bar per method, readable at any scale."""

from __future__ import annotations

from PIL import Image

from sclip_lightning.results import bar_chart


def test_bar_chart_one_panel_per_metric_one_row_per_method(tmp_path):
    series = {"CLIP": [68.7, 5.3], "S-CLIP": [71.4, 3.9], "ceiling": [81.0, 5.8]}
    errors = {"CLIP": [1.1, 0.3], "S-CLIP": [0.7, 0.5], "ceiling": [0.5, 0.4]}
    two = bar_chart(["zero-shot", "i2t_R@1"], series, errors, tmp_path / "a" / "two.png")
    four = bar_chart(
        ["zero-shot", "i2t_R@1", "t2i_R@1", "mean_R"],
        {k: v * 2 for k, v in series.items()},
        None,  # no error bars
        tmp_path / "four.png",
        title="t",
    )
    more = bar_chart(
        ["zero-shot"], {f"m{i}": [float(i)] for i in range(9)}, None, tmp_path / "m.png"
    )
    w2, h2 = Image.open(two).size
    w4, h4 = Image.open(four).size
    hm = Image.open(more).size[1]
    assert w4 > w2 and h4 == h2  # a panel per metric: wider, not taller
    assert hm > h2  # a row per method: taller
