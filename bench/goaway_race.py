"""How often gRPC core loses an answer when a connection is closed after GOAWAY, on a plain grpcio aio server.

After its final GOAWAY, gRPC shuts a connection down as soon as the last call on it ends, that is once the
answer's bytes are handed to the kernel. A client still reading a big answer then sends a window update into the
closed socket; the kernel resets the connection and drops the answer's unsent tail, and the call ends
UNAVAILABLE "Connection reset by peer". Server.drain sends GOAWAY only once the answers in flight are written.

  python -m bench.goaway_race drain --rounds 80   # stop during the call (GOAWAY first) vs after its answer
  python -m bench.goaway_race age --seconds 40    # grpc.max_connection_age_ms closing connections under load

Each round or call is a stock grpcio client in a child process; the answers are 16 MiB of zeros. The race needs
a client that lags behind the server: losses are rare on an idle machine (drain: 0 of 60 rounds either way here),
more frequent beside busy loops or other work (GOAWAY first: 1 of 50 with two busy loops, 7 of 140 while tests
ran; answer written first: 0 of 170 in all).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

import grpc

ANSWER_BYTES = 16 << 20
BIG = 1 << 26

CLIENT = f"""
import sys, time, grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", {BIG})])
call = channel.unary_unary("/race.Race/Big")
ok = lost = 0
end = time.monotonic() + float(sys.argv[2])
while True:
    try:
        assert len(call(b"", timeout=30)) == {ANSWER_BYTES}
        ok += 1
    except grpc.RpcError:
        lost += 1
    if time.monotonic() >= end:
        break
print(ok, lost, flush=True)
"""


async def _serve(big: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]], *options: tuple) -> tuple:
    handler = grpc.method_handlers_generic_handler("race.Race", {"Big": grpc.unary_unary_rpc_method_handler(big)})
    server = grpc.aio.server(handlers=[handler], options=[("grpc.max_send_message_length", BIG), *options])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _client(address: str, seconds: float) -> tuple[int, int]:
    """Calls one after another for `seconds` (0: one call); how many were answered whole and how many lost."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, address, str(seconds), stdout=subprocess.PIPE
    )
    out, _ = await child.communicate()
    ok, lost = map(int, out.split())
    return ok, lost


async def drain_round(goaway_first: bool) -> bool:
    """One call; the server stops during it (GOAWAY first) or once its answer is written. True if it was lost."""
    arrived: asyncio.Queue[asyncio.Task] = asyncio.Queue()

    async def big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        task = asyncio.current_task()
        assert task is not None
        arrived.put_nowait(task)
        await asyncio.sleep(0.3)
        return bytes(ANSWER_BYTES)

    server, address = await _serve(big)
    client = asyncio.create_task(_client(address, 0))
    call = await arrived.get()
    if not goaway_first:
        await asyncio.wait([call])  # gRPC's task for the call ends once the answer is written
    await server.stop(grace=10)
    _, lost = await client
    return lost > 0


async def drain(rounds: int) -> None:
    for goaway_first in (True, False):
        lost = 0
        for _ in range(rounds):
            lost += await drain_round(goaway_first)
        order = "GOAWAY during the call" if goaway_first else "GOAWAY after the answer is written"
        print(f"{order}: {lost} of {rounds} rounds lost the answer", flush=True)


async def age(seconds: float, age_ms: int) -> None:
    async def big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0.02)
        return bytes(ANSWER_BYTES)

    options = (("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", 30_000))
    server, address = await _serve(big, *options)
    ok, lost = await _client(address, seconds)
    await server.stop(grace=1)
    print(f"max_connection_age {age_ms} ms, {seconds:g} s of calls: {lost} of {ok + lost} lost", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("drain").add_argument("--rounds", type=int, default=40)
    aged = sub.add_parser("age")
    aged.add_argument("--seconds", type=float, default=40.0)
    aged.add_argument("--age-ms", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(drain(args.rounds) if args.mode == "drain" else age(args.seconds, args.age_ms))


if __name__ == "__main__":
    main()
