"""Multi-head self-attention as a PyTorch module: the maths the service serves.

For X [B, L, d_model], per head h with d_k = d_model / num_heads:
    Q = X·W_Qᵀ + b_Q,  K = X·W_Kᵀ + b_K,  V = X·W_Vᵀ + b_V      (PyTorch Linear layout)
    A_h = softmax(Q_h·K_hᵀ / √d_k)  over keys
    Z = concat_h(A_h·V_h)·W_Oᵀ + b_O

Masks: ``key_padding_mask`` [B, L] with 1 = real token, 0 = padding.
- A padded key gets exactly zero weight from every query.
- A padded query row is defined to return zeros: its output vector is 0 and its
  attention-weight row is all 0. (It is not a token; zeros make that explicit and
  keep a fully padded sequence finite instead of NaN.)
With ``causal=True`` query i also ignores keys j > i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import AttentionConfig

__all__ = ["AttentionConfig", "MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Self-attention with h heads concatenated through W_O.

    ``forward(x)`` returns ``(output, weights)``; ``weights`` is ``None`` unless
    ``need_weights`` is set, in which case it is [B, h, L, L] (rows = queries).
    """

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        # The manual path is what ONNX export traces; the fast path is for eager torch.
        self.use_fast_path = True

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, _ = x.shape
        h, dk = self.config.num_heads, self.config.head_dim
        q = self.q_proj(x).view(B, L, h, dk).transpose(1, 2)  # (B, h, L, dk)
        k = self.k_proj(x).view(B, L, h, dk).transpose(1, 2)  # (B, h, L, dk)
        v = self.v_proj(x).view(B, L, h, dk).transpose(1, 2)  # (B, h, L, dk)
        allowed = self._allowed_keys(key_padding_mask, L, x.device)  # (B|1, 1, L|1, L) bool or None

        if need_weights or not self.use_fast_path:
            z, probs = self._attend_manual(q, k, v, allowed)
            weights = probs if need_weights else None
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, h, L, dk)
            weights = None

        z = z.transpose(1, 2).reshape(B, L, h * dk)  # heads concatenated: (B, L, d)
        out = self.out_proj(z)  # (B, L, d)
        if key_padding_mask is not None:
            real_query = key_padding_mask.bool()  # (B, L)
            out = torch.where(real_query[:, :, None], out, torch.zeros((), dtype=out.dtype))
            if weights is not None:
                weights = torch.where(real_query[:, None, :, None], weights, torch.zeros((), dtype=weights.dtype))
        return out, weights

    def _allowed_keys(self, key_padding_mask: torch.Tensor | None, L: int, device: torch.device) -> torch.Tensor | None:
        allowed = None
        if key_padding_mask is not None:
            allowed = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        if self.config.causal:
            causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, L, L)
            allowed = causal if allowed is None else allowed & causal
        return allowed

    def _attend_manual(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(Q·Kᵀ/√d_k)·V, written as the formula reads."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, L, L)
        if allowed is not None:
            # A finite floor, not -inf: a row with no allowed key stays finite (it is zeroed later).
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)  # (B, h, L, L), rows sum to 1
        return weights @ v, weights  # (B, h, L, dk), (B, h, L, L)
