"""The floor of Python gRPC here: a grpc.aio server that answers any unary call with the request's bytes.

`python -m bench.echo_server --port 0` prints "ready <port>" once it listens.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from bench.harness.aio_server import serve


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


class AnyMethod(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: bytes in, bytes out


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.echo_server")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model-dir", help="ignored: the same command line as the other servers")
    asyncio.run(serve(p.parse_args().port, lambda server: server.add_generic_rpc_handlers([AnyMethod()])))
