"""The limits a request must respect, checked once in the core for both APIs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput
from service.types import AttentionRequest

FP32_BYTES = 4
MAX_NAME_BYTES = 256  # request ids, model and tensor names: they reach logs, metrics and error messages
WEIGHTS_RUN_BYTES = 64 * 1024 * 1024  # attention probabilities one weights run may compute at once


@dataclass(frozen=True)
class Limits:
    d_model: int
    num_heads: int
    max_seq_len: int
    max_batch_size: int
    max_weights_seq_len: int
    max_message_bytes: int


def fits_name(value: str) -> bool:
    """True for an id or name of at most MAX_NAME_BYTES in UTF-8 (a short string is not encoded to know)."""
    return len(value) <= MAX_NAME_BYTES // 4 or len(value.encode(errors="replace")) <= MAX_NAME_BYTES


def check_name(field: str, value: str) -> None:
    """Refuse an id or name longer than MAX_NAME_BYTES before it reaches a log line, a metric or a message."""
    if not fits_name(value):
        raise InvalidInput(f"{field}: {len(value.encode(errors='replace'))} bytes; at most {MAX_NAME_BYTES} allowed")


def check_count(field: str, count: int, most: int) -> None:
    """Refuse a repeated field longer than it can meaningfully be, before anything iterates it."""
    if count > most:
        raise InvalidInput(f"{field}: {count} entries; at most {most} allowed")


def check_request(request: AttentionRequest, limits: Limits) -> None:
    """Raise InvalidInput naming the field, the value received and what is allowed (values: check_finite)."""
    x = request.hidden_states
    batch, seq, width = x.shape
    if width != limits.d_model:
        raise InvalidInput(f"hidden_states: last dimension is {width}; this model's d_model is {limits.d_model}")
    if not 1 <= seq <= limits.max_seq_len:
        raise InvalidInput(f"hidden_states: sequence length {seq}; allowed 1..{limits.max_seq_len}")
    if not 1 <= batch <= limits.max_batch_size:
        raise InvalidInput(f"hidden_states: batch size {batch}; allowed 1..{limits.max_batch_size}")
    if request.mask is not None:
        _check_mask(request.mask, batch, seq)
        request.mask = request.mask.astype(np.int32, copy=False)  # the graphs take INT32
    if request.weights is not None:
        _check_weights(request, limits)
    answer_bytes = x.size * request.output_dtype.itemsize + weights_answer_bytes(request, limits)
    if answer_bytes > limits.max_message_bytes:
        raise InvalidInput(
            f"the answer (output{' and attention weights' if request.weights else ''}) would be {answer_bytes} "
            f"bytes, over the max message size {limits.max_message_bytes}; send fewer or shorter sequences"
            + ("; ask for fewer positions, averaged heads or top_k" if request.weights else "")
        )


def weights_answer_bytes(request: AttentionRequest, limits: Limits) -> int:
    """Bytes of the weights a request asked for (values, and indices with top-k); 0 without weights."""
    spec = request.weights
    if spec is None:
        return 0
    seq = request.seq_len
    rows = len(spec.positions) if spec.positions is not None else seq
    heads = 1 if spec.average_heads else limits.num_heads
    per_row = spec.top_k * 2 if spec.top_k else seq  # top-k: values and their int32 key positions
    return request.batch_size * heads * rows * per_row * FP32_BYTES


def weights_rows_per_run(seq_len: int, num_heads: int) -> int:
    """Sequences of a weights request computed per engine run, so that its [rows, heads, seq, seq] probabilities
    stay within WEIGHTS_RUN_BYTES whatever the batch: batch 8 x 1024 with top-k needs 256 MiB at once, but the
    client gets kilobytes."""
    return max(1, WEIGHTS_RUN_BYTES // (num_heads * seq_len * seq_len * FP32_BYTES))


def request_bytes(request: AttentionRequest, limits: Limits) -> int:
    """What a request makes the server hold at most from admission to its answer, for the memory budget: its
    message, an FP32 copy of its input (FP16 in, or joined into a batch), the engine's output and the answer's
    copy of it, and with weights the probabilities of one run (and the graph's scores beside them) plus the
    weights answer."""
    fp32 = request.hidden_states.size * FP32_BYTES
    total = request.wire_bytes + 3 * fp32
    if request.weights is not None:
        rows = min(request.batch_size, weights_rows_per_run(request.seq_len, limits.num_heads))
        probs = rows * limits.num_heads * request.seq_len * request.seq_len * FP32_BYTES
        total += 2 * probs + weights_answer_bytes(request, limits)
    return total


def check_finite(hidden_states: np.ndarray) -> None:
    """Refuse NaN/Inf: one NaN key poisons the softmax of every query that sees it. A full pass over the input,
    so the engine thread runs it, not the event loop (5 ms at 32 MiB)."""
    if not np.isfinite(hidden_states).all():
        bad = np.argwhere(~np.isfinite(hidden_states))[0].tolist()
        raise InvalidInput(f"hidden_states: non-finite value (NaN or Inf) at index {bad}; only finite values allowed")


# The largest finite FP16 value (65504): a larger float32 output would become inf when cast for an FP16 answer.
FP16_MAX = float(np.finfo(np.float16).max)


def check_output(request: AttentionRequest, output: np.ndarray) -> None:
    """Refuse an answer that finite input overflowed: with values large enough (about 1e19 for the default
    model), Q·Kᵀ leaves float32 and the softmax gives NaN; an FP16 answer also needs every value within FP16's
    range. `output`: this request's own rows of its batch's output. One isfinite pass, on the engine thread;
    the FP16 range only for FP16 answers."""
    if not np.isfinite(output).all():
        largest = float(np.abs(request.hidden_states).max())  # only when refusing: the message's figure
        raise InvalidInput(
            f"hidden_states: the attention output is not finite (float32 overflow: largest |value| in the input "
            f"is {largest:.3g}); only inputs whose attention stays within float32 are served: scale the input down"
        )
    if request.output_dtype == np.float16:
        peak = max(float(output.max()), -float(output.min()))  # no temporary array, unlike np.abs
        if peak > FP16_MAX:
            raise InvalidInput(
                f"hidden_states: the attention output reaches |value| {peak:.3g}, beyond FP16's largest {FP16_MAX:g}, "
                "so the FP16 answer would hold inf; send FP32, or scale the input down"
            )


def _check_mask(mask: np.ndarray, batch: int, seq: int) -> None:
    if mask.shape != (batch, seq):
        raise InvalidInput(f"attention_mask: shape {list(mask.shape)}; must be [batch, seq] = [{batch}, {seq}]")
    if not np.isin(mask, (0, 1)).all():
        bad = np.argwhere(~np.isin(mask, (0, 1)))[0].tolist()
        value = int(mask[tuple(bad)])
        raise InvalidInput(f"attention_mask: value {value} at index {bad}; allowed 0 (padding) or 1 (real token)")


def _check_weights(request: AttentionRequest, limits: Limits) -> None:
    spec = request.weights
    assert spec is not None
    seq = request.seq_len
    if seq > limits.max_weights_seq_len:
        raise InvalidInput(
            f"attention weights: sequence length {seq} is over max_weights_seq_len {limits.max_weights_seq_len} "
            "(weights are [batch, heads, seq, seq]); ask without weights or send a shorter sequence"
        )
    for position in spec.positions or ():
        if not 0 <= position < seq:
            raise InvalidInput(f"weights.positions: {position} is out of range; allowed 0..{seq - 1}")
    if not 0 <= spec.top_k <= seq:
        raise InvalidInput(f"weights.top_k: {spec.top_k}; allowed 0 (full rows) .. {seq} (the sequence length)")
