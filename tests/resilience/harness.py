"""The resilience harness: a real server per case, a victim client, a memory sampler, one result per case.

A case runs inside `case(...)` (which records its CaseResult, pass or fail, and fails the test when a check
failed), starts its server with `running(...)`, and attacks inside `watching(...)`, which runs the victim
(attnserve.v1 Attend of (1,16,512) every 50 ms, grpc.health.v1 Check every second, on a channel of its own)
and samples the server's RSS and thread count from /proc. The table of every case that ran is printed by
tests/resilience/conftest.py.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service._pb.attnserve.v1 import attention_pb2 as v1_pb
from service._pb.attnserve.v1 import attention_pb2_grpc as v1_grpc
from service.api.v1_codec import tensor_to_pb
from tests.server_process import ServerProcess, start_server

D_MODEL = 512
VICTIM_SHAPE = (1, 16, D_MODEL)
VICTIM_PERIOD_S = 0.05
HEALTH_PERIOD_S = 1.0
VICTIM_TIMEOUT_S = 5.0  # a victim call slower than this counts as failed (DEADLINE_EXCEEDED)
SAMPLE_PERIOD_S = 0.1
CALLS_BEFORE_BASELINE = 3
MAX_RELATIVE_L2 = 1e-5
MIB = 1024 * 1024
# Every channel of a case gets a connection of its own: grpc shares one between channels of equal target and
# options, which would put the victim's calls on the attacker's connection (and its per-connection bounds).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
CHANNEL_OPTIONS = [*OWN_CONNECTION, ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
Metadata = tuple[tuple[str, str], ...]


def states(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


@functools.cache
def _model(model_dir: Path) -> tuple[dict[str, np.ndarray], int]:
    config, weights = read_model_dir(model_dir)
    return weights, int(config["num_heads"])


def reference(model_dir: Path, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The float64 answer for x, one sequence at a time (a batch's probabilities at once can take gigabytes)."""
    weights, heads = _model(model_dir)
    rows = [None if mask is None else mask[b : b + 1] for b in range(x.shape[0])]
    return np.concatenate([reference_attention(weights, heads, x[b : b + 1], row)[0] for b, row in enumerate(rows)])


def output_error(model_dir: Path, x: np.ndarray, response: v1_pb.AttendResponse) -> float:
    """Relative L2 of an AttendResponse's output against the reference for x (inf when the shape is wrong)."""
    out = np.frombuffer(response.output.data, np.float32)
    if out.size != x.size:
        return float("inf")
    return relative_l2(out.reshape(x.shape), reference(model_dir, x))


def code_name(error: grpc.RpcError) -> str:
    return error.code().name if isinstance(error, grpc.Call) else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class CaseResult:
    case: str
    attack: str
    codes: Counter[str] = field(default_factory=Counter)  # what the attacker saw (status or exit codes)
    victim_calls: int | None = None  # None: no victim in this case
    victim_p99_ms: float | None = None
    victim_failures: list[str] = field(default_factory=list)
    rss_growth_mib: float | None = None
    rss_bound_mib: float | None = None
    figures: dict[str, str] = field(default_factory=dict)  # what else the case measured
    checks: list[Check] = field(default_factory=list)

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL: " + "; ".join(c.name for c in self.checks if not c.ok)

    def failures(self) -> str:
        return "\n".join(f"- {c.name}: {c.detail}" for c in self.checks if not c.ok) or "- no checks ran"


RESULTS: list[CaseResult] = []  # every case of the session, in the order they ran


@contextlib.contextmanager
def case(name: str, attack: str) -> Iterator[CaseResult]:
    """Record the case's result however it ends, print its figures, and fail the test if a check failed."""
    result = CaseResult(name, attack)
    try:
        yield result
    except BaseException as error:
        result.expect("ran to the end", False, "".join(traceback.format_exception_only(error)).strip()[:300])
        raise
    finally:
        RESULTS.append(result)
        print(describe(result))
    if not result.passed:
        raise AssertionError(f"{name}: failed checks\n{result.failures()}")


def describe(result: CaseResult) -> str:
    """Every figure of one case, one line each (the test's own output)."""
    lines = [f"[{result.case}] {result.attack}", f"  codes: {format_codes(result.codes)}"]
    if result.victim_calls is not None:
        lines.append(
            f"  victim: {result.victim_calls} calls, p99 {format_ms(result.victim_p99_ms)}, "
            f"{len(result.victim_failures)} failed {result.victim_failures[:3]}"
        )
    lines.append(f"  RSS growth: {format_mib(result.rss_growth_mib)} (bound {format_mib(result.rss_bound_mib)})")
    lines += [f"  {key}: {value}" for key, value in result.figures.items()]
    lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}{': ' + c.detail if c.detail else ''}" for c in result.checks]
    return "\n".join(lines)


def format_codes(codes: Counter[str]) -> str:
    return ", ".join(f"{code} ×{n}" for code, n in sorted(codes.items()) if n) or "none"


def format_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def format_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# The server.


@contextlib.contextmanager
def running(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A real server on loopback with the case's flags, stopped (SIGTERM, then SIGKILL) at the end."""
    server = start_server(model_dir, *flags, env=env, timeout_s=60.0)
    try:
        yield server
    finally:
        server.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def check_after(server: ServerProcess, model_dir: Path, metadata: Metadata = ()) -> Check:
    """One Attend on a fresh channel, answered correctly (relative L2 against the float64 reference)."""
    x = states((1, 24, D_MODEL), seed=99)
    request = v1_pb.AttendRequest(id="after", hidden_states=tensor_to_pb(x))
    try:
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            response = v1_grpc.AttentionServiceStub(channel).Attend(request, timeout=30, metadata=metadata)
    except grpc.RpcError as error:
        return Check("answers correctly afterwards", False, f"{code_name(error)}: {error.details()}"[:300])
    error_l2 = output_error(model_dir, x, response)
    return Check("answers correctly afterwards", error_l2 <= MAX_RELATIVE_L2, f"relative L2 {error_l2:.1e}")


# ---------------------------------------------------------------------------------------------------------------
# The victim: a well-behaved client that must see nothing of the attack.


@dataclass(frozen=True)
class Failure:
    at: float  # time.monotonic()
    rpc: str
    code: str
    details: str

    def __str__(self) -> str:
        return f"{self.rpc} {self.code}: {self.details[:120]}"


class Victim:
    """Attend (1,16,512) every 50 ms and health Check every second, on its own thread and channel."""

    def __init__(self, address: str, model_dir: Path, metadata: Metadata = ()) -> None:
        self.address = address
        self.metadata = metadata
        self.x = states(VICTIM_SHAPE, seed=1)
        self.expected = reference(model_dir, self.x)
        self.latencies_s: list[float] = []
        self.started = self.finished = 0  # Attend calls begun and ended: equal while none is in flight
        self.health_checks = 0
        self.failures: list[Failure] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="victim", daemon=True)

    def start(self) -> Victim:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(VICTIM_TIMEOUT_S * 3)

    def wait_calls(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.latencies_s) + len(self.failures) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"victim made {len(self.latencies_s)} calls in {timeout_s} s")
            time.sleep(0.01)

    def p99_ms(self) -> float | None:
        return float(np.percentile(self.latencies_s, 99) * 1e3) if self.latencies_s else None

    def _run(self) -> None:
        request = v1_pb.AttendRequest(id="victim", hidden_states=tensor_to_pb(self.x))
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            attend = v1_grpc.AttentionServiceStub(channel).Attend
            check = health_pb2_grpc.HealthStub(channel).Check
            next_call = next_health = time.monotonic()
            while not self._stop.is_set():
                if time.monotonic() >= next_health:
                    self._health(check)
                    next_health = max(next_health + HEALTH_PERIOD_S, time.monotonic())
                self._attend(attend, request)
                # A fixed schedule; a late call is not made up for with a burst.
                next_call = max(next_call + VICTIM_PERIOD_S, time.monotonic())
                self._stop.wait(next_call - time.monotonic())

    def _attend(self, attend: grpc.UnaryUnaryMultiCallable, request: v1_pb.AttendRequest) -> None:
        started = time.monotonic()
        self.started += 1
        try:
            response = attend(request, timeout=VICTIM_TIMEOUT_S, metadata=self.metadata)
        except grpc.RpcError as error:
            self.failures.append(Failure(started, "Attend", code_name(error), str(error.details())))
            return
        finally:
            self.finished += 1
        out = np.frombuffer(response.output.data, np.float32)
        error_l2 = relative_l2(out.reshape(self.x.shape), self.expected) if out.size == self.x.size else np.inf
        if error_l2 > MAX_RELATIVE_L2:
            self.failures.append(Failure(started, "Attend", "WRONG_ANSWER", f"relative L2 {error_l2:.1e}"))
            return
        self.latencies_s.append(time.monotonic() - started)

    def _health(self, check: grpc.UnaryUnaryMultiCallable) -> None:
        started = time.monotonic()
        try:
            status = check(health_pb2.HealthCheckRequest(), timeout=VICTIM_TIMEOUT_S).status
        except grpc.RpcError as error:
            self.failures.append(Failure(started, "health", code_name(error), str(error.details())))
            return
        self.health_checks += 1
        if status != health_pb2.HealthCheckResponse.SERVING:
            self.failures.append(
                Failure(started, "health", health_pb2.HealthCheckResponse.ServingStatus.Name(status), "")
            )


# ---------------------------------------------------------------------------------------------------------------
# The server's footprint, sampled from /proc.


class Sampler:
    """VmRSS and the thread count of a process every ~100 ms; growth is measured from the first sample.

    `exceeded` is set once RSS growth passes `abort_above_mib`, so an attack can stop before it takes the
    machine (the case fails on its bound anyway)."""

    def __init__(self, pid: int, abort_above_mib: float | None = None) -> None:
        self.pid = pid
        self.abort_above_kib = None if abort_above_mib is None else abort_above_mib * 1024
        self.baseline_kib = rss_kib(pid)
        self.peak_kib = self.baseline_kib
        self.baseline_threads = thread_count(pid)
        self.peak_threads = self.baseline_threads
        self.exceeded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.baseline_kib) / 1024

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
                self.peak_threads = max(self.peak_threads, thread_count(self.pid))
            except (OSError, StopIteration):
                return  # the process is gone; the case sees that elsewhere
            if self.abort_above_kib is not None and self.peak_kib - self.baseline_kib > self.abort_above_kib:
                self.exceeded.set()


@dataclass
class Watch:
    victim: Victim | None
    sampler: Sampler
    started: float


@contextlib.contextmanager
def watching(
    server: ServerProcess, model_dir: Path, metadata: Metadata = (), victim: bool = True,
    abort_above_mib: float | None = None,
) -> Iterator[Watch]:  # fmt: skip
    """The victim and the sampler around an attack; the baseline is taken once the victim has made a few calls."""
    client = Victim(server.address, model_dir, metadata).start() if victim else None
    try:
        if client is not None:
            client.wait_calls(CALLS_BEFORE_BASELINE)
        sampler = Sampler(server.process.pid, abort_above_mib).start()
        try:
            yield Watch(client, sampler, time.monotonic())
        finally:
            sampler.stop()
    finally:
        if client is not None:
            client.stop()


def observe(result: CaseResult, watch: Watch, rss_bound_mib: float, part: str = "") -> None:
    """Put the victim's and the sampler's figures in the result, with their checks; a case in several parts
    (one server each) calls it once per part: the table shows the worst part, the checks name each."""
    prefix = f"{part} " if part else ""
    growth = watch.sampler.growth_mib
    result.rss_growth_mib = max(growth, result.rss_growth_mib or growth)
    result.rss_bound_mib = rss_bound_mib
    result.expect(f"{prefix}RSS growth within bound", growth <= rss_bound_mib, f"{growth:.0f} MiB")
    if watch.victim is not None:
        victim = watch.victim
        failures = [f"{prefix}{failure}" for failure in victim.failures]
        result.victim_calls = (result.victim_calls or 0) + len(victim.latencies_s) + len(victim.failures)
        p99 = victim.p99_ms()
        result.victim_p99_ms = p99 if result.victim_p99_ms is None or p99 is None else max(p99, result.victim_p99_ms)
        result.victim_failures += failures
        result.figures[f"{prefix}victim health checks"] = str(victim.health_checks)
        result.expect(
            f"{prefix}victim all OK",
            not victim.failures and victim.health_checks > 0,
            f"{len(failures)} failed: " + "; ".join(failures[:3]),
        )


# ---------------------------------------------------------------------------------------------------------------
# Attack helpers.


def identity(data: bytes) -> bytes:
    return data


def poll(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.02) -> bool:
    """Wait until condition() holds or timeout_s passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True
