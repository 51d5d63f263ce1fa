"""The design's layering, as the runtime image sees it: the server runs from service/ alone, with no model/ and
no torch (the image copies neither). Only the explain tool, a client-side view, reads checkpoints through model/;
service/client.py imports it when that command runs, never at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TOOLS = {"service.explain", "service.explain_render"}  # need model/ and the explain extra

PROBE = f"""
import importlib, pkgutil, sys
for blocked in ("model", "torch", "tokenizers", "matplotlib"):
    sys.modules[blocked] = None  # any import of them now fails, as in the runtime image
import service
for module in pkgutil.walk_packages(service.__path__, "service."):
    if module.name not in {sorted(CLIENT_TOOLS)!r}:
        importlib.import_module(module.name)
print("ok")
"""


def test_every_service_module_imports_without_model_or_torch() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
