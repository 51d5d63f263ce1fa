"""Where one request's CPU goes in the service, step by step, in this process and without gRPC's transport.

Each step of a KServe ModelInfer's way is timed alone, N times over, for its CPU (time.process_time: every
thread of the process, so a hop to an engine thread and onnxruntime's pool count too): decoding the message,
the codec, the dataplane (queue, batcher, compute), the answer's codec and encoding, the observer (metrics and
access log), and the whole handler as gRPC calls it (the call gate, the servicer, everything above). The
compute alone (session.run on the session the service picks) is the part no serving code can remove.

`make bench-serve` runs this twice, on this checkout and on an older one (`--before`), each in its own process
with that checkout's `service` package, so the two columns of its table compare code, not machines. Prints
one JSON object.

    python -m bench.serve_stages --model-dir models/attention [--seq 16] [--count 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from service._pb.inference import grpc_service_pb2 as pb
from service.api import kserve_codec as codec
from service.app.server import AttnServer
from service.app.settings import parse_settings
from service.core.types import INPUT, OUTPUT, AttentionRequest

METHOD = "/inference.GRPCInferenceService/ModelInfer"


class _Context:
    """What the call gate and the servicer ask of a grpc.aio context on a request that succeeds."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def read(self) -> bytes:
        return self.raw

    def time_remaining(self) -> float:
        return 60.0

    def invocation_metadata(self) -> tuple:
        return ()


def _cpu_us(fn: Callable[[], object], count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        fn()
    return (time.process_time() - started) / count * 1e6


async def _cpu_us_async(fn: Callable[[], Awaitable[object]], count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        await fn()
    return (time.process_time() - started) / count * 1e6


async def measure(model_dir: Path, seq: int, count: int) -> dict[str, Any]:
    settings = parse_settings(["--model-dir", str(model_dir), "--grpc-port", "0", "--metrics-port", "0"])
    server = AttnServer(settings)
    server.dataplane.ready = True
    x = np.random.default_rng(0).standard_normal((1, seq, server.engine.model.d_model), dtype=np.float32)
    message = pb.ModelInferRequest(model_name=settings.model_name)
    message.inputs.add(name=INPUT, datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.tobytes())
    raw = message.SerializeToString()
    call = codec.infer_request_from_pb(message, settings.model_name)
    result = await server.dataplane.attend(call.request)
    response = codec.infer_response_to_pb(call, result, settings.model_name)
    handler = server.gate._handlers[METHOD]
    observer = server.gate.observer

    def observe() -> None:
        with observer.observe("kserve", "ModelInfer") as seen:
            seen.request, seen.result = call.request, result

    async def whole() -> bytes:
        answer = await handler.stream_unary(None, _Context(raw))
        return handler.response_serializer(answer)

    graph = server.engine.route(False, seq).name
    single = getattr(server.engine, "narrow_sessions", {}).get(graph)
    session = single if single is not None and seq <= 32 else server.engine.sessions[graph]
    feed = {INPUT: x}
    for _ in range(50):  # warm every path before timing it
        await whole()
        session.run([OUTPUT], feed)
    steps = {
        "decode the message (protobuf)": _cpu_us(lambda: pb.ModelInferRequest.FromString(raw), count),
        "request codec (checks, views)": _cpu_us(
            lambda: codec.infer_request_from_pb(message, settings.model_name), count
        ),
        "dataplane: queue, batcher, compute": await _cpu_us_async(
            lambda: server.dataplane.attend(AttentionRequest(x, None, None)), count
        ),
        "answer codec": _cpu_us(lambda: codec.infer_response_to_pb(call, result, settings.model_name), count),
        "encode the answer (protobuf)": _cpu_us(response.SerializeToString, count),
        "observer: metrics and access log": _cpu_us(observe, count),
        "whole handler (gate, servicer, all above)": await _cpu_us_async(whole, count),
        "compute alone (session.run)": _cpu_us(lambda: session.run([OUTPUT], feed), count),
    }
    server.batcher.close()
    return {"seq": seq, "count": count, "steps_us": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_stages", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--count", type=int, default=2000)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args.model_dir, args.seq, args.count))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
