"""`make bench-model`: torch eager vs every ONNX graph form vs the form the service routes to.

Prints a table and writes a markdown report. Ratios are measured in one run, forms interleaved
round by round, so a noisy shared machine slows them alike. The fp32 GEMM rate of this machine
(onnxruntime's MatMul, same thread count) is measured in the same run as the yardstick.

    python -m bench.model_bench --model-dir models/attention --out reports/model_bench.md
    python -m bench.model_bench --device cuda ...   # on a GPU machine: CUDA EP FP32/FP16 vs torch SDPA
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from model.calibrate import route
from model.config import AttentionConfig
from model.export import read_model_dir
from model.fused_graphs import build_mha_graph
from model.graph_set import write_graphs
from model.timing import attention_flops, cpu_session, cpu_threads, interleaved_medians, timed
from model.torch_export import build_module

CPU_FORMS = ("plain", "mha", "attention23")
TARGET_SPEEDUP_SHAPES = ((1, 16), (1, 512), (1, 2048), (1, 4096), (8, 512))


def gemm_gflops(threads: int, n: int = 2048) -> float:
    """fp32 GEMM rate of this machine: an n³ MatMul through onnxruntime (MLAS), best of 5."""
    a = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [n, n])
    b = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [n, n])
    c = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [n, n])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", [a, b], [c])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    session = cpu_session(model.SerializeToString(), threads)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    session.run(None, feed)
    best = min(timed(lambda: session.run(None, feed)) for _ in range(5))
    return 2 * n**3 / best / 1e9


def cpu_runners(
    sessions: dict[str, ort.InferenceSession], module: torch.nn.Module, batch: int, seq: int, d_model: int
) -> dict[str, Callable[[], object]]:
    x = np.random.default_rng(seq).standard_normal((batch, seq, d_model), dtype=np.float32)
    xt = torch.from_numpy(x)

    def torch_eager() -> object:
        with torch.inference_mode():
            return module(xt)

    runners: dict[str, Callable[[], object]] = {"torch": torch_eager}
    for form, session in sessions.items():
        runners[form] = lambda s=session: s.run(None, {"hidden_states": x})
    return runners


def run_cpu(args: argparse.Namespace) -> str:
    config, weights = read_model_dir(args.model_dir)
    threads = args.threads or cpu_threads()
    torch.set_num_threads(threads)
    attention = AttentionConfig(config["d_model"], config["num_heads"], config["causal"])
    module = build_module(weights, attention)  # fast path: F.scaled_dot_product_attention
    table = config["routing"]["cpu"]["unmasked"]
    gemm = gemm_gflops(threads)
    print(f"fp32 GEMM rate (onnxruntime MatMul 2048³, {threads} threads): {gemm:.1f} GFLOP/s", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        graphs = write_graphs(weights, attention, Path(scratch), config["opset"])
        sessions = {form: cpu_session(Path(scratch) / graphs[form]["file"], threads) for form in CPU_FORMS}
        rows = []
        for batch in args.batches:
            for seq in args.seqs:
                ms = interleaved_medians(
                    cpu_runners(sessions, module, batch, seq, attention.d_model),
                    rounds=args.rounds,
                    budget_s=args.budget,
                )
                ms = {k: v * 1e3 for k, v in ms.items()}
                chosen = route(table, seq)
                rows.append(
                    {
                        "batch": batch,
                        "seq": seq,
                        "ms": ms,
                        "chosen": chosen,
                        "gflops": attention_flops(batch, seq, attention.d_model) / (ms[chosen] / 1e3) / 1e9,
                    }
                )
                print(_row_text(rows[-1], gemm), flush=True)
    return _cpu_report(rows, gemm, threads, config, args)


def _row_text(row: dict, gemm: float) -> str:
    ms = row["ms"]
    forms = "  ".join(f"{f} {ms[f]:8.2f}" for f in CPU_FORMS)
    return (
        f"B={row['batch']} L={row['seq']:5d}  torch {ms['torch']:8.2f}  {forms}  -> {row['chosen']}"
        f"  x{ms['torch'] / ms[row['chosen']]:.2f} vs torch  {row['gflops'] / gemm:.0%} of GEMM"
    )


def _cpu_report(rows: list[dict], gemm: float, threads: int, config: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Model benchmark (CPU)",
        "",
        f"`python -m bench.model_bench` on {platform.processor() or platform.machine()}, {threads} threads, "
        f"d_model {config['d_model']}, {config['num_heads']} heads, causal {config['causal']}, FP32, no mask. "
        f"Median ms over ≥{args.rounds} interleaved rounds. onnxruntime {ort.__version__}, torch {torch.__version__}.",
        "",
        f"fp32 GEMM rate measured in this run (onnxruntime MatMul 2048³): **{gemm:.1f} GFLOP/s**. "
        "FLOPs of one call: 8·B·L·d² + 4·B·L²·d.",
        "",
        "| B | seq | torch SDPA ms | "
        + " | ".join(f"{f} ms" for f in CPU_FORMS)
        + " | chosen | chosen vs torch | chosen vs fastest | chosen % of GEMM |",
        "|---|---|---|" + "---|" * len(CPU_FORMS) + "---|---|---|---|",
    ]
    for r in rows:
        ms, chosen = r["ms"], r["chosen"]
        fastest = min(ms[f] for f in CPU_FORMS)
        lines.append(
            f"| {r['batch']} | {r['seq']} | {ms['torch']:.2f} | "
            + " | ".join(f"{ms[f]:.2f}" for f in CPU_FORMS)
            + f" | {chosen} | {ms['torch'] / ms[chosen]:.2f}× | {ms[chosen] / fastest:.3f} | {r['gflops'] / gemm:.0%} |"
        )
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    within = [r["ms"][r["chosen"]] / min(r["ms"][f] for f in CPU_FORMS) for r in rows]
    lines.append(
        f"| chosen form within 5% of the fastest, every shape | worst {max(within):.3f}× | "
        f"{'yes' if max(within) <= 1.05 else 'no'} |"
    )
    for batch, seq in TARGET_SPEEDUP_SHAPES:
        for r in rows:
            if (r["batch"], r["seq"]) == (batch, seq):
                speedup = r["ms"]["torch"] / r["ms"][r["chosen"]]
                lines.append(
                    f"| ≥ 1.2× torch eager at B={batch} seq {seq} | {speedup:.2f}× | "
                    f"{'yes' if speedup >= 1.2 else 'no'} |"
                )
    for r in rows:
        if (r["batch"], r["seq"]) == (1, 4096):
            frac = r["gflops"] / gemm
            lines.append(
                f"| ≥ 85% of the GEMM rate at B=1 seq 4096 | {frac:.0%} ({r['gflops']:.1f} GFLOP/s) | "
                f"{'yes' if frac >= 0.85 else 'no'} |"
            )
    lines += [
        "",
        f"Routing table used (from {args.model_dir}/config.json, cpu, unmasked): "
        f"`{json.dumps(config['routing']['cpu']['unmasked'])}`",
        "",
    ]
    return "\n".join(lines)


def run_cuda(args: argparse.Namespace) -> str:
    """CUDA EP FP32 and FP16 (mha graph) against torch SDPA on the GPU, B=8, seq 512…8192."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("bench.model_bench: --device cuda needs onnxruntime's CUDAExecutionProvider")
    config, weights = read_model_dir(args.model_dir)
    heads, causal = config["num_heads"], config["causal"]
    sessions = {}
    for name, dtype in (("cuda_fp32", np.float32), ("cuda_fp16", np.float16)):
        model = build_mha_graph(weights, heads, causal, masked=False, dtype=np.dtype(dtype))
        sessions[name] = (ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"]), dtype)
    has_torch_cuda = torch.cuda.is_available()
    module = build_module(weights, AttentionConfig(config["d_model"], heads, causal))
    if has_torch_cuda:
        module = module.cuda()
    rows = []
    for seq in args.seqs:
        x = np.random.default_rng(seq).standard_normal((8, seq, config["d_model"]), dtype=np.float32)
        runners: dict[str, Callable[[], object]] = {}
        for name, (session, dtype) in sessions.items():
            binding = session.io_binding()
            binding.bind_ortvalue_input("hidden_states", ort.OrtValue.ortvalue_from_numpy(x.astype(dtype), "cuda", 0))
            binding.bind_output("output", "cuda")
            runners[name] = lambda s=session, b=binding: s.run_with_iobinding(b)
        if has_torch_cuda:
            for name, tdtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
                # A copy per dtype: Module.to() converts in place, which would turn the FP32 runner into FP16.
                m, xt = copy.deepcopy(module).to(tdtype), torch.from_numpy(x).cuda().to(tdtype)

                def run(m: torch.nn.Module = m, xt: torch.Tensor = xt) -> object:
                    with torch.inference_mode():
                        out = m(xt)
                    torch.cuda.synchronize()
                    return out

                runners[name] = run
        ms = {k: v * 1e3 for k, v in interleaved_medians(runners, args.rounds, args.budget).items()}
        rows.append((seq, ms))
        print(seq, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    names = list(rows[0][1])
    lines = [
        "# Model benchmark (CUDA)",
        "",
        f"B=8, d_model {config['d_model']}, {heads} heads; median ms.",
        "",
        "| seq | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {seq} | " + " | ".join(f"{ms[n]:.3f}" for n in names) + " |" for seq, ms in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    p.add_argument("--out", type=Path, default=Path("reports/model_bench.md"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seqs", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds at least")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per shape, all runners")
    p.add_argument("--threads", type=int, default=0, help="0 = the cores this process may use")
    args = p.parse_args(argv)
    if args.seqs is None:
        args.seqs = [512, 1024, 2048, 4096, 8192] if args.device == "cuda" else [16, 64, 128, 512, 1024, 2048, 4096]
    report = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
