"""The numpy BERT encoder (attnserve_client/explain/bert.py) against transformers' BertModel on the real MiniLM
checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve_client.explain.bert import BertEncoder, gelu
from attnserve_client.explain.explain import Checkpoint
from attnserve_client.explain.reference import WeightsError, reference_attention
from model.reference import relative_l2
from model.weights import load_bert_layer

SENTENCES = (
    "The animal didn't cross the street because it was too tired.",
    "It was too wide.",  # shorter: padded in the batch, and its padding masked
)


@pytest.fixture(scope="module")
def encoder(minilm_dir: Path) -> BertEncoder:
    return BertEncoder.load(minilm_dir)


@pytest.fixture(scope="module")
def hf_model(minilm_dir: Path) -> Iterator[object]:
    """transformers' own BERT, from the same directory, offline (eager attention: it can return the weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    model = BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    yield model


@pytest.fixture(scope="module")
def batch(minilm_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Both sentences through the checkpoint's tokenizer, padded to the longer one: ids and mask [2, seq]."""
    checkpoint = Checkpoint.load(minilm_dir)
    sentences = [checkpoint.tokenize(text) for text in SENTENCES]
    seq = max(len(s.ids) for s in sentences)
    ids, mask = np.zeros((2, seq), np.int64), np.zeros((2, seq), np.int64)
    for i, s in enumerate(sentences):
        ids[i, : len(s.ids)], mask[i, : len(s.ids)] = s.ids, 1
    assert mask[1].sum() < seq  # the second sentence has padding
    return ids, mask


def test_hidden_states_match_transformers_at_every_layer(
    encoder: BertEncoder, hf_model: object, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, mask = batch
    with torch.no_grad():
        theirs = hf_model(  # type: ignore[operator]
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        ).hidden_states
    assert len(theirs) == encoder.num_layers + 1
    for layer in range(encoder.num_layers):
        ours = encoder.hidden_states(ids, layer, mask)
        for row in range(2):
            real = mask[row].astype(bool)  # padded positions are computed differently and never used
            error = relative_l2(ours[row, real], theirs[layer][row, real].double().numpy())
            assert error <= 1e-4, (layer, row, error)


def test_attention_weights_match_transformers(
    minilm_dir: Path, encoder: BertEncoder, hf_model: object, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    """What explain asks the server for: layer N's weights over the hidden states entering it."""
    ids, mask = batch
    layer = 3
    with torch.no_grad():
        theirs = hf_model(  # type: ignore[operator]
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_attentions=True
        ).attentions[layer]
    weights, heads = load_bert_layer(minilm_dir, layer)
    _, ours = reference_attention(weights, heads, encoder.hidden_states(ids, layer, mask), mask)
    for row in range(2):
        n = int(mask[row].sum())
        assert relative_l2(ours[row, :, :n, :n], theirs[row, :, :n, :n].double().numpy()) <= 1e-4


def test_gelu_is_the_exact_erf_form() -> None:
    x = np.linspace(-6, 6, 1001)
    exact = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # erf form, float64
    tanh = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.abs(gelu(x) - exact).max() <= 1e-12
    assert np.abs(gelu(x) - tanh).max() > 1e-4  # the approximation would be told apart


def test_layers_and_positions_out_of_range_are_named(encoder: BertEncoder) -> None:
    ids = np.array([[101, 2009, 102]])
    with pytest.raises(WeightsError, match=r"--layer 6 is out of range: .* has layers 0\.\.5"):
        encoder.hidden_states(ids, 6)
    with pytest.raises(WeightsError, match="out of range"):
        encoder.hidden_states(ids, -1)
    with pytest.raises(WeightsError, match="513 tokens: the checkpoint has 512 positions"):
        encoder.embeddings(np.full((1, 513), 2009))
    assert np.array_equal(encoder.hidden_states(ids, 0), encoder.embeddings(ids))
