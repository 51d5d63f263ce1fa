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


def test_the_client_never_imports_the_server_or_model() -> None:
    files = sorted(CLIENT.rglob("*.py"))
    assert len(files) > 10, CLIENT
    roots = {f: {name.split(".")[0] for name in _imports(f)} for f in files}
    offending = {
        str(f.relative_to(ROOT)): sorted(r & CLIENT_NEVER_IMPORTS) for f, r in roots.items() if r & CLIENT_NEVER_IMPORTS
    }
    assert not offending, offending


def test_every_client_module_imports_without_the_server_or_model() -> None:
    # From client/, not the repository root: service/ and model/ are not even on the path, as for a pip install.
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_PROBE], capture_output=True, text=True, cwd=ROOT / "client", timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# --- the rooms of service/, read from the source (ast): who may import whom --------------------------------------

SERVICE = ROOT / "service"
# Each room and the rooms of service/ it must not import. The edges (api) never see onnxruntime or the engine;
# the core and the engine never see the edges or the assembly; observation and host tuning stand alone.
FORBIDDEN = {
    "api": {"engine", "app", "host"},
    "core": {"api", "app"},
    "engine": {"api", "app"},
    "observe": {"api", "app", "engine", "core.dataplane"},
    "host": {"api", "app", "core", "engine", "observe"},
}
NEVER = ("model", "attnserve_client", "torch")  # the server runs without them (the runtime image has none)
ONNXRUNTIME_ONLY_IN = {"service.engine.sessions"}  # one module talks to onnxruntime


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _service_modules() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path)
        for path in sorted(SERVICE.rglob("*.py"))
        if "_pb" not in path.relative_to(SERVICE).parts
    }


def test_service_imports_no_model_client_or_torch() -> None:
    offending = {
        module: sorted(name for name in imported if name.split(".")[0] in NEVER)
        for module, imported in _service_modules().items()
    }
    assert not {m: names for m, names in offending.items() if names}


def test_rooms_import_only_what_the_design_allows() -> None:
    offending = []
    for module, imported in _service_modules().items():
        room = module.split(".")[1] if module.count(".") >= 1 else ""
        for name in imported:
            for banned in FORBIDDEN.get(room, ()):
                if name == f"service.{banned}" or name.startswith(f"service.{banned}."):
                    offending.append(f"{module} imports {name}")
            if name.split(".")[0] == "onnxruntime" and module not in ONNXRUNTIME_ONLY_IN:
                offending.append(f"{module} imports onnxruntime")
    assert not offending, offending


def test_no_import_cycles_between_modules() -> None:
    modules = _service_modules()
    graph = {
        module: {name for name in imported if name in modules and name != module}
        for module, imported in modules.items()
    }
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_checks_above_can_fail(tmp_path: Path) -> None:
    """The import reader sees what the rules need: plain, from, nested imports; not TYPE_CHECKING ones."""
    source = tmp_path / "probe.py"
    source.write_text(
        "import onnxruntime as ort\nfrom service.api import status\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from service.app.settings import Settings\n"
        "def late():\n    from model.export import main\n"
    )
    found = _imports(source)
    assert {"onnxruntime", "service.api", "service.api.status", "model.export"} <= found
    assert "service.app.settings" not in found
