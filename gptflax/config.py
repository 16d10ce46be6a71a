"""The architectures: GPT's configuration (Book §4.1) and the GPT-2 presets, then each model
family's config as the previous one with a few fields changed or added (Llama, Gemma 3).

A config describes weights and how a model runs, never training settings; it is hashable and
static, so it passes through `jax.jit` as is. Every config has `vocab_size`, `context_length`,
`emb_dim`, `n_layers`, `n_heads`, `n_kv_heads` and `head_dim`, and says which layers see only a
sliding window of earlier positions (`kv_window`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax

# What a training step's backward pass recomputes instead of keeping from the forward pass
# (rematerialisation, `jax.checkpoint` around each block): "none" keeps everything, "dots" keeps
# the matmuls' outputs and recomputes the rest, "full" keeps only each block's input.
REMAT_POLICIES = ("none", "dots", "full")


def check_remat(remat: str) -> None:
    """A ValueError naming the policies, for a remat that is none of them."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: one of {', '.join(REMAT_POLICIES)}, not {remat!r}")


class Architecture:
    """What every config shares; `HOW_IT_RUNS` names the fields that do not shape the weights."""

    HOW_IT_RUNS: tuple[str, ...] = ()
    remat: str = "none"  # a family whose config has no such field never rematerialises

    def replace(self, **changes):
        """A copy with some fields changed, e.g. `cfg.replace(context_length=256)`."""
        return dataclasses.replace(self, **changes)

    def same_weights_as(self, other) -> bool:
        """Whether params of one fit the other: the same family, equal in every field but those
        of `HOW_IT_RUNS`."""
        if type(other) is not type(self):
            return False
        return other.replace(**{name: getattr(self, name) for name in self.HOW_IT_RUNS}) == self

    def kv_window(self, layer: int) -> int | None:
        """How many positions up to its own a query of `layer` sees (None: all); its KV cache
        needs no more slots than that."""
        return None

    def is_deltanet(self, layer: int) -> bool:
        """Whether `layer` is a Gated DeltaNet layer (a fixed-size state) rather than attention."""
        return False

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends over: its own, unless it shares an
        earlier layer's (KV sharing)."""
        return layer

    def is_kv_source(self, layer: int) -> bool:
        """Whether later layers attend over this layer's keys and values."""
        return False

    def cache_window(self, layer: int) -> int | None:
        """How many positions the layer's cache keeps (None: all): its window, if it has one."""
        return self.kv_window(layer)


@jax.tree_util.register_static  # hashable and static: passes through jax.jit as is
@dataclass(frozen=True)
class GPTConfig(Architecture):
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
    remat: str = "none"  # what the backward pass recomputes: one of REMAT_POLICIES
    # The book's attention alternatives (bonus ch04/04 to 07), each off by default:
    n_kv_groups: int | None = None  # GQA: key/value heads, each serving n_heads / n_kv_groups
    latent_dim: int | None = None  # MLA: keys and values come from one cached latent of this size
    window: int | None = None  # SWA: a query sees itself and window - 1 earlier positions
    full_attention_every: int = 0  # with a window or DeltaNet: every n-th layer attends to all
    num_experts: int = 0  # MoE: SwiGLU experts for the feed-forward (0: the dense GELU one)
    num_experts_per_tok: int = 2  # the top-k experts each token goes through
    num_shared_experts: int = 0  # experts every token goes through, beside the routed ones
    moe_hidden_dim: int | None = None  # each expert's hidden size (default 4 * emb_dim)
    router_aux_coef: float = 0.01  # weight of the router's load-balancing loss in training
    # Gated DeltaNet (bonus ch04/08): linear attention in all layers, or with full_attention_every,
    # in all but every n-th (4: Qwen3-Next's 3:1); its short convolution's taps.
    gated_deltanet: bool = False
    deltanet_conv: int = 4
    # KV sharing (Gemma 4): the last n layers compute queries only and attend over the keys and
    # values of the last earlier layer of their kind (sliding or full), which keeps all of them.
    kv_shared_layers: int = 0
    # DeepSeek sparse attention (V3.2): each query attends to the dsa_top_k keys its lightning
    # indexer (indexer_heads heads of indexer_dim) scores highest; the indexer's loss weight.
    dsa_top_k: int | None = None
    indexer_heads: int = 4
    indexer_dim: int = 16
    indexer_loss_coef: float = 1.0

    HOW_IT_RUNS = (
        "drop_rate", "fused_attention", "remat", "window", "router_aux_coef", "indexer_loss_coef",
    )  # fmt: skip

    def __post_init__(self):
        check_remat(self.remat)
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate={self.drop_rate} must lie in [0, 1)")
        if self.fused_attention and self.drop_rate:
            raise ValueError(
                "fused_attention has no attention dropout: use it with drop_rate=0.0 "
                f"(got {self.drop_rate}), or keep fused_attention=False"
            )
        self._check_variants()

    def _check_variants(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_groups={self.n_kv_groups}"
            )
        if self.latent_dim and (self.qkv_bias or self.n_kv_groups):
            raise ValueError("MLA (latent_dim) has no query/key/value biases and no KV groups")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must lie in 1..num_experts"
            )
        if self.gated_deltanet and (self.window or self.latent_dim):
            raise ValueError(
                "gated_deltanet mixes linear attention with full attention "
                "(full_attention_every): it takes no window and no latent_dim"
            )
        if self.deltanet_conv < 1:
            raise ValueError(f"deltanet_conv={self.deltanet_conv}: the convolution needs a tap")
        if self.kv_shared_layers and (self.gated_deltanet or self.latent_dim):
            raise ValueError("kv_shared_layers shares keys and values: not with DeltaNet or MLA")
        if not 0 <= self.kv_shared_layers < self.n_layers:
            raise ValueError(
                f"kv_shared_layers={self.kv_shared_layers} must lie in 0..n_layers - 1: the first "
                "layer computes its own keys and values"
            )
        if self.dsa_top_k is not None and (
            self.dsa_top_k < 1 or self.window or self.latent_dim or self.gated_deltanet
            or self.kv_shared_layers
        ):  # fmt: skip
            raise ValueError(
                f"dsa_top_k={self.dsa_top_k}: a number of keys, at least 1, on plain or "
                "grouped-query attention (no window, latent_dim, DeltaNet or KV sharing)"
            )
        for layer in range(self.n_layers - self.kv_shared_layers, self.n_layers):
            self.kv_source(layer)  # each shared layer has an earlier one of its kind

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: n_kv_groups (GQA), else one per query head."""
        return self.n_kv_groups or self.n_heads

    @property
    def expert_hidden_dim(self) -> int:
        return self.moe_hidden_dim or 4 * self.emb_dim

    def is_full(self, layer):
        """Whether `layer` (an int, or a traced one in the layer scan) sees every position."""
        return self.window is None or self._every_nth(layer)

    def is_deltanet(self, layer: int) -> bool:
        return self.gated_deltanet and not self._every_nth(layer)

    def kv_source(self, layer: int) -> int:
        first_shared = self.n_layers - self.kv_shared_layers
        if layer < first_shared:
            return layer
        kind = [j for j in range(first_shared) if self.is_full(j) == self.is_full(layer)]
        if not kind:
            raise ValueError(
                f"layer {layer} shares keys and values, but no earlier layer is of its kind "
                "(sliding or full): share fewer layers (kv_shared_layers)"
            )
        return kind[-1]

    def is_kv_source(self, layer: int) -> bool:
        shared = range(self.n_layers - self.kv_shared_layers, self.n_layers)
        return self.kv_shared_layers > 0 and any(self.kv_source(j) == layer for j in shared)

    def cache_window(self, layer: int) -> int | None:
        return None if self.is_kv_source(layer) else self.kv_window(layer)

    def _every_nth(self, layer):
        every = self.full_attention_every
        return every > 0 and layer % every == every - 1

    def kv_window(self, layer: int) -> int | None:
        return None if self.is_full(layer) else self.window


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
class LlamaConfig(Architecture):
    """A Llama architecture (the book's bonus: GPT to Llama), defaults of SmolLM2-135M.

    What GPT's config has no field for: `n_kv_heads` key/value heads shared by the query heads
    (grouped-query attention), the feed-forward's `hidden_dim`, the rotary `rope_base` (and Llama
    3's `rope_scaling`), RMSNorm's `rms_eps`, and whether the output head is the token embedding;
    `head_dim` is emb_dim / n_heads unless given. No dropout, no biases, no positional table."""

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
    head_dim: int | None = None
    fused_attention: bool = False  # as GPT's: jax.nn.dot_product_attention (cuDNN on a GPU)
    remat: str = "none"  # as GPT's: one of REMAT_POLICIES

    # Positions are rotations, not a table: no weight has the context length.
    HOW_IT_RUNS = ("context_length", "fused_attention", "remat")

    def __post_init__(self):
        check_remat(self.remat)
        if isinstance(self.rope_scaling, dict):  # read back from a checkpoint's JSON
            object.__setattr__(self, "rope_scaling", Llama3RoPE(**self.rope_scaling))
        if self.head_dim is None:
            if self.emb_dim % self.n_heads:
                raise ValueError(
                    f"emb_dim={self.emb_dim} does not split into n_heads={self.n_heads} heads: "
                    "give head_dim"
                )
            object.__setattr__(self, "head_dim", self.emb_dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "each key/value head serves the same number of query heads"
            )

    def replace(self, **changes):
        """A copy with some fields changed; a head size that was emb_dim / n_heads follows them."""
        if "head_dim" not in changes and self.head_dim * self.n_heads == self.emb_dim:
            changes["head_dim"] = None
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


@jax.tree_util.register_static
@dataclass(frozen=True)
class Gemma3Config(LlamaConfig):
    """Gemma 3 (the book's bonus ch05/12), defaults of Gemma 3 270M: the Llama with sliding-window
    attention in all but every `sliding_window_pattern`-th layer (`sliding_window` positions,
    rotary base `rope_local_base`), QK-norm, scores scaled by 1/sqrt(query_pre_attn_scalar),
    norms after attention and the feed-forward too, GeGLU, embeddings scaled by sqrt(emb_dim)."""

    vocab_size: int = 262_144
    context_length: int = 32_768
    emb_dim: int = 640
    n_heads: int = 4
    n_kv_heads: int = 1
    hidden_dim: int = 2048
    n_layers: int = 18
    rope_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    head_dim: int | None = 256
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    rope_local_base: float = 10_000.0
    query_pre_attn_scalar: float = 256.0

    def is_global(self, layer):
        """Whether `layer` (an int, or a traced one inside the layer scan) sees all positions."""
        return (layer + 1) % self.sliding_window_pattern == 0

    def kv_window(self, layer: int) -> int | None:
        return None if self.is_global(layer) else self.sliding_window


GEMMA3_270M = Gemma3Config()
# A Gemma 3 small enough for tests: a window of 4 on five of every six layers, two RoPE bases.
GEMMA3_TINY = Gemma3Config(
    vocab_size=256, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, head_dim=16,
    hidden_dim=64, n_layers=6, sliding_window=4, query_pre_attn_scalar=16.0,
)  # fmt: skip


@jax.tree_util.register_static
@dataclass(frozen=True)
class QwenConfig(LlamaConfig):
    """Qwen2 and Qwen3 (the book's bonus ch05/11), defaults of Qwen3-0.6B: the Llama with biases
    on the query, key and value projections (`qkv_bias`: Qwen2) or RMSNorm on each head's queries
    and keys (`qk_norm`: Qwen3), a head size of its own, RoPE base 1,000,000."""

    vocab_size: int = 151_936
    context_length: int = 40_960
    emb_dim: int = 1024
    n_heads: int = 16
    n_kv_heads: int = 8
    hidden_dim: int = 3072
    n_layers: int = 28
    rope_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    head_dim: int | None = 128
    qkv_bias: bool = False
    qk_norm: bool = True


QWEN3_0_6B = QwenConfig()
_QWEN2_5_CODER = QwenConfig(
    context_length=32_768, emb_dim=896, n_heads=14, n_kv_heads=2, head_dim=64, hidden_dim=4864,
    n_layers=24, qkv_bias=True, qk_norm=False,
)  # fmt: skip
# Hugging Face's config.json of each model, in the book's names.
QWEN_PRESETS = {
    "Qwen2.5-Coder-0.5B": _QWEN2_5_CODER,
    "Qwen2.5-Coder-1.5B": _QWEN2_5_CODER.replace(
        emb_dim=1536, n_heads=12, head_dim=128, hidden_dim=8960, n_layers=28
    ),  # fmt: skip
    "Qwen3-0.6B": QWEN3_0_6B,
    "Qwen3-1.7B": QWEN3_0_6B.replace(emb_dim=2048, hidden_dim=6144),
    "Qwen3-4B": QWEN3_0_6B.replace(emb_dim=2560, n_heads=32, hidden_dim=9728, n_layers=36),
    "Qwen3-8B": QWEN3_0_6B.replace(
        emb_dim=4096, n_heads=32, hidden_dim=12288, n_layers=36, tie_embeddings=False
    ),
}
# A Qwen3 small enough for tests: QK-norm, an explicit head size, two key/value heads.
QWEN3_TINY = QwenConfig(
    vocab_size=256, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, head_dim=16,
    hidden_dim=64, n_layers=2,
)  # fmt: skip
