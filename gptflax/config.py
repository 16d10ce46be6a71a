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


@jax.tree_util.register_static
@dataclass(frozen=True)
class Llama3RoPE:
    """Llama 3's rotary-frequency rescaling: slow rotations slowed by `factor`, fast ones kept."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@jax.tree_util.register_static
@dataclass(frozen=True)
class LlamaConfig:
    """A Llama architecture (the book's bonus: GPT to Llama), defaults of SmolLM2-135M.

    What GPT's config has no field for: `n_kv_heads` key/value heads shared by the query heads
    (grouped-query attention), the feed-forward's `hidden_dim`, the rotary `rope_base` (and Llama
    3's `rope_scaling`), RMSNorm's `rms_eps`, and whether the output head is the token embedding.
    No dropout, no biases, no positional embedding table."""

    vocab_size: int = 49152
    context_length: int = 8192
    emb_dim: int = 576
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536
    n_layers: int = 30
    rope_base: float = 100_000.0
    rope_scaling: Llama3RoPE | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # read back from a checkpoint's JSON
            object.__setattr__(self, "rope_scaling", Llama3RoPE(**self.rope_scaling))
        if self.emb_dim % self.n_heads or (self.emb_dim // self.n_heads) % 2:
            raise ValueError(
                f"emb_dim={self.emb_dim} must split into n_heads={self.n_heads} heads of an even "
                "size (rotary embeddings rotate pairs)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "each key/value head serves the same number of query heads"
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def same_weights_as(self, other) -> bool:
        """Whether params of one fit the other: equal in every field but the context length (no
        weight depends on it: positions are rotations, not a table)."""
        return type(other) is LlamaConfig and self.replace(context_length=0) == other.replace(
            context_length=0
        )

    def replace(self, **changes) -> LlamaConfig:
        """A copy with some fields changed, e.g. `cfg.replace(context_length=2048)`."""
        return dataclasses.replace(self, **changes)


SMOLLM2_135M = LlamaConfig()
_LLAMA_3_2 = LlamaConfig(
    vocab_size=128_256, context_length=131_072, emb_dim=2048, n_heads=32, n_kv_heads=8,
    hidden_dim=8192, n_layers=16, rope_base=500_000.0, rope_scaling=Llama3RoPE(),
)  # fmt: skip
# Hugging Face's config.json of each model, in the book's names.
LLAMA_PRESETS = {
    "SmolLM2-135M": SMOLLM2_135M,
    "SmolLM2-360M": SMOLLM2_135M.replace(
        emb_dim=960, n_heads=15, n_kv_heads=5, hidden_dim=2560, n_layers=32
    ),  # fmt: skip
    "SmolLM2-1.7B": SMOLLM2_135M.replace(
        emb_dim=2048, n_heads=32, n_kv_heads=32, hidden_dim=8192, n_layers=24, rope_base=130_000.0
    ),  # fmt: skip
    "Llama-3.2-1B": _LLAMA_3_2,
    "Llama-3.2-3B": _LLAMA_3_2.replace(emb_dim=3072, n_heads=24, n_layers=28),
}
# A Llama small enough for tests and quick mode: two key/value heads for four query heads.
LLAMA_TINY = LlamaConfig(
    vocab_size=256, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64,
    n_layers=2,
)  # fmt: skip
