"""The engine's two ways to run a short request (all cores, or one thread beside others) give the same answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from model.export import read_model_dir
from model.reference import reference_attention, relative_l2
from service.core.types import AttentionRequest
from service.engine.batcher import Batcher
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
