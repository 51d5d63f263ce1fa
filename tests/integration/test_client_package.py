"""`pip install ./client` into a fresh virtual environment: it pulls no onnxruntime, torch or server code, and its
`attnserve-client` works against a real server (info, attend, weights; explain once the `explain` extra is added).

Really installed: `python -m venv`, then the venv's own pip from the package index this machine's pip is set up
for, no cache, no wheels or packages borrowed from the test environment. About a minute for the client alone and
as long again for the explain extra (tokenizers brings huggingface-hub), so the explain part is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server_process import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 420
SERVER_ONLY = ("onnxruntime", "onnxruntime-gpu", "torch", "attnserve", "prometheus-client", "pydantic-settings")

# Run inside the fresh venv: what is installed, and which top-level packages import.
INVENTORY = """
import importlib.metadata as md, importlib.util, json, sys
names = sorted({d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()})
found = {m: importlib.util.find_spec(m) is not None for m in ("service", "model", "onnxruntime", "torch")}
import attnserve_client
print(json.dumps({"distributions": names, "importable": found, "client": attnserve_client.__file__,
                  "requires": md.requires("attnserve-client"), "prefix": sys.prefix}))
"""


@dataclass
class FreshVenv:
    path: Path
    env: dict[str, str]
    cwd: Path

    def run(self, *argv: str | Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=timeout_s
        )

    def pip_install(self, requirement: str) -> float:
        """Install into the venv; the seconds it took (printed, for the record)."""
        started = time.monotonic()
        done = self.run(self.path / "bin" / "python", "-m", "pip", "install", requirement, timeout_s=INSTALL_TIMEOUT_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        took = time.monotonic() - started
        print(f"pip install {requirement}: {took:.0f} s")
        return took

    def client(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(self.path / "bin" / "attnserve-client", *argv, timeout_s=timeout_s)

    def inventory(self) -> dict:
        done = self.run(self.path / "bin" / "python", "-c", INVENTORY)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    """A new venv with `pip install ./client` done in it, from a copy of client/ (pip builds in the source tree;
    the copy also proves client/ needs nothing from beside it)."""
    base = tmp_path_factory.mktemp("client_package")
    source = base / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    work = base / "work"  # the commands' directory: not the repository, whose service/ and model/ would import
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env |= {"PYTHONNOUSERSITE": "1", "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    venv = FreshVenv(base / "venv", env, work)
    done = venv.run(sys.executable, "-m", "venv", venv.path)
    assert done.returncode == 0, done.stderr
    venv.pip_install(str(source))
    return venv


def test_pip_install_client_pulls_no_server_code(fresh_venv: FreshVenv) -> None:
    inventory = fresh_venv.inventory()
    assert inventory["prefix"] == str(fresh_venv.path)
    assert Path(inventory["client"]).is_relative_to(fresh_venv.path), "imported from the venv, not the repository"
    installed = set(inventory["distributions"])
    assert {"attnserve-client", "grpcio", "protobuf", "numpy"} <= installed
    assert not installed & set(SERVER_ONLY), installed
    assert inventory["importable"] == {"service": False, "model": False, "onnxruntime": False, "torch": False}
    plain = sorted(r for r in inventory["requires"] if "extra ==" not in r)
    assert plain == ["grpcio==1.85.1", "numpy==2.4.6", "protobuf==7.36.2"]


def test_installed_cli_against_a_real_server(fresh_venv: FreshVenv, server: ServerProcess) -> None:
    target = ["--target", server.address, "--timeout", "30"]
    info = fresh_venv.client(*target, "info")
    assert info.returncode == 0, info.stderr
    assert "d_model 512, heads 8, head_dim 64" in info.stdout and "sha256 " in info.stdout

    attend = fresh_venv.client(*target, "attend", "--batch", "2", "--seq-len", "9", "--lengths", "9,4")
    assert attend.returncode == 0, attend.stderr
    assert "[2, 9, 512] float32" in attend.stdout and "round trip" in attend.stdout

    weights = fresh_venv.client(*target, "weights", "--seq-len", "8", "--positions", "1,5", "--top-k", "3")
    assert weights.returncode == 0, weights.stderr
    rows = [line.split() for line in weights.stdout.splitlines()[1:]]
    assert len(rows) == 2 * 8 and {row[0] for row in rows} == {"1", "5"}  # per position, every head

    refused = fresh_venv.client(*target, "attend", "--seq-len", "5000")  # the server's error, as the CLI prints it
    assert refused.returncode == 1 and refused.stderr.startswith("error: INVALID_ARGUMENT: hidden_states")

    help_ = fresh_venv.client("explain", "--help")
    assert help_.returncode == 0 and "--follow" in help_.stdout and "--checkpoint" in help_.stdout
    # Without the extra, explain says what to install instead of a traceback.
    bare = fresh_venv.client(*target, "explain", "It was wide.", "--token", "it")
    assert bare.returncode == 2, bare.stderr
    assert "pip install 'attnserve-client[explain]'" in bare.stderr and "Traceback" not in bare.stderr


@pytest.fixture(scope="module")
def minilm_server(minilm_l5_model: Path) -> Iterator[ServerProcess]:
    process = start_server(minilm_l5_model, "--warmup", "false")
    yield process
    process.stop()


@pytest.mark.slow
def test_installed_explain_with_its_extra(
    fresh_venv: FreshVenv, minilm_server: ServerProcess, minilm_dir: Path
) -> None:
    """The explain extra into the same venv, then explain through MiniLM's layer 5; the checkpoint directory is the
    test environment's (data, not code: the venv imports nothing from it)."""
    fresh_venv.pip_install(f"{fresh_venv.cwd.parent / 'client'}[explain]")
    installed = set(fresh_venv.inventory()["distributions"])
    assert {"tokenizers", "safetensors", "matplotlib"} <= installed
    assert not installed & set(SERVER_ONLY), installed

    html = fresh_venv.cwd / "it.html"
    argv = ["--target", minilm_server.address, "--timeout", "60", "explain"]
    argv += ["The animal didn't cross the street because it was too tired.", "--token", "it", "--follow", "animal"]
    done = fresh_venv.client(*argv, "--checkpoint", str(minilm_dir), "--html", str(html), timeout_s=300)
    assert done.returncode == 0, done.stderr
    assert "layer 5" in done.stdout and "Heads where 'animal' wins" in done.stdout
    assert html.is_file() and "animal" in html.read_text()
