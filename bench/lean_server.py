"""The least a Python KServe v2 server can do per request: the reference the service's path is measured against.

A generic unary handler on grpc.aio decodes ModelInferRequest, computes on the event loop's own thread (no
hop, no queue, no batching) and encodes the answer; nothing else: no limits, checks, metrics, logs, deadlines
or slots. Small runs (≤ 32 tokens) use a one-thread session, as the service does, larger ones every core.
Issue 16's lean prototype, in the variant that measured fastest here (an engine thread batching whatever
waits measured slower on 2 cores: each hop's wake-ups cost more than the batching saves).

    python -m bench.lean_server --port 0 --model-dir models/attention   # prints "ready <port>"
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from bench.harness.aio_server import serve
from service._pb.inference import grpc_service_pb2 as pb
from service.core.types import INPUT, OUTPUT
from service.engine.batcher import INLINE_SINGLE_THREAD_TOKENS
from service.engine.model_dir import load_model_directory

METHOD = "/inference.GRPCInferenceService/ModelInfer"


class Lean(grpc.GenericRpcHandler):
    def __init__(self, model_dir: Path) -> None:
        self.model = load_model_directory(model_dir)
        graphs = {route.graph for route in self.model.routing["cpu"][False]}
        one = ort.SessionOptions()
        one.intra_op_num_threads = 1
        self.sessions = {
            threads: {
                name: ort.InferenceSession(
                    str(self.model.graphs[name].path), options, providers=["CPUExecutionProvider"]
                )
                for name in graphs
            }
            for threads, options in ((1, one), (0, ort.SessionOptions()))
        }
        self.handler = grpc.unary_unary_rpc_method_handler(self.infer)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handler if handler_call_details.method == METHOD else None

    async def infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = pb.ModelInferRequest.FromString(raw)
        shape = tuple(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
        threads = 1 if shape[0] * shape[1] <= INLINE_SINGLE_THREAD_TOKENS else 0
        session = self.sessions[threads][self.model.route("cpu", False, shape[1]).name]
        (output,) = session.run([OUTPUT], {INPUT: x})
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name=OUTPUT, datatype="FP32", shape=output.shape)
        response.raw_output_contents.append(output.tobytes())
        return response.SerializeToString()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.lean_server")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    args = p.parse_args()
    lean = Lean(args.model_dir)
    asyncio.run(serve(args.port, lambda server: server.add_generic_rpc_handlers([lean])))
