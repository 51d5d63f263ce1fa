"""Property tests over shapes and masks: the torch module and the fused graphs against the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import AttentionConfig
from model.fused_graphs import FP16, build_attention23_graph, build_mha_graph
from model.reference import reference_attention, relative_l2
from model.timing import cpu_session
from model.torch_export import build_module
from model.weights import seeded_weights

BUILDERS = {"mha": build_mha_graph, "attention23": build_attention23_graph}


@st.composite
def cases(draw: st.DrawFn) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 24))
    mask = np.array(
        draw(st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq), min_size=batch, max_size=batch)),
        dtype=np.int32,
    )
    mask[:, draw(st.integers(0, seq - 1))] = 1  # at least one real token per row
    return {
        "heads": heads,
        "d": heads * head_dim,
        "batch": batch,
        "seq": seq,
        "mask": mask,
        "causal": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return cpu_session(model.SerializeToString(), threads=1)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_every_form_matches_reference(case: dict) -> None:
    weights = seeded_weights(case["d"], case["seed"])
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["batch"], case["seq"], case["d"]), dtype=np.float32)
    mask, causal, heads = case["mask"], case["causal"], case["heads"]
    expected_masked, probs = reference_attention(weights, heads, x, mask, causal)
    expected_plain, _ = reference_attention(weights, heads, x, None, causal)

    module = build_module(weights, AttentionConfig(case["d"], heads, causal))
    with torch.no_grad():
        out, weights_out = module(torch.from_numpy(x), torch.from_numpy(mask), need_weights=True)
    assert relative_l2(out.numpy(), expected_masked) <= 1e-5
    assert relative_l2(weights_out.numpy(), probs) <= 1e-5
    assert np.all(weights_out.numpy()[np.broadcast_to(~mask.astype(bool)[:, None, None, :], probs.shape)] == 0)

    for form, build in BUILDERS.items():
        for masked in (False, True):
            session = _session(build(weights, heads, causal, masked))
            feed = {"hidden_states": x, "attention_mask": mask} if masked else {"hidden_states": x}
            served = session.run(None, feed)[0]
            expected = expected_masked if masked else expected_plain
            assert relative_l2(served, expected) <= 1e-5, (form, masked)
            assert np.abs(served - expected).max() <= 1e-4, (form, masked)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_padding_content_never_leaks(case: dict) -> None:
    """Whatever sits in padded positions, the real positions' answers do not move."""
    weights = seeded_weights(case["d"], case["seed"])
    rng = np.random.default_rng(case["seed"] + 1)
    x = rng.standard_normal((case["batch"], case["seq"], case["d"]), dtype=np.float32)
    noisy = x.copy()
    padded = ~case["mask"].astype(bool)
    noisy[padded] = rng.standard_normal((int(padded.sum()), case["d"]), dtype=np.float32) * 100
    session = _session(build_mha_graph(weights, case["heads"], case["causal"], masked=True))
    a = session.run(None, {"hidden_states": x, "attention_mask": case["mask"]})[0]
    b = session.run(None, {"hidden_states": noisy, "attention_mask": case["mask"]})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.all(a[padded] == 0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=4), st.booleans(), st.integers(0, 1000))
def test_padded_batch_equals_each_sequence_alone(lengths: list[int], causal: bool, seed: int) -> None:
    """What the batcher relies on: right-padding to the longest changes no request's answer."""
    weights = seeded_weights(16, seed)
    rng = np.random.default_rng(seed)
    longest = max(lengths)
    x = np.zeros((len(lengths), longest, 16), np.float32)
    mask = np.zeros((len(lengths), longest), np.int32)
    alone = []
    session = _session(build_mha_graph(weights, 2, causal, masked=True))
    for i, n in enumerate(lengths):
        x[i, :n] = rng.standard_normal((n, 16), dtype=np.float32)
        mask[i, :n] = 1
        alone.append(session.run(None, {"hidden_states": x[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]})[0])
    batched = session.run(None, {"hidden_states": x, "attention_mask": mask})[0]
    for i, n in enumerate(lengths):
        assert relative_l2(batched[i, :n], alone[i][0].astype(np.float64)) <= 1e-5


@settings(max_examples=10, deadline=None)
@given(cases())
def test_fp16_mha_graph_matches_reference_within_half_precision(case: dict) -> None:
    """The CUDA FP16 graph, run here on the CPU provider: same maths, FP16 rounding."""
    weights = seeded_weights(case["d"], case["seed"])
    x = np.random.default_rng(case["seed"]).standard_normal((case["batch"], case["seq"], case["d"])).astype(np.float16)
    session = _session(build_mha_graph(weights, case["heads"], case["causal"], masked=True, dtype=FP16))
    served = session.run(None, {"hidden_states": x, "attention_mask": case["mask"]})[0]
    expected, _ = reference_attention(weights, case["heads"], x, case["mask"], case["causal"])
    assert served.dtype == np.float16
    assert relative_l2(served, expected) <= 5e-3
