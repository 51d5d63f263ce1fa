"""A plain baseline: KServe v2 ModelInfer on grpc.aio, np.frombuffer in, session.run via asyncio.to_thread.

What a first server would look like: onnxruntime's default session options, the default thread pool, no
batching. It routes each sequence length to the same graph as the service, so only the serving differs.

    python -m bench.baseline_server --port 0 --model-dir models/attention   # prints "ready <port>"
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
from service._pb.inference import grpc_service_pb2_grpc as pb_grpc
from service.engine.model_dir import load_model_directory


class Baseline(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_dir: Path) -> None:
        self.model = load_model_directory(model_dir)
        graphs = {route.graph for route in self.model.routing["cpu"][False]}
        self.sessions = {
            name: ort.InferenceSession(str(self.model.graphs[name].path), providers=["CPUExecutionProvider"])
            for name in graphs
        }

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> object:
        shape = tuple(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
        session = self.sessions[self.model.route("cpu", False, shape[1]).name]
        (output,) = await asyncio.to_thread(session.run, ["output"], {"hidden_states": x})
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="output", datatype="FP32", shape=output.shape)
        response.raw_output_contents.append(output.tobytes())
        return response


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.baseline_server")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=Path("models/attention"))
    args = p.parse_args()

    def add_baseline(server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Baseline(args.model_dir), server)

    asyncio.run(serve(args.port, add_baseline))
