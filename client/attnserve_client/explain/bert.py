"""A numpy BERT encoder: the hidden states that enter layer N of a BERT-family checkpoint.

Embeddings (word + position + token type, LayerNorm), then BertLayer 0..N-1 as transformers writes it:
self-attention (reference.py, the float64 maths every served graph is checked against) + output dense,
residual, LayerNorm; intermediate dense, GELU (exact, with erf, as BERT's "gelu"), output dense, residual,
LayerNorm. float64 throughout. numpy + safetensors only: the explain client runs it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnserve_client.explain.checkpoints import bert_attention_weights, bert_prefix, check_layer, read_bert_config
from attnserve_client.explain.reference import WeightsError, reference_attention

_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has no erf; math.erf is exact, and a sentence is a few thousand calls


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's "gelu": x·Φ(x) with the exact normal CDF (not the tanh approximation)."""
    return 0.5 * x * (1.0 + np.asarray(_erf(x / math.sqrt(2.0)), dtype=np.float64))


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)  # biased, as torch's LayerNorm
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


@dataclass(frozen=True)
class BertEncoder:
    """A checkpoint's embeddings and encoder layers; `hidden_states(ids, n)` is what enters layer n."""

    checkpoint_dir: Path
    config: dict
    sha256: str  # of model.safetensors
    tensors: dict[str, np.ndarray]  # float32 as stored, the "bert." prefix (if any) removed

    @classmethod
    def load(cls, checkpoint_dir: Path) -> BertEncoder:
        """Read config.json and model.safetensors (a known checkpoint's hash verified); raise WeightsError."""
        from safetensors.numpy import load_file

        checkpoint_dir = Path(checkpoint_dir)
        config, sha256 = read_bert_config(checkpoint_dir)
        for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if config.get(key, supported) != supported:
                raise WeightsError(f"{checkpoint_dir}: {key} {config[key]!r} is not supported (only {supported!r})")
        raw = load_file(str(checkpoint_dir / "model.safetensors"))
        prefix = bert_prefix(raw)
        return cls(checkpoint_dir, config, sha256, {k.removeprefix(prefix): v for k, v in raw.items()})

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings", 512))

    def _t(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A tensor in float64; with `rows`, only those rows (an embedding lookup converts no more than it needs)."""
        if name not in self.tensors:
            raise WeightsError(f"{self.checkpoint_dir}: tensor {name} not found; is this a BERT-family checkpoint?")
        stored = self.tensors[name]
        return (stored if rows is None else stored[rows]).astype(np.float64)

    def _linear(self, name: str, x: np.ndarray) -> np.ndarray:
        return x @ self._t(f"{name}.weight").T + self._t(f"{name}.bias")

    def _norm(self, name: str, x: np.ndarray) -> np.ndarray:
        eps = float(self.config.get("layer_norm_eps", 1e-12))
        return layer_norm(x, self._t(f"{name}.weight"), self._t(f"{name}.bias"), eps)

    def embeddings(self, ids: np.ndarray, type_ids: np.ndarray | None = None) -> np.ndarray:
        """[B, L] token ids (and segment ids, default 0) -> [B, L, hidden]."""
        ids = np.asarray(ids)
        length = ids.shape[1]
        if length > self.max_positions:
            raise WeightsError(f"{length} tokens: the checkpoint has {self.max_positions} positions")
        type_ids = np.zeros_like(ids) if type_ids is None else np.asarray(type_ids)
        x = (
            self._t("embeddings.word_embeddings.weight", ids)
            + self._t("embeddings.position_embeddings.weight", np.arange(length))[None]
            + self._t("embeddings.token_type_embeddings.weight", type_ids)
        )  # (B, L, d)
        return self._norm("embeddings.LayerNorm", x)

    def layer(self, n: int, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """BertLayer n over [B, L, hidden]; mask [B, L], 1 = real token (padded keys get no weight)."""
        p = f"encoder.layer.{n}."
        attention = bert_attention_weights(self.tensors, self.tensors.__getitem__, n, str(self.checkpoint_dir), "")
        context, _ = reference_attention(attention, self.num_heads, x, mask)  # self-attention + output.dense
        x = self._norm(f"{p}attention.output.LayerNorm", context + x)
        inner = gelu(self._linear(f"{p}intermediate.dense", x))  # (B, L, intermediate)
        return self._norm(f"{p}output.LayerNorm", self._linear(f"{p}output.dense", inner) + x)

    def hidden_states(self, ids: np.ndarray, layer: int, mask: np.ndarray | None = None) -> np.ndarray:
        """float64 [B, L, hidden] entering layer `layer` (0: the embeddings); raise WeightsError out of range."""
        check_layer(self.checkpoint_dir, self.config, layer)
        x = self.embeddings(ids)
        for n in range(layer):
            x = self.layer(n, x, mask)
        return x
