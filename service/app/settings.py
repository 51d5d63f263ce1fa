"""One typed Settings object: defaults, then ATTNSERVE_* environment variables, then command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.errors import SettingsError
from service.core.seq_buckets import DEFAULT_SEQ_BUCKETS, parse_bounds
from service.observe.log_format import LogFormat

# Large enough for batch 8 × seq 2048 × d_model 512 in FP32 (32 MiB) with room for the envelope.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Settings(BaseSettings):
    """Every knob of the server. Each field is also `--field-name` on the command line and ATTNSERVE_FIELD_NAME."""

    model_config = SettingsConfigDict(env_prefix="ATTNSERVE_", extra="forbid")

    model_dir: Path = Field(Path("models/attention"), description="model directory written by `python -m model.export`")
    model_name: str = Field("attention", description="model name on the KServe v2 API")
    host: str = Field("0.0.0.0", description="address the gRPC server binds, and the metrics one unless metrics_host")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    reuse_port: bool = Field(
        False,
        description="let other processes listen on the same gRPC port (SO_REUSEPORT; the kernel spreads "
        "connections over them); off: a port already taken is an error",
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="plaintext port that serves only grpc.health.v1, for kubelet probes when TLS is on (they speak "
        "no TLS); unset = off",
    )
    http_port: int = Field(
        8000,
        ge=-1,
        le=65535,
        description="KServe v2 HTTP/REST port (JSON and binary tensor data; same host, TLS, token and limits as "
        "gRPC); 0 picks a free one, like the other ports; -1 = off",
    )
    http_max_connections: int = Field(
        256,
        ge=1,
        description="HTTP connections open at once; one more is answered 503 and closed (each request in flight "
        "also takes one of max_concurrent_rpcs, shared with gRPC)",
    )
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one)")
    metrics_host: str = Field(
        "",
        description="address the /metrics server binds; empty = host. /metrics is unauthenticated (no TLS, no "
        "token): bind it to a private address or let only Prometheus reach it (NetworkPolicy)",
    )

    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime execution provider; auto takes CUDA when a session on it initialises"
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime threads per run; 0 = one per CPU core")
    engine_workers: int = Field(0, ge=0, description="engine threads (runs in flight at once); 0 = one per core")
    engine_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU priority of the compute threads below the gRPC threads (nice); under overload the "
        "server keeps reading requests and refusing promptly instead of computing while callers wait; 0 = equal",
    )
    narrow_max_tokens: int = Field(
        512,
        ge=0,
        description="requests of at most this many tokens run single-threaded side by side when several are in "
        "flight (CPU); 0 = every run uses all intra-op threads, one at a time",
    )
    inline_max_tokens: int = Field(
        128,
        ge=0,
        description="a lone request (the only call in progress) of at most this many tokens that finds no run in "
        "flight computes at once on the event loop's thread, with every intra-op thread: no hop to an engine "
        "thread and back (its latency; make bench-serve); the loop is held that long. Requests of ≤ 32 tokens "
        "do so whenever no run is in flight and none waits, on one thread (CPU per request); 0 = every run "
        "on an engine thread",
    )
    allow_spinning: bool = Field(
        False, description="onnxruntime intra-op threads spin between ops: lower latency alone, less throughput shared"
    )
    keep_freed_memory: bool = Field(
        True, description="glibc: keep freed buffers for reuse (fast big tensors; RSS stays at its high-water mark)"
    )
    warmup: bool = Field(True, description="run every graph over the sequence buckets before reporting ready")

    max_batch_size: int = Field(8, ge=1, description="most sequences in one request")
    max_batch_sequences: int = Field(
        32,
        ge=1,
        description="dynamic batching: most sequences in one engine run, from one or more requests; 1 = batching "
        "off (each request runs alone)",
    )
    max_batch_tokens: int = Field(
        0,
        ge=0,
        description="dynamic batching: most tokens (sequences × padded length) in one engine run; 0 = auto: 16384 "
        "on CUDA, narrow_max_tokens (or 512) on CPU, where a bigger run is compute-bound and batching it only "
        "adds padding and waiting (make bench-batching)",
    )
    max_queue_delay_us: int = Field(
        0,
        ge=0,
        description="dynamic batching: how long a request may wait for company while an engine thread is free; "
        "0 = never (batches still form from whatever waits while every thread is busy)",
    )
    max_batch_padding: float = Field(
        0.15,
        ge=0,
        le=1,
        description="dynamic batching: a request joins a batch only while the padding it adds keeps the padded "
        "share of the run's tokens at most this",
    )
    max_queue_requests: int = Field(
        256, ge=1, description="requests waiting for an engine thread; beyond it new ones get RESOURCE_EXHAUSTED"
    )
    max_queue_tokens: int = Field(
        65536,
        ge=1,
        description="tokens (batch × sequence length) waiting for an engine thread; beyond it new requests get "
        "RESOURCE_EXHAUSTED (a request alone is always let in)",
    )
    max_queue_wait_ms: float = Field(
        1000.0,
        ge=0,
        description="estimated compute time waiting for an engine thread (from each length's recent runs); beyond "
        "it new requests get RESOURCE_EXHAUSTED, so an accepted request's wait stays about this short under "
        "overload; 0 = no bound",
    )
    max_concurrent_rpcs: int = Field(
        1024,
        ge=1,
        description="calls (a stream counts once) the server takes at once, health checks aside (probes keep "
        "answering when it is full); beyond it RESOURCE_EXHAUSTED before the request is read; capped at "
        "memory budget / max_message_bytes, so the messages of every call at once fit the budget",
    )
    max_concurrent_streams: int = Field(
        64,
        ge=1,
        description="streaming calls open at once (AttendStream, ModelStreamInfer, health Watch, reflection), "
        "within max_concurrent_rpcs; beyond it new ones get RESOURCE_EXHAUSTED, so streams that never end "
        "cannot take every call slot",
    )
    max_stream_pending: int = Field(
        4,
        ge=1,
        description="answers one stream may have computing or waiting to be sent; at the bound the server stops "
        "reading that stream's requests until its client reads (backpressure), so a client that never reads "
        "holds this many answers, not an unbounded pile",
    )
    max_streams_per_connection: int = Field(
        0,
        ge=0,
        description="HTTP/2 streams (calls) one client connection may have open at once; an HTTP/2 client queues "
        "more, and one whose view of the limit lags gets UNAVAILABLE (REFUSED_STREAM, which gRPC retry policies "
        "retry); 0 = auto: max_concurrent_rpcs, plus room for health checks",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="how long a unary call may take to deliver its request message after its headers; then "
        "DEADLINE_EXCEEDED (HTTP: 408), so calls that send headers and stall cannot hold slots; HTTP connections "
        "that send no complete request headers this long after connecting or after their last answer are closed",
    )
    memory_budget_mb: int = Field(
        0,
        ge=0,
        description="bytes (MiB) that requests in progress may hold (message, batch, output, answer, weights); "
        "beyond it new requests get RESOURCE_EXHAUSTED, and calls at once are capped at budget / "
        "max_message_bytes; 0 = auto: half of the cgroup's memory limit (memory.max), else of physical memory",
    )
    max_seq_len: int = Field(0, ge=0, description="longest sequence accepted; 0 = the model's max_seq_len")
    max_weights_seq_len: int = Field(
        1024, ge=1, description="longest sequence for which attention weights are computed ([batch, heads, seq, seq])"
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        description="largest gRPC message, both ways; largest HTTP request body (its JSON part: 1/16 of it)",
    )

    keepalive_time_s: float = Field(30.0, gt=0, description="server keepalive ping interval")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="close a connection whose ping goes unanswered")
    grpc_bdp_probe: bool = Field(
        False,
        description="let gRPC grow each connection's receive window to its measured bandwidth-delay product: "
        "faster big messages over long round trips, but a client whose requests are not being read (a stream "
        "that never reads its answers) can then make the server buffer hundreds of MiB of them "
        "(make resilience: streams_never_read); off: a fixed 16 MiB window per stream",
    )
    max_connection_idle_s: float = Field(
        300.0, gt=0, description="close a client connection that has had no call for this long (GOAWAY)"
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="close a client connection after this long (GOAWAY; calls in flight finish): clients reconnect "
        "and reach replicas added since; 0 = never",
    )
    drain_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight calls get to finish")

    tls_cert: Path | None = Field(None, description="PEM server certificate; with tls_key turns TLS on")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a cert it signed"
    )
    auth_token: str | None = Field(None, description="bearer token required in `authorization` metadata")
    auth_token_file: Path | None = Field(None, description="file holding the bearer token (wins over auth_token)")

    metrics: bool = Field(
        True, description="record Prometheus metrics and serve /metrics; false: neither (see make bench-metrics)"
    )
    seq_buckets: str = Field(
        ",".join(map(str, DEFAULT_SEQ_BUCKETS)),
        description="upper bounds of the seq_bucket metric label, increasing; longer sequences fall in +Inf",
    )
    access_log: Literal["all", "errors", "off"] = Field(
        "errors",
        description="one JSON line per answered request on stdout: every request, failed ones only, or none "
        "(all: a few percent of throughput on tiny requests, see make bench-metrics)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="least severe level the main log (stderr) writes; any case"
    )
    log_format: LogFormat = Field(
        "text",
        description="main log (stderr): text for people, or json, one object per line (time, level, logger, "
        "message, request_id and trace_id where known, exception) for log shippers",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value  # ATTNSERVE_LOG_LEVEL=debug worked before

    @model_validator(mode="after")
    def _check_pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        parse_bounds(self.seq_buckets)  # a clear error at start-up, not at the first request
        return self

    @property
    def seq_bucket_bounds(self) -> tuple[int, ...]:
        return parse_bounds(self.seq_buckets)


@dataclass(frozen=True)
class Secrets:
    """The bearer token and TLS files, read once at start; the server uses these bytes, never the paths again."""

    token: str | None = None  # None: no auth
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None


def _read(setting: str, path: Path, holds: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:  # missing, a directory, no permission: one line naming the file, not a traceback
        raise SettingsError(
            f"{setting} {path}: cannot read it ({e.strerror}); it must be a readable file holding {holds}"
        ) from None
    if not data.strip():
        raise SettingsError(f"{setting} {path}: the file is empty or only whitespace; it must hold {holds}")
    return data


def read_secrets(settings: Settings) -> Secrets:
    """Read and check every file a security setting names, once. Fails closed: a token that is configured but
    empty (or only whitespace) would otherwise turn auth off without a word, so it raises SettingsError."""
    token = settings.auth_token
    where = "auth_token (--auth-token or ATTNSERVE_AUTH_TOKEN)"
    if settings.auth_token_file is not None:
        raw = _read("auth_token_file", settings.auth_token_file, "the bearer token")
        where = f"auth_token_file {settings.auth_token_file}"
        try:
            token = raw.decode().strip()  # editors and `echo` add a newline; no client sends it
        except UnicodeDecodeError:
            raise SettingsError(f"{where}: not UTF-8 text; it must hold the bearer token") from None
    if token is not None and not token.strip():
        raise SettingsError(
            f"{where} is set but empty or only whitespace; give the bearer token, or leave it unset to serve "
            "without auth"
        )
    return Secrets(
        token=None if token is None else token.strip(),  # a Secret's env var often ends in a newline
        tls_cert=_read("tls_cert", settings.tls_cert, "a PEM certificate") if settings.tls_cert else None,
        tls_key=_read("tls_key", settings.tls_key, "a PEM private key") if settings.tls_key else None,
        tls_client_ca=(
            _read("tls_client_ca", settings.tls_client_ca, "a PEM CA bundle") if settings.tls_client_ca else None
        ),
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of a setting, e.g. grpc_port -> ATTNSERVE_GRPC_PORT."""
    return Settings.model_config.get("env_prefix", "") + name.upper()


def _value_type(field: FieldInfo) -> Any:
    """The field's type without `| None` (None only means unset, which the default already says)."""
    kinds = [kind for kind in get_args(field.annotation) if kind is not type(None)]
    return kinds[0] if get_origin(field.annotation) in (UnionType, Union) and len(kinds) == 1 else field.annotation


def _shown(value: object) -> str:
    """A value as an operator types it: booleans as true/false (what flags and env vars accept), None as unset."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


# Field(ge=, gt=, le=, lt=) as pydantic stores them (in field.metadata), and as --help writes them.
_BOUNDS: dict[type, str] = {
    annotated_types.Ge: ">=",
    annotated_types.Gt: ">",
    annotated_types.Le: "<=",
    annotated_types.Lt: "<",
}


def allowed_values(field: FieldInfo) -> str | None:
    """What a setting accepts, from its type and its ge/gt/le/lt bounds, e.g. "one of auto, cpu, cuda",
    "integer 0..65535", "number > 0"; None when any text goes (str, paths)."""
    kind = _value_type(field)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(_shown(choice) for choice in get_args(kind))
    if kind is bool:
        return "true or false"
    if kind not in (int, float):
        return None
    bounds = {_BOUNDS[type(r)]: getattr(r, type(r).__name__.lower()) for r in field.metadata if type(r) in _BOUNDS}
    if ">=" in bounds and "<=" in bounds:
        limits = [f"{bounds['>=']}..{bounds['<=']}"]
    else:
        limits = [f"{symbol} {bound}" for symbol, bound in bounds.items()]
    return " ".join(["integer" if kind is int else "number", *limits])


def setting_help(name: str, field: FieldInfo) -> str:
    """A flag's help: its description, then a line with its environment variable, default and allowed values."""
    allowed = allowed_values(field)
    facts = [f"env {env_var(name)}", f"default {_shown(field.default)}", *([allowed] if allowed else [])]
    return f"{field.description}\n[{'; '.join(facts)}]".replace("%", "%%")  # argparse %-formats help texts


# What an open-ended value looks like in the usage line; a closed set shows its values instead.
_METAVARS: dict[object, str] = {int: "INT", float: "NUMBER", Path: "PATH", str: "TEXT"}


def _metavar(field: FieldInfo) -> str | None:
    """{a,b} for a closed set of values, as argparse shows choices, else the kind of value."""
    kind = _value_type(field)
    values = get_args(kind) if get_origin(kind) is Literal else (True, False) if kind is bool else None
    return "{" + ",".join(map(_shown, values)) + "}" if values else _METAVARS.get(kind)


class _LineHelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a help text by itself, so the env/default/values line stays a line of its own."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        wrap = super()._split_lines  # bound here: zero-argument super() fails inside a comprehension
        return [wrapped for line in text.splitlines() for wrapped in wrap(line, width)]


def build_parser() -> argparse.ArgumentParser:
    """`python -m service`'s command line: one flag per Settings field, its help generated from the field."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="attnserve: multi-head attention over gRPC (KServe v2 + attnserve.v1)",
        epilog=f"Every flag is also an environment variable, {env_var('<flag_name>')} (shown under each flag); "
        "a flag wins over its variable, which wins over the default.",
        formatter_class=_LineHelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        # Values stay strings here (no type=, no choices=): pydantic converts and checks them, as it does the
        # environment's, so a bad flag and a bad variable fail alike (exit 2, naming the field).
        parser.add_argument(
            _flag(name), dest=name, default=None, metavar=_metavar(field), help=setting_help(name, field)
        )
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, overridden by any flag given in argv."""
    args = build_parser().parse_args(argv)
    return Settings(**{name: value for name, value in vars(args).items() if value is not None})
