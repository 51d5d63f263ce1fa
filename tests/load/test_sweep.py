"""`make load` in miniature: a 2 × 2 sweep against the session's server writes its table, JSON and plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.load import sweep
from tests.server_process import ServerProcess

pytestmark = pytest.mark.load

LINE_COLOURS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E))  # matplotlib's first two: one line per series


def _pixels_of(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(image[..., :3] * 255 - np.asarray(rgb)).max(axis=-1) < 8).sum())


def test_a_small_sweep_writes_its_table_json_and_plots(server: ServerProcess, tmp_path: Path) -> None:
    from matplotlib.image import imread

    out = tmp_path / "load"
    args = ["--address", server.address, "--out", str(out), "--lengths", "16,64", "--concurrency", "1,2"]
    assert sweep.main([*args, "--seconds", "0.3"]) == 0

    table = (out / "load.md").read_text()
    assert len(re.findall(r"^\| (16|64) \| [12] \| [1-9]", table, flags=re.M)) == 4  # every point, answered
    assert re.search(r"^\| 16 \| [0-9.]+ \|$", table, flags=re.M)  # the headline: p99 at c=1 (c=8 not swept)

    points = json.loads((out / "load.json").read_text())
    assert [(p["seq"], p["concurrency"]) for p in points] == [(16, 1), (16, 2), (64, 1), (64, 2)]
    assert all(p["count"] > 0 and p["sent"] == p["count"] and not p["errors"] for p in points)
    assert all(set(p["by_bucket"]) == {"16" if p["seq"] == 16 else "64"} for p in points)

    for name in ("latency_vs_seq.png", "throughput_vs_concurrency.png"):
        image = imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert all(_pixels_of(image, colour) > 50 for colour in LINE_COLOURS), name  # both series were drawn
