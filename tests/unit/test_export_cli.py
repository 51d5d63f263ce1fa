"""`python -m model.export` on bad input: one clear line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import export as export_module
from model.export import read_config
from model.weights import save_npz, seeded_weights
from tests.unit.test_weights import write_tiny_bert

ROOT = Path(__file__).resolve().parents[2]


def run_export(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "model.export", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _bad_checkpoints(tmp: Path) -> dict[str, Path]:
    weights = seeded_weights(16)
    shapes = dict(weights, **{"out_proj.weight": np.zeros((16, 12), np.float32)})
    np.savez(tmp / "shapes.npz", **shapes)
    names = {k.replace("q_proj", "query"): v for k, v in weights.items()}
    np.savez(tmp / "names.npz", **names)
    write_tiny_bert(tmp / "bert", layers=2)
    save_npz(weights, tmp / "good16.npz")
    return {
        "shapes": tmp / "shapes.npz",
        "names": tmp / "names.npz",
        "bert": tmp / "bert",
        "good16": tmp / "good16.npz",
    }


CASES = {
    "d_model not divisible by heads": (["--d-model", "100", "--heads", "8"], "must be divisible by --heads"),
    "zero heads": (["--heads", "0"], "--heads must be a positive integer, got 0"),
    "negative heads": (["--heads", "-4"], "--heads must be a positive integer, got -4"),
    "missing checkpoint": (["--checkpoint", "{tmp}/nowhere.safetensors"], "does not exist"),
    "checkpoint shapes": (["--checkpoint", "{shapes}"], r"out_proj.weight has shape [16, 12], expected [16, 16]"),
    "checkpoint names": (["--checkpoint", "{names}"], "missing q_proj.weight"),
    "layer out of range": (["--checkpoint", "{bert}", "--layer", "7"], "--layer 7 is out of range"),
    "heads do not divide the checkpoint": (["--checkpoint", "{good16}", "--heads", "3"], "must be divisible"),
    "d_model disagrees with checkpoint": (["--checkpoint", "{good16}", "--d-model", "32"], "does not match"),
    "layer without checkpoint": (["--layer", "1"], "--layer needs --checkpoint"),
    "opset out of range": (["--opset", "9"], "--opset must be in 18..23, got 9"),
    "max seq len zero": (["--max-seq-len", "0"], "--max-seq-len must be a positive integer"),
    "not a number": (["--heads", "many"], "invalid int value: 'many'"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments: --frobnicate"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    paths = _bad_checkpoints(tmp_path)
    args, expected = CASES[case]
    out = tmp_path / "out" / "model"
    args = [a.format(tmp=tmp_path, **paths) for a in args]
    result = run_export("--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("model.export: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written on bad input"


def test_out_that_is_not_a_model_directory_is_refused(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, expected in ((precious, "is not a model directory"), (a_file, "is a file")):
        result = run_export("--out", str(out), "--d-model", "16", "--heads", "2")
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me" and a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "precious"]


def test_export_replaces_a_model_directory_and_calibrates(tmp_path: Path) -> None:
    out = tmp_path / "m"
    first = run_export("--out", str(out), "--d-model", "32", "--heads", "4", "--max-seq-len", "128")
    assert first.returncode == 0, first.stderr
    assert "routing (cpu" in first.stdout and "measured" in first.stdout
    config = read_config(out)
    assert config["calibration"]["measured"] is True
    assert set(config["calibration"]["unmasked"]["plain"]) == {"16", "64", "128"}
    assert config["routing"]["cpu"]["unmasked"][-1]["up_to"] == 128
    second = run_export("--out", str(out), "--d-model", "16", "--heads", "2", "--seed", "3", "--no-calibrate")
    assert second.returncode == 0, second.stderr
    config = read_config(out)
    assert config["d_model"] == 16 and config["weights"] == {"kind": "seeded", "seed": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no scratch or old directory left behind"


def test_parity_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export_module, "PARITY_REL_L2", 0.0)  # no FP32 graph is exact: parity must fail
    out = tmp_path / "m"
    assert export_module.main(["--out", str(out), "--d-model", "16", "--heads", "2", "--no-calibrate"]) == 1
    assert "parity check failed, nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
