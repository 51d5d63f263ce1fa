"""bench/'s layout: code the benches share lives in bench/harness/; no bench imports another bench, and the
harness imports no bench. Read from the source with ast, so nothing is imported or started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
BENCHES = sorted(p for p in BENCH.glob("*.py") if p.name != "__init__.py")  # every bench and bench server
HARNESS = sorted((BENCH / "harness").rglob("*.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(BENCH.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, package: bool = False) -> set[str]:
    """The modules `source` (the text of `module`) may import, relative imports resolved; for `from a import b`
    both a and a.b, since b may be a module."""
    anchor = module.split(".") if package else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*anchor[: len(anchor) - node.level + 1], *filter(None, [node.module])])
            out |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return out


def _imported_from(path: Path) -> set[str]:
    return imported(path.read_text(), _module(path), path.name == "__init__.py")


BENCH_MODULES = {_module(p) for p in BENCHES}


def test_the_layout_is_what_this_test_reads() -> None:
    assert {"bench.serve_bench", "bench.batching_bench", "bench.echo_server"} <= BENCH_MODULES
    assert "bench.harness" in {_module(p) for p in HARNESS}


def test_no_bench_imports_another_bench() -> None:
    sideways = {_module(p): sorted(_imported_from(p) & BENCH_MODULES) for p in BENCHES}
    assert not {name: found for name, found in sideways.items() if found}, sideways


def test_the_harness_imports_no_bench() -> None:
    upward = {_module(p): sorted(_imported_from(p) & BENCH_MODULES) for p in HARNESS}
    assert not {name: found for name, found in upward.items() if found}, upward


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import bench.serve_bench", "bench.workers_bench"),
        ("from bench import serve_bench", "bench.workers_bench"),
        ("from bench.serve_bench import CpuMeter", "bench.workers_bench"),
        ("from .serve_bench import CpuMeter", "bench.workers_bench"),
        ("from .. import serve_bench", "bench.harness.rounds"),
    ],
)
def test_every_form_of_import_is_read(source: str, module: str) -> None:
    """The reader sees a bench imported in any form, so the tests above can fail."""
    assert "bench.serve_bench" in imported(source, module)
