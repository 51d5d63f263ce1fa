"""Generate the Python gRPC code from `proto/`: every proto into `service/_pb`, attnserve.v1 into the client's
`client/attnserve_client/_pb` (or every proto into `--out DIR`).

    python scripts/gen_protos.py [--out DIR]

Runs grpc_tools.protoc with `-I proto`, so `proto/inference/grpc_service.proto` becomes
`DIR/inference/grpc_service_pb2.py`, `..._pb2.pyi` and `..._pb2_grpc.py`. protoc writes absolute imports
(`from inference import model_config_pb2`) that only work with DIR on sys.path; they are rewritten into
package imports (`from service._pb.inference import model_config_pb2`), as is the module name the classes
are registered under, so `from service._pb.inference import grpc_service_pb2` works as is. Every generated
package directory gets an `__init__.py`. A `_pb2_grpc.py` for a proto without services (nothing but a
version check) is not kept.

The client gets only the protos under `proto/attnserve/` (it calls attnserve.v1 alone), rewritten into its own
package `attnserve_client._pb`: a distribution of its own, it never imports service/.

The output is deterministic: same protos, same grpcio-tools -> same bytes. tests/unit/test_protos.py
regenerates each target into a temporary directory and compares with the committed tree (`make protos` to refresh).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "service" / "_pb"
# The package the generated modules live in, whatever directory they are written to (a test generates
# into a temporary directory and must get the same bytes as the committed service/_pb).
PACKAGE = "service._pb"
INIT_TEXT = '"""Generated; do not edit. Regenerate with `make protos`."""\n'
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class Target(NamedTuple):  # not a dataclass: tests load this file without registering it as a module
    """One committed generated tree: where it lives, the package it is imported as, the protos it holds."""

    out_dir: Path
    package: str
    proto_dirs: tuple[str, ...] | None = None  # top-level directories of proto/ to take; None: every proto

    def protos(self, proto_root: Path = PROTO_ROOT) -> list[Path]:
        protos = proto_files(proto_root)
        return protos if self.proto_dirs is None else [p for p in protos if p.parts[0] in self.proto_dirs]


TARGETS = (
    Target(DEFAULT_OUT, PACKAGE),
    Target(ROOT / "client" / "attnserve_client" / "_pb", "attnserve_client._pb", ("attnserve",)),
)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under proto_root, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _run_protoc(protos: list[Path], proto_root: Path, out_dir: Path) -> None:
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(p.as_posix() for p in protos),
    ]
    done = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}):\n{done.stderr}{done.stdout}")


def _rewrite(text: str, roots: set[str], package: str) -> str:
    """Turn protoc's absolute imports of our own modules into imports from `package`."""
    names = "|".join(sorted(re.escape(r) for r in roots))
    if not names:
        return text
    # from inference import model_config_pb2 as x  /  from attnserve.v1 import attention_pb2 as x
    text = re.sub(rf"^from ((?:{names})(?:\.\w+)*) import ", rf"from {package}.\1 import ", text, flags=re.M)
    # import inference.model_config_pb2 as x  /  import foo_pb2 as x (a proto at the root of proto/)
    text = re.sub(rf"^import ((?:{names})(?:\.\w+)*) as ", rf"import {package}.\1 as ", text, flags=re.M)
    # The module name the message classes are registered under (their __module__, used by pickle).
    text = re.sub(
        rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'((?:{names})(?:\.\w+)*)'", rf"\1'{package}.\2'", text
    )
    leftover = re.search(rf"^(?:from|import) (?:{names})\b.*$", text, flags=re.M)
    if leftover:
        raise RuntimeError(f"unrewritten import in generated code: {leftover.group(0)!r}")
    return text


def _render(protos: list[Path], proto_root: Path, package: str) -> dict[Path, bytes]:
    """The generated tree as {relative path: bytes}."""
    # Modules protoc imports absolutely: top-level directories under proto/, and root-level protos.
    roots = {p.parts[0] if len(p.parts) > 1 else f"{p.stem}_pb2" for p in protos}
    files: dict[Path, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        _run_protoc(protos, proto_root, Path(tmp))
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(tmp)
            text = path.read_text(encoding="utf-8")
            if rel.name.endswith("_pb2_grpc.py") and not re.search(r"^class \w+Stub\b", text, flags=re.M):
                continue  # no service in this proto: only a grpcio version check, nothing to import
            files[rel] = _rewrite(text, roots, package).encode("utf-8")
    for rel in list(files):
        for parent in rel.parents:  # every generated package directory, DIR itself included
            files.setdefault(parent / "__init__.py", INIT_TEXT.encode("utf-8"))
    return dict(sorted(files.items()))


def _is_generated(rel: Path) -> bool:
    return rel.name == "__init__.py" or rel.name.endswith(GENERATED_SUFFIXES)


def generate(
    out_dir: Path, *, proto_root: Path = PROTO_ROOT, package: str = PACKAGE, protos: Sequence[Path] | None = None
) -> None:
    """Write the generated code for `protos` (default: every proto under proto_root) into out_dir.

    Files that are already identical are left untouched; generated files (`*_pb2.py`, `*_pb2.pyi`,
    `*_pb2_grpc.py`, `__init__.py`) that no proto produces any more are deleted, and so are directories
    left empty. Anything else in out_dir is left alone.
    """
    out_dir = Path(out_dir)
    protos = proto_files(proto_root) if protos is None else list(protos)
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    files = _render(protos, proto_root, package)

    if out_dir.exists():
        for path in sorted(out_dir.rglob("*"), reverse=True):  # children before their directories
            rel = path.relative_to(out_dir)
            if "__pycache__" in rel.parts:
                continue
            if path.is_file() and rel not in files and _is_generated(rel):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for rel, data in files.items():
        target = out_dir / rel
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="every proto into this directory (default: the committed trees)")
    args = parser.parse_args(argv)
    targets = [Target(args.out, PACKAGE)] if args.out is not None else TARGETS
    for target in targets:
        protos = target.protos()
        generate(target.out_dir, package=target.package, protos=protos)
        print(f"generated {len(protos)} protos into {target.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
