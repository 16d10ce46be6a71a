"""The model's configuration (Book §4.1) and the GPT-2 presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax


@jax.tree_util.register_static  # hashable and static: passes through jax.jit as is
@dataclass(frozen=True)
class GPTConfig:
    """A GPT architecture, with the book's field names; training settings live elsewhere."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # How attention runs, not what it computes: jax.nn.dot_product_attention (cuDNN's fused
    # flash attention on a GPU) instead of the book's explicit softmax(QK^T)V. It has no dropout
    # on the attention weights, so it needs drop_rate = 0.
    fused_attention: bool = False

    def __post_init__(self):
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate={self.drop_rate} must lie in [0, 1)")
        if self.fused_attention and self.drop_rate:
            raise ValueError(
                "fused_attention has no attention dropout: use it with drop_rate=0.0 "
                f"(got {self.drop_rate}), or keep fused_attention=False"
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def same_weights_as(self, other: GPTConfig) -> bool:
        """Whether both configs describe one architecture: equal in every field but how the model
        runs (dropout and the attention kernel), so params of one fit the other."""
        run_as = {"drop_rate": other.drop_rate, "fused_attention": other.fused_attention}
        return type(other) is GPTConfig and self.replace(**run_as) == other

    def replace(self, **changes) -> GPTConfig:
        """A copy with some fields changed, e.g. `cfg.replace(context_length=256)`."""
        return dataclasses.replace(self, **changes)


GPT_CONFIG_124M = GPTConfig()  # Book §4.1
# GPT-2 sizes (Book §5.5); the book loads OpenAI's weights with context 1024 and qkv_bias=True.
GPT2_PRESETS = {
    "124M": GPT_CONFIG_124M,
    "355M": GPT_CONFIG_124M.replace(emb_dim=1024, n_layers=24, n_heads=16),
    "774M": GPT_CONFIG_124M.replace(emb_dim=1280, n_layers=36, n_heads=20),
    "1558M": GPT_CONFIG_124M.replace(emb_dim=1600, n_layers=48, n_heads=25),
}
# A model small enough for tests and quick mode: same vocabulary, tiny everything else.
TINY = GPTConfig(context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
