"""`python -m model.export --out DIR`: write a model directory the service can load.

Steps: weights (seed, state dict or BERT layer) -> every graph form into a scratch
directory -> parity of every graph against the float64 numpy reference -> measure the
forms and record, per sequence-length range, which one to run -> config.json with the
sha256 of every file -> move into place. A failure at any step leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from model.config import AttentionConfig
from model.reference import ParityError
from model.weights import Weights, WeightsError, file_sha256, load_bert_layer, load_state_dict, seeded_weights, validate

FORMAT = "attnserve-model/1"
DEFAULT_D_MODEL, DEFAULT_HEADS = 512, 8
OPSETS = range(18, 24)  # what torch's exporter and onnxruntime 1.31 both handle
MAX_SEQ_LIMIT = 65536
PARITY_REL_L2, PARITY_MAX_ABS = 1e-5, 1e-4
# Unmasked/masked graph of each form; "weights" is the inspection graph.
FORMS = ("plain", "mha", "attention23")
# Kept whatever calibration says: plain is the torch export itself, mha is what CUDA runs.
ALWAYS_KEPT = ("plain", "mha")
# The CUDA route (flash / memory-efficient kernels; not measurable without a GPU) and the CPU route when
# calibration is skipped: on this machine it is never far from the fastest form (see reports/model_bench.md).
BUILT_IN_FORM = "mha"


class ExportError(Exception):
    """Bad input to the CLI: exit 2 with this one line."""


@dataclass(frozen=True)
class ExportPlan:
    config: AttentionConfig
    weights: Weights
    source: dict[str, object]
    out: Path
    max_seq_len: int
    opset: int
    calibrate: bool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="model directory to write (replaced if it is one)")
    p.add_argument("--d-model", type=int, help=f"model width (default {DEFAULT_D_MODEL}, or the checkpoint's)")
    p.add_argument("--heads", type=int, help=f"attention heads (default {DEFAULT_HEADS}, or the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    p.add_argument("--causal", action="store_true", help="query i attends to keys 0..i only")
    p.add_argument("--checkpoint", type=Path, help=".pt/.safetensors/.npz state dict, or a BERT checkpoint directory")
    p.add_argument("--layer", type=int, default=None, help="BERT layer whose self-attention to export (default 5)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="longest sequence the service will accept")
    p.add_argument(
        "--opset", type=int, default=18, help=f"ONNX opset of the exported graphs ({OPSETS.start}..{OPSETS.stop - 1})"
    )
    p.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip measuring the graph forms; route by the built-in table",
    )
    return p


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ExportError(f"{name} must be a positive integer, got {value}")


def plan_from_args(args: argparse.Namespace) -> ExportPlan:
    """Validate every flag and load the weights; raise ExportError naming what is wrong."""
    _positive("--d-model", args.d_model)
    _positive("--heads", args.heads)
    _positive("--max-seq-len", args.max_seq_len)
    if args.max_seq_len > MAX_SEQ_LIMIT:
        raise ExportError(f"--max-seq-len must be at most {MAX_SEQ_LIMIT}, got {args.max_seq_len}")
    if args.opset not in OPSETS:
        raise ExportError(f"--opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {args.opset}")
    if args.layer is not None and args.checkpoint is None:
        raise ExportError("--layer needs --checkpoint (a BERT checkpoint directory)")
    _check_out(args.out)

    try:
        weights, heads, source = _load_weights(args)
    except WeightsError as e:
        raise ExportError(str(e)) from None
    d_model = validate(weights, "weights")
    if args.d_model is not None and args.d_model != d_model:
        raise ExportError(f"--d-model {args.d_model} does not match the checkpoint's d_model {d_model}")
    try:
        config = AttentionConfig(d_model=d_model, num_heads=heads, causal=args.causal)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return ExportPlan(config, weights, source, args.out, args.max_seq_len, args.opset, args.calibrate)


def _load_weights(args: argparse.Namespace) -> tuple[Weights, int, dict[str, object]]:
    if args.checkpoint is None:
        d_model = args.d_model or DEFAULT_D_MODEL
        heads = args.heads or DEFAULT_HEADS
        _positive("--heads", heads)
        if d_model % heads:
            raise ExportError(f"--d-model ({d_model}) must be divisible by --heads ({heads})")
        return seeded_weights(d_model, args.seed), heads, {"kind": "seeded", "seed": args.seed}
    checkpoint: Path = args.checkpoint
    if checkpoint.is_dir():
        layer = 5 if args.layer is None else args.layer
        weights, heads = load_bert_layer(checkpoint, layer)
        if args.heads is not None and args.heads != heads:
            raise ExportError(f"--heads {args.heads} does not match the checkpoint's num_attention_heads {heads}")
        tensors = checkpoint / "model.safetensors"
        return (
            weights,
            heads,
            {"kind": "bert", "path": str(checkpoint.resolve()), "layer": layer, "sha256": file_sha256(tensors)},
        )
    weights = load_state_dict(checkpoint)
    return (
        weights,
        args.heads or DEFAULT_HEADS,
        {"kind": "state_dict", "path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint)},
    )


def read_config(model_dir: Path) -> dict:
    """The config.json of a model directory."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def read_model_dir(model_dir: Path) -> tuple[dict, Weights]:
    """config.json and the weights.npz beside it (names and shapes checked)."""
    return read_config(model_dir), load_state_dict(Path(model_dir) / "weights.npz")


def is_model_dir(path: Path) -> bool:
    try:
        return read_config(path).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path) -> None:
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise ExportError(f"--out {out}: parent {out.parent} is not a directory")
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is a file; give a new path or an existing model directory")
    if any(out.iterdir()) and not is_model_dir(out):
        raise ExportError(
            f"--out {out} exists and is not a model directory (no {FORMAT} config.json); give a new path or remove it"
        )


def export(plan: ExportPlan, log: Callable[[str], object] = print) -> dict[str, object]:
    """Write the model directory; return its config."""
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = plan.out.parent / f".{plan.out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        config = _write_graphs_and_config(plan, scratch, log)
        _replace_dir(scratch, plan.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return config


def _write_graphs_and_config(plan: ExportPlan, scratch: Path, log: Callable[[str], object]) -> dict[str, object]:
    from model.graph_set import check_parity, write_graphs
    from model.weights import save_npz

    started = time.perf_counter()
    graphs = write_graphs(plan.weights, plan.config, scratch, plan.opset)
    log(f"graphs written ({', '.join(graphs)}) in {time.perf_counter() - started:.1f} s")
    parity = check_parity(
        plan.weights,
        plan.config,
        {name: scratch / g["file"] for name, g in graphs.items()},
        max_seq_len=plan.max_seq_len,
        rel_l2=PARITY_REL_L2,
        max_abs=PARITY_MAX_ABS,
    )
    log(f"parity ok: worst rel L2 {parity['max_rel_l2']:.2e}, worst abs {parity['max_abs']:.2e}")

    routing, calibration = _route(plan, {name: scratch / g["file"] for name, g in graphs.items()})
    how = "measured" if plan.calibrate else "built-in"
    log(f"routing (cpu, {calibration['threads']} threads, {how}): {json.dumps(routing['cpu'])}")
    routed = {entry["graph"] for provider in routing.values() for table in provider.values() for entry in table}
    for name in list(graphs):
        if graphs[name]["form"] not in ALWAYS_KEPT and name not in routed:
            (scratch / graphs.pop(name)["file"]).unlink()

    save_npz(plan.weights, scratch / "weights.npz")
    files = sorted(p.name for p in scratch.iterdir())
    config = {
        "format": FORMAT,
        **asdict(plan.config),
        "head_dim": plan.config.head_dim,
        "max_seq_len": plan.max_seq_len,
        "dtype": "float32",
        "opset": plan.opset,
        "inputs": {
            "hidden_states": "FP32 [batch, seq, d_model]",
            "attention_mask": "INT32 [batch, seq], 1 = real token",
        },
        "outputs": {
            "output": "FP32 [batch, seq, d_model]; padded query rows are 0",
            "attention_weights": "FP32 [batch, heads, seq, seq] (weights graph only)",
        },
        "graphs": graphs,
        "routing": routing,
        "calibration": calibration,
        "weights": plan.source,
        "parity": parity,
        "versions": _versions(),
        "files": {name: file_sha256(scratch / name) for name in files},
    }
    (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


Routing = dict[str, dict[str, list[dict[str, object]]]]  # provider -> mask variant -> [{"up_to", "graph"}]


def _route(plan: ExportPlan, graph_paths: dict[str, Path]) -> tuple[Routing, dict[str, object]]:
    """Per provider and mask variant, which graph runs up to which seq length; with the timings behind it."""
    from model.calibrate import calibration_points, measure_forms, routing_from_timings, static_routing
    from model.timing import cpu_threads

    threads = cpu_threads()
    routing: Routing = {"cpu": {}, "cuda": {}}
    calibration: dict[str, object] = {"measured": plan.calibrate, "threads": threads}
    for variant, suffix in (("unmasked", ""), ("masked", "_masked")):
        routing["cuda"][variant] = static_routing(f"{BUILT_IN_FORM}{suffix}", plan.max_seq_len)
        if not plan.calibrate:
            routing["cpu"][variant] = static_routing(f"{BUILT_IN_FORM}{suffix}", plan.max_seq_len)
            continue
        candidates = {f"{form}{suffix}": graph_paths[f"{form}{suffix}"] for form in FORMS}
        ms = measure_forms(candidates, plan.config.d_model, calibration_points(plan.max_seq_len), threads)
        calibration[variant] = {name: {str(s): round(t, 3) for s, t in per.items()} for name, per in ms.items()}
        routing["cpu"][variant] = routing_from_timings(ms)
    return routing, calibration


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def _replace_dir(new: Path, out: Path) -> None:
    """Swap the finished directory in; an old model directory is removed only after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # argparse's own error exits with usage lines; ours is the one clear line every failure gives
    parser.error = lambda message: _fail(f"{message} (see --help)")  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
        started = time.perf_counter()
        config = export(plan, log=lambda line: print(f"model.export: {line}", flush=True))
    except ExportError as e:
        _fail(str(e))
    except ParityError as e:
        print(f"model.export: parity check failed, nothing written: {e}", file=sys.stderr)
        return 1
    print(
        f"model.export: wrote {plan.out} (d_model {config['d_model']}, {config['num_heads']} heads, "
        f"causal {config['causal']}) in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _fail(message: str) -> NoReturn:
    print(f"model.export: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
