"""`python -m service`: settings, logging, serve; SIGTERM or SIGINT -> drain -> exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError

from service.errors import ListenError, ModelDirectoryError, ProviderError
from service.memory import keep_freed_memory
from service.settings import parse_settings


async def serve(argv: list[str] | None = None) -> int:
    from service.server import AttnServer  # after logging is configured

    settings = parse_settings(argv)
    if settings.keep_freed_memory:
        keep_freed_memory()
    server = AttnServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    logging.getLogger("service").info("signal received: draining (grace %.1f s)", settings.drain_grace_s)
    await server.drain()
    return 0


def _access_log_to_stdout() -> None:
    """Access lines are JSON for machines: bare, on stdout, apart from the human log on stderr."""
    from service.observe import ACCESS_LOGGER

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(handler)
    access.setLevel(logging.INFO)  # --access-log decides, not --log-level
    access.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = parse_settings(argv)
        logging.getLogger().setLevel(settings.log_level.upper())
        _access_log_to_stdout()
        return asyncio.run(serve(argv))
    except ValidationError as e:
        print(f"attnserve: bad settings: {e}", file=sys.stderr)
        return 2
    except (ModelDirectoryError, ProviderError, ListenError) as e:
        print(f"attnserve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
