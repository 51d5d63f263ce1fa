"""What the benches share: rounds of load in rotated order, starting and stopping their servers, the CPU meter,
and the code version a report names. Every bench imports shared code from here, never from another bench
(tests/unit/test_bench_layout.py checks it).

The modules stay small and import nothing heavy here, so that bench/echo_server.py (the floor of Python gRPC)
loads only bench/harness/aio_server.py.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: servers start and git runs here
