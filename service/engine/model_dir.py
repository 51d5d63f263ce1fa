"""Read a model directory written by `python -m model.export`, verify it, and route sequence lengths to graphs.

The export side lives in model/ (torch); this is the service's own torch-free reader of the same format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from service.core.errors import ModelDirectoryError

T = TypeVar("T")
FORMAT = "attnserve-model/1"
WEIGHTS_GRAPH = "weights"
PROVIDERS = ("cpu", "cuda")


@dataclass(frozen=True)
class Graph:
    name: str
    path: Path  # where it was read from: for messages; sessions are built from `model`
    form: str
    masked: bool
    outputs: tuple[str, ...]
    # The serialized ONNX model, read once and (with verify) the very bytes whose sha256 was checked, so a file
    # swapped after the check is never served. Kept out of repr and comparisons: a few MB each.
    model: bytes = field(repr=False, compare=False)


@dataclass(frozen=True)
class Route:
    up_to: int
    graph: str


@dataclass(frozen=True)
class ModelDirectory:
    """What the service needs of a model directory, checked against its config.json."""

    path: Path
    d_model: int
    num_heads: int
    causal: bool
    max_seq_len: int
    graphs: dict[str, Graph]
    # routing[provider][masked] -> ranges of sequence length, shortest first
    routing: dict[str, dict[bool, tuple[Route, ...]]]
    weights_kind: str
    weights_detail: str
    weights_sha256: str

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def route(self, provider: str, masked: bool, seq_len: int) -> Graph:
        """The graph recorded for this provider, padding and length (the last range takes anything longer)."""
        routes = self.routing[provider][masked]
        chosen = next((r for r in routes if seq_len <= r.up_to), routes[-1])
        return self.graphs[chosen.graph]

    def graphs_for(self, provider: str) -> list[Graph]:
        """Every graph a provider can route to, plus the weights graph."""
        names = {r.graph for routes in self.routing[provider].values() for r in routes}
        return [self.graphs[name] for name in sorted(names | {WEIGHTS_GRAPH})]


def _require(config: dict, key: str, kind: type[T]) -> T:
    if not isinstance(config.get(key), kind):
        raise ModelDirectoryError(f"config.json: `{key}` missing or not a {kind.__name__}")
    return config[key]


def _routes(raw: object, graphs: dict, where: str) -> tuple[Route, ...]:
    if not isinstance(raw, list) or not raw:
        raise ModelDirectoryError(f"config.json: {where} must be a non-empty list of {{up_to, graph}}")
    routes = tuple(Route(int(entry["up_to"]), str(entry["graph"])) for entry in raw)
    for route in routes:
        if route.graph not in graphs:
            raise ModelDirectoryError(f"config.json: {where} names graph {route.graph!r}, not in `graphs`")
    return routes


def _read_files(path: Path, files: dict, graph_files: set[str], verify: bool) -> dict[str, bytes]:
    """The graph files' bytes. Each file is read once and hashed; a graph's bytes are later handed to onnxruntime
    as they are, so a file changed after the check is never served. The others (weights.npz, a few MB) are only
    hashed: the service never loads them. Without verify: the graphs are read, nothing compared."""
    contents: dict[str, bytes] = {}
    for name, expected in files.items():
        file = path / name
        if not verify and name not in graph_files:
            continue
        if not file.is_file():
            raise ModelDirectoryError(f"{file}: listed in config.json but missing")
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ModelDirectoryError(f"{file}: unreadable ({e.strerror})") from None
        if verify and (actual := hashlib.sha256(data).hexdigest()) != expected:
            raise ModelDirectoryError(f"{file}: sha256 {actual} differs from config.json's {expected}")
        if name in graph_files:
            contents[name] = data
    return contents


def load_model_directory(path: Path, verify: bool = True) -> ModelDirectory:
    """Parse config.json and read the graphs into memory; with verify, refuse any file whose sha256 differs from
    the one recorded."""
    path = Path(path)
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelDirectoryError(
            f"{config_path} not found: export a model first (`python -m model.export --out {path}`)"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelDirectoryError(f"{config_path}: unreadable ({e})") from None
    if config.get("format") != FORMAT:
        raise ModelDirectoryError(f"{config_path}: format {config.get('format')!r}, this server reads {FORMAT!r}")

    files = _require(config, "files", dict)
    graphs_raw = _require(config, "graphs", dict)
    for name, raw in graphs_raw.items():
        if raw["file"] not in files:
            raise ModelDirectoryError(f"config.json: graph {name!r} file {raw['file']!r} has no sha256 in `files`")
    if WEIGHTS_GRAPH not in graphs_raw:
        raise ModelDirectoryError(f"config.json: no `{WEIGHTS_GRAPH}` graph (needed for attention weights)")

    routing_raw = _require(config, "routing", dict)
    routing: dict[str, dict[bool, tuple[Route, ...]]] = {}
    for provider in PROVIDERS:
        table = routing_raw.get(provider)
        if not isinstance(table, dict):
            raise ModelDirectoryError(f"config.json: routing.{provider} missing")
        routing[provider] = {
            masked: _routes(table.get(key), graphs_raw, f"routing.{provider}.{key}")
            for masked, key in ((False, "unmasked"), (True, "masked"))
        }

    # config.json is sound: now the files, each read once.
    contents = _read_files(path, files, {raw["file"] for raw in graphs_raw.values()}, verify)
    graphs = {
        name: Graph(
            name,
            path / raw["file"],
            str(raw["form"]),
            bool(raw["masked"]),
            tuple(raw["outputs"]),
            contents[raw["file"]],
        )
        for name, raw in graphs_raw.items()
    }

    weights = config.get("weights", {})
    detail = {k: v for k, v in weights.items() if k != "kind"}
    return ModelDirectory(
        path=path,
        d_model=int(_require(config, "d_model", int)),
        num_heads=int(_require(config, "num_heads", int)),
        causal=bool(config.get("causal", False)),
        max_seq_len=int(_require(config, "max_seq_len", int)),
        graphs=graphs,
        routing=routing,
        weights_kind=str(weights.get("kind", "unknown")),
        weights_detail=json.dumps(detail, sort_keys=True),
        weights_sha256=str(files.get("weights.npz", "")),
    )
