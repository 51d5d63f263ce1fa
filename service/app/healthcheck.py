"""`python -m service.app.healthcheck`: exit 0 when the server's grpc.health.v1 Check answers SERVING, else 1.

The container images' HEALTHCHECK. Not SERVING (warming up, draining), an unknown service name, or no answer
within the timeout: exit 1, with the status or the error on stderr. It speaks plaintext: with TLS on, probe the
server's --health-port. Without --address it probes loopback at the port the server's own settings give
(ATTNSERVE_HEALTH_PORT, else ATTNSERVE_GRPC_PORT, else 8001), so the probe follows the container's environment.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = "SERVING"


def health_status(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The status name (SERVING, NOT_SERVING, ...) of `service` ("": the server as a whole).

    Raises grpc.RpcError when there is no answer: nothing listening, an unknown service, the deadline passed.
    """
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def default_address() -> str:
    """127.0.0.1 at the health port, else the gRPC port, of the settings from the ATTNSERVE_* environment."""
    from service.app.settings import Settings  # only when needed: pydantic adds to every probe's start-up

    settings = Settings()
    port = settings.health_port if settings.health_port is not None else settings.grpc_port
    return f"127.0.0.1:{port}"


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.app.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address", help="host:port of the server (default: 127.0.0.1 at ATTNSERVE_HEALTH_PORT or ATTNSERVE_GRPC_PORT)"
    )
    parser.add_argument("--service", default="", help="service name to check (default: the server as a whole)")
    parser.add_argument("--timeout-s", type=_positive_seconds, default=2.0, help="deadline of the call (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.address is None:
        try:
            args.address = default_address()
        except ValueError as e:  # pydantic's ValidationError: the environment the server would refuse too
            print(f"healthcheck: bad ATTNSERVE_* settings: {e}", file=sys.stderr)
            return 1
    what = f"{args.address} service {args.service!r}" if args.service else args.address
    try:
        status = health_status(args.address, args.service, args.timeout_s)
    except grpc.RpcError as e:
        # The sync stub's errors are also grpc.Call, which carries the code and the details.
        reason = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else repr(e)
        print(f"healthcheck {what}: {reason}", file=sys.stderr)
        return 1
    print(f"healthcheck {what}: {status}", file=sys.stdout if status == SERVING else sys.stderr)
    return 0 if status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
