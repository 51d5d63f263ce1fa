"""The bench's own gRPC servers (bench/echo_server.py, bench/baseline_server.py), their side of the start-up:
listen on loopback, print "ready <port>" (what bench.harness.servers.start_bench_server waits for), serve."""

from __future__ import annotations

from collections.abc import Callable

import grpc

OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
READY = "ready"


async def serve(port: int, add_handlers: Callable[[grpc.aio.Server], None]) -> None:
    """A grpc.aio server on 127.0.0.1:port (0: any) with add_handlers' services, until it is killed."""
    server = grpc.aio.server(options=OPTIONS)
    add_handlers(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"{READY} {bound}", flush=True)
    await server.wait_for_termination()
