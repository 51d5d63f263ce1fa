"""The design's layering, as the runtime image sees it: the server runs from service/ alone, with no model/ and
no torch (the image copies neither). The client (client/, the attnserve-client distribution) imports neither the
server nor model/: it installs alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client" / "attnserve_client"

PROBE = """
import importlib, pkgutil, sys
for blocked in ("model", "torch", "tokenizers", "matplotlib"):
    sys.modules[blocked] = None  # any import of them now fails, as in the runtime image
import service
for module in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(module.name)
print("ok")
"""

# The client with the server's and the export's packages made unimportable: every module must still import (explain's
# extra, tokenizers and matplotlib, is installed in the test environment).
CLIENT_PROBE = """
import importlib, pkgutil, sys
for blocked in ("service", "model", "torch", "onnxruntime"):
    sys.modules[blocked] = None
import attnserve_client
for module in pkgutil.walk_packages(attnserve_client.__path__, "attnserve_client."):
    importlib.import_module(module.name)
print("ok")
"""
CLIENT_NEVER_IMPORTS = {"service", "model", "torch", "onnxruntime", "tests", "bench", "scripts"}


def test_every_service_module_imports_without_model_or_torch() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def _imported_roots(path: Path) -> set[str]:
    """Top-level packages a file imports anywhere in it (inside functions too: a lazy import is still an import)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_client_never_imports_the_server_or_model() -> None:
    files = sorted(CLIENT.rglob("*.py"))
    assert len(files) > 10, CLIENT
    offending = {
        str(f.relative_to(ROOT)): sorted(_imported_roots(f) & CLIENT_NEVER_IMPORTS)
        for f in files
        if _imported_roots(f) & CLIENT_NEVER_IMPORTS
    }
    assert not offending, offending


def test_every_client_module_imports_without_the_server_or_model() -> None:
    # From client/, not the repository root: service/ and model/ are not even on the path, as for a pip install.
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_PROBE], capture_output=True, text=True, cwd=ROOT / "client", timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
