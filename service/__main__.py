"""`python -m service`: settings, logging, serve; SIGTERM or SIGINT -> drain -> exit 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from pydantic import ValidationError

from service.app.settings import Secrets, Settings, parse_settings, read_secrets
from service.core.errors import ListenError, ModelDirectoryError, ProviderError, SettingsError
from service.host.malloc import keep_freed_memory
from service.host.thread_names import LOOP, name_this_thread
from service.observe.log_format import configure_logging
from service.observe.trace_config import TraceConfig


async def serve(settings: Settings, secrets: Secrets, trace: TraceConfig) -> int:
    from service.app.server import AttnServer  # after logging is configured

    if settings.keep_freed_memory:
        keep_freed_memory()
    server = AttnServer(settings, secrets, trace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    name_this_thread(LOOP)  # after gRPC started its own threads, which would inherit the name
    await stop.wait()
    logging.getLogger("service").info("signal received: draining (grace %.1f s)", settings.drain_grace_s)
    await server.drain()
    return 0


def _fail(message: str, settings: Settings | None) -> None:
    """Why the server stops, on stderr: a log record when the log is JSON (a shipper parses every line), else the
    plain line it always was (also when the settings themselves are what failed)."""
    if settings is not None and settings.log_format == "json":
        logging.getLogger("service").critical(message)
    else:
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings: Settings | None = None
    try:
        settings = parse_settings(argv)  # logs nothing: the log's format and level come from it
        configure_logging(settings.log_format, settings.log_level)
        # Token and TLS files are read here, once, before the model loads, and the server uses these bytes.
        # An unusable one is a bad setting (exit 2), TLS files included: like the token file, the fix is the
        # file a setting names; exit 1 stays for failures found while starting (model, provider, ports).
        secrets = read_secrets(settings)
        # Tracing follows OpenTelemetry's standard OTEL_* variables, as its collectors' operators expect.
        trace = TraceConfig.from_env(os.environ)
        return asyncio.run(serve(settings, secrets, trace))
    except (ValidationError, SettingsError) as e:
        _fail(f"attnserve: bad settings: {e}", settings)
        return 2
    except (ModelDirectoryError, ProviderError, ListenError) as e:
        _fail(f"attnserve: {e}", settings)
        return 1


if __name__ == "__main__":
    sys.exit(main())
