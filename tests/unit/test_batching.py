"""Batch assembly, the batch queue and the batcher (service/engine/batching.py, batcher.py): batched answers
equal answers alone, the policy's triggers and bounds, companions chosen by length."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.reference import relative_l2
from service.core.errors import InvalidInput
from service.core.seq_buckets import seq_bucket
from service.core.types import AttentionRequest, WeightsSpec
from service.engine.batcher import Batcher
from service.engine.batching import BatchPolicy, BatchQueue, QueueFull, RunTimes, Waiting, assemble
from service.engine.model_dir import load_model_directory
from service.engine.sessions import Engine

D_MODEL = 512


@pytest.fixture(scope="module")
def engine(served_model: Path) -> Engine:
    return Engine(load_model_directory(served_model), "cpu")


def _request(seq: int, batch: int = 1, seed: int = 0, lengths: list[int] | None = None) -> AttentionRequest:
    x = np.random.default_rng(seed).standard_normal((batch, seq, D_MODEL), dtype=np.float32)
    mask = None
    if lengths is not None:
        mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return AttentionRequest(x, mask)


@st.composite
def _mixes(draw: st.DrawFn) -> list[AttentionRequest]:
    out = []
    for index in range(draw(st.integers(2, 5))):
        seq, batch = draw(st.integers(1, 80)), draw(st.integers(1, 2))
        lengths = draw(st.none() | st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
        out.append(_request(seq, batch, seed=index, lengths=lengths))
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=_mixes())
def test_a_batched_answer_equals_the_answer_alone(engine: Engine, mix: list[AttentionRequest]) -> None:
    batch = assemble([Waiting(r, 0.0) for r in mix])
    outputs = batch.split(engine.run(batch.hidden_states, batch.mask, want_probs=False).output)
    for request, output in zip(mix, outputs, strict=True):
        alone = engine.run(request.hidden_states, request.mask, want_probs=False).output
        real = request.mask if request.mask is not None else np.ones(output.shape[:2], np.int32)
        # Rows past a request's own length are padding in either run; compare the real tokens.
        assert relative_l2(output[real == 1], alone[real == 1]) <= 1e-5


def test_assembly_pads_with_a_mask_and_splits_into_views() -> None:
    batch = assemble([Waiting(_request(5), 0.0), Waiting(_request(3, batch=2, seed=1), 0.0)])
    assert batch.hidden_states.shape == (3, 5, D_MODEL) and batch.mask is not None
    assert batch.mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.padded_tokens == 4
    parts = batch.split(batch.hidden_states)
    assert [p.shape for p in parts] == [(1, 5, D_MODEL), (2, 3, D_MODEL)]
    assert all(np.shares_memory(p, batch.hidden_states) for p in parts)
    alone = assemble([Waiting(_request(4), 0.0)])
    assert alone.mask is None and alone.padded_tokens == 0  # one request: as it came, no copy


def _queue(**policy: object) -> BatchQueue:
    return BatchQueue(BatchPolicy(**{"max_queue_delay_s": 1.0, **policy}))  # type: ignore[arg-type]


def test_a_bucket_is_ready_when_full_or_when_its_oldest_waited_long_enough() -> None:
    queue = _queue(max_batch_size=3)
    for t in range(2):
        queue.put(Waiting(_request(10), 10.0 + t))
    assert queue.take(now=10.5) is None and queue.next_due() == 11.0
    queue.put(Waiting(_request(12), 10.6))
    batch = queue.take(now=10.6)
    assert batch is not None and len(batch) == 3 and len(queue) == 0


def test_the_delay_releases_a_partial_batch_and_buckets_never_mix() -> None:
    queue = _queue(max_batch_size=8)
    queue.put(Waiting(_request(10), 0.0))
    queue.put(Waiting(_request(200), 0.1))
    queue.put(Waiting(_request(12), 0.2))
    first = queue.take(now=1.05)
    assert first is not None and [w.request.seq_len for w in first] == [10, 12]  # ≤16 bucket, oldest first
    assert queue.take(now=1.05) is None
    second = queue.take(now=1.2)
    assert second is not None and [w.request.seq_len for w in second] == [200]


def test_the_token_budget_bounds_a_batch() -> None:
    queue = _queue(max_batch_size=8, max_batch_tokens=3 * 256)
    for t in range(5):
        queue.put(Waiting(_request(256), float(t) / 10))
    batch = queue.take(now=0.5)  # ready: the queue holds more than a budget's worth
    assert batch is not None and len(batch) == 3 and len(queue) == 2


def test_a_full_queue_refuses_at_once_naming_its_bound() -> None:
    queue = _queue(max_queue_requests=2)
    queue.put(Waiting(_request(8), 0.0))
    queue.put(Waiting(_request(8), 0.0))
    with pytest.raises(QueueFull, match="2 requests waiting, the limit is 2"):
        queue.put(Waiting(_request(8), 0.0))
    tokens = _queue(max_queue_tokens=100)
    tokens.put(Waiting(_request(64), 0.0))
    with pytest.raises(QueueFull, match="the limit is 100 tokens"):
        tokens.put(Waiting(_request(64), 0.0))
    assert len(tokens) == 1 and tokens.tokens == 64


def test_weights_requests_run_alone_and_drain_empties_the_queue() -> None:
    queue = _queue()
    for _ in range(2):
        request = _request(8)
        request.weights = WeightsSpec()
        queue.put(Waiting(request, 0.0))
    queue.put(Waiting(_request(8), 0.0))
    first = queue.take(now=0.0)
    assert first is not None and len(first) == 1 and first[0].request.weights is not None
    assert queue.take(now=1.0) is not None  # the plain request, once its delay has run out
    assert len(queue.drain()) == 1 and len(queue) == 0 and queue.tokens == 0


def test_companions_are_the_nearest_in_length_while_the_padding_stays_within_its_cap() -> None:
    queue = _queue(max_batch_size=8, max_padding=0.15)
    for t, seq in enumerate((100, 250, 110, 95, 200)):  # one bucket (65…256)
        queue.put(Waiting(_request(seq), float(t)))
    batch = queue.take(now=10.0)
    assert batch is not None and [w.request.seq_len for w in batch] == [100, 95, 110]  # 200 would pad 37%
    rest = queue.take(now=10.0)
    assert rest is not None and [w.request.seq_len for w in rest] == [250, 200]  # 200 beside 250 pads 10%
    assert len(queue) == 0


def test_an_empty_queue_lets_in_a_request_larger_than_its_token_bound() -> None:
    queue = _queue(max_queue_tokens=100)
    queue.put(Waiting(_request(200), 0.0))  # the limits, not the queue, bound a single request
    with pytest.raises(QueueFull):
        queue.put(Waiting(_request(8), 0.0))


def test_run_times_estimate_per_sequence_by_bucket() -> None:
    times = RunTimes((16, 64), weight=0.5)
    assert times.estimate(_request(40)) == 0.0  # nothing measured: no refusal
    times.record(seq_len=50, rows=4, seconds=0.4)  # 0.1 s per sequence in the 17…64 bucket
    times.record(seq_len=60, rows=1, seconds=0.2)
    assert times.estimate(_request(30, batch=2)) == pytest.approx(2 * 0.15)
    assert times.estimate(_request(8)) == 0.0 and times.estimate(_request(100)) == 0.0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=_mixes())
def test_the_batcher_batches_by_bucket_and_answers_each_as_alone(engine: Engine, mix: list[AttentionRequest]) -> None:
    """Submitted together with a queue delay, requests of one bucket share one run; every answer is its own."""
    # Room for every row of a mix (at most 5 requests × 2 rows): a bucket's requests fit one run.
    policy = BatchPolicy(max_batch_size=16, max_queue_delay_s=0.2, max_padding=1.0)
    batcher = Batcher(engine, policy, workers=1)

    async def together() -> list:
        return await asyncio.gather(*(batcher.submit(r) for r in mix))

    try:
        answers = asyncio.run(together())
    finally:
        batcher.close()
    assert batcher.stats.execution_count == len({seq_bucket(r.seq_len) for r in mix})
    for request, (output, queued) in zip(mix, answers, strict=True):
        alone = engine.run(request.hidden_states, request.mask, want_probs=False).output
        real = request.mask if request.mask is not None else np.ones(alone.shape[:2], np.int32)
        assert output.output.shape == alone.shape and queued >= 0
        assert relative_l2(output.output[real == 1], alone[real == 1]) <= 1e-5


def test_an_overflowing_member_fails_alone_and_its_batch_mates_are_answered(engine: Engine) -> None:
    """Finite input whose attention overflows float32 (NaN out), or whose FP16 answer would pass 65504, is refused
    with InvalidInput on the engine thread; the other members of the same run get their answers."""
    good = _request(6, seed=1)
    mix = [
        good,
        AttentionRequest(np.full((1, 6, D_MODEL), 1e30, np.float32)),
        AttentionRequest(np.full((1, 6, D_MODEL), 6e4, np.float32), output_dtype=np.dtype(np.float16)),
        AttentionRequest(good.hidden_states.copy(), output_dtype=np.dtype(np.float16)),
    ]
    batcher = Batcher(engine, BatchPolicy(max_batch_size=16, max_queue_delay_s=0.2, max_padding=1.0), workers=1)

    async def together() -> list:
        return await asyncio.gather(*(batcher.submit(r) for r in mix), return_exceptions=True)

    try:
        answers = asyncio.run(together())
    finally:
        batcher.close()
    assert batcher.stats.execution_count == 1  # all four ran as one batch
    overflow, fp16_overflow = answers[1], answers[2]
    assert isinstance(overflow, InvalidInput) and "output is not finite (float32 overflow" in str(overflow)
    assert "largest |value| in the input is 1e+30" in str(overflow) and "scale the input down" in str(overflow)
    assert isinstance(fp16_overflow, InvalidInput) and "beyond FP16's largest 65504" in str(fp16_overflow)
    assert "send FP32" in str(fp16_overflow)
    alone = engine.run(good.hidden_states, None, want_probs=False).output
    for answer in (answers[0], answers[3]):
        assert not isinstance(answer, BaseException), answer
        assert relative_l2(answer[0].output, alone) <= 1e-5


def test_the_queue_is_bounded_in_estimated_compute_time() -> None:
    queue = _queue(max_queue_wait_s=0.5)
    queue.put(Waiting(_request(64), 0.0, cost_s=2.0))  # alone, a request always fits
    with pytest.raises(QueueFull, match=r"about 2000 ms of compute waits .* the limit is 500 ms"):
        queue.put(Waiting(_request(8), 0.0, cost_s=0.01))
    assert queue.take(now=10.0) is not None and queue.cost_s == 0.0
    queue.put(Waiting(_request(8), 0.0, cost_s=0.2))
    queue.put(Waiting(_request(8), 0.0, cost_s=0.2))  # 0.4 s waiting: within the bound
    assert len(queue) == 2 and queue.cost_s == pytest.approx(0.4)
