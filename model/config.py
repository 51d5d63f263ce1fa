"""The attention's shape, free of torch so the export CLI can check its flags before loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionConfig:
    d_model: int = 512  # width of every token vector, in and out
    num_heads: int = 8  # heads; each works on d_model / num_heads channels
    causal: bool = False  # True: query i sees keys 0..i only (decoder-style)

    def __post_init__(self) -> None:
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be a positive integer, got {self.num_heads}")
        if self.d_model <= 0:
            raise ValueError(f"d_model must be a positive integer, got {self.d_model}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads
