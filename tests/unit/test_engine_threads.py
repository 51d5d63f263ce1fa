"""The engine's two ways to run a short request (all cores, or one thread beside others) give the same answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service.core.errors import InvalidInput
from service.core.types import AttentionRequest, WeightsSpec
from service.engine.batcher import Batcher
from service.engine.batching import BatchPolicy
from service.engine.model_dir import load_model_directory
from service.engine.sessions import Engine


def test_narrow_and_wide_runs_agree_and_concurrency_uses_narrow(served_model: Path) -> None:
    config, weights = read_model_dir(served_model)
    engine = Engine(load_model_directory(served_model), "cpu", intra_op_threads=2, narrow_max_tokens=512)
    assert engine.narrow_sessions and engine.can_run_narrow(512, False) and not engine.can_run_narrow(513, False)
    assert not engine.can_run_narrow(16, True)  # weights always run on the full sessions
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((1, seq, config["d_model"]), dtype=np.float32) for seq in (3, 16, 100, 512, 700)]
    masks = [None, None, np.r_[np.ones(60), np.zeros(40)].astype(np.int32)[None], None, None]

    async def all_at_once(batcher: Batcher) -> list:
        requests = [AttentionRequest(x, m) for x, m in zip(inputs, masks, strict=True)]
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    batcher = Batcher(engine, workers=2)
    try:
        results = asyncio.run(all_at_once(batcher))
    finally:
        batcher.close()
    assert batcher.runs["narrow"] >= 1, batcher.runs  # submitted together: short ones ran side by side
    assert batcher.runs["wide"] >= 1  # the 700-token request always takes every core
    for (output, _), x, mask in zip(results, inputs, masks, strict=True):
        expected, _ = reference_attention(weights, config["num_heads"], x, mask, config["causal"])
        assert relative_l2(output.output, expected) <= 1e-5
        narrow_ok = engine.can_run_narrow(x.shape[1], False)
        if narrow_ok:
            again = engine.run(x, mask, want_probs=False, narrow=True).output
            assert relative_l2(again, expected) <= 1e-5


def _inline_batcher(served_model: Path, inline_max_tokens: int, lone: bool, **policy: float) -> Batcher:
    engine = Engine(load_model_directory(served_model), "cpu", intra_op_threads=2, narrow_max_tokens=512)
    batcher = Batcher(engine, BatchPolicy(**policy), workers=2, inline_max_tokens=inline_max_tokens)  # type: ignore[arg-type]
    batcher.lone_call = lambda: lone
    return batcher


def _one_by_one(batcher: Batcher, requests: list[AttentionRequest]) -> list:
    async def each() -> list:
        return [await batcher.submit(r) for r in requests]

    try:
        return asyncio.run(each())
    finally:
        batcher.close()


def test_a_small_request_finding_the_engine_idle_computes_on_the_loop_thread(served_model: Path) -> None:
    """Tiny requests run inline whatever else is in progress; up to inline_max_tokens only a lone call does; the
    answers are the reference's either way, and no engine thread was ever started for inline runs."""
    config, weights = read_model_dir(served_model)
    rng = np.random.default_rng(7)
    tiny, small, large = (rng.standard_normal((1, seq, config["d_model"]), dtype=np.float32) for seq in (16, 100, 300))

    lone = _inline_batcher(served_model, 128, lone=True)
    answers = _one_by_one(lone, [AttentionRequest(tiny), AttentionRequest(small)])
    assert lone.runs == {"wide": 0, "narrow": 0, "inline": 2} and not lone._executor._threads
    for (computed, queued), x in zip(answers, (tiny, small), strict=True):
        expected, _ = reference_attention(weights, config["num_heads"], x, None, config["causal"])
        assert relative_l2(computed.output, expected) <= 1e-5 and queued == 0.0

    busy = _inline_batcher(served_model, 128, lone=False)  # other calls in progress: only the tiny one stays inline
    answers = _one_by_one(busy, [AttentionRequest(tiny), AttentionRequest(small), AttentionRequest(large)])
    assert busy.runs["inline"] == 1 and busy.runs["wide"] + busy.runs["narrow"] == 2, busy.runs
    expected, _ = reference_attention(weights, config["num_heads"], large, None, config["causal"])
    assert relative_l2(answers[2][0].output, expected) <= 1e-5


def test_inline_runs_can_be_turned_off_and_yield_to_a_queue_delay_and_weights(served_model: Path) -> None:
    x = np.random.default_rng(8).standard_normal((1, 8, 512), dtype=np.float32)
    off = _inline_batcher(served_model, 0, lone=True)
    _one_by_one(off, [AttentionRequest(x)])
    assert off.runs["inline"] == 0
    waiting = _inline_batcher(served_model, 128, lone=True, max_queue_delay_s=0.001)  # the policy says wait for company
    _one_by_one(waiting, [AttentionRequest(x)])
    assert waiting.runs["inline"] == 0
    weights = _inline_batcher(served_model, 128, lone=True)
    _one_by_one(weights, [AttentionRequest(x, None, WeightsSpec())])
    assert weights.runs["inline"] == 0


def test_a_bad_request_computed_inline_fails_alone(served_model: Path) -> None:
    batcher = _inline_batcher(served_model, 128, lone=True)
    bad = np.full((1, 8, 512), np.nan, dtype=np.float32)
    good = np.ones((1, 8, 512), dtype=np.float32)

    async def both() -> tuple:
        with pytest.raises(InvalidInput, match="non-finite"):
            await batcher.submit(AttentionRequest(bad))
        return await batcher.submit(AttentionRequest(good))

    try:
        computed, _ = asyncio.run(both())
    finally:
        batcher.close()
    assert batcher.runs["inline"] == 2 and computed.output.shape == (1, 8, 512)
