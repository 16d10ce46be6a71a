"""The Qwen family: Qwen2's biases and Qwen3's QK-norm as options of the Llama, the presets'
parameter counts against the published ones, and Qwen's files (GGUF, Hugging Face folders)."""

import jax
import numpy as np
import pytest

from gptflax import models, nn
from gptflax.config import QWEN3_TINY, QWEN_PRESETS, LlamaConfig

pytestmark = pytest.mark.labqwen
QWEN2_TINY = QWEN3_TINY.replace(qkv_bias=True, qk_norm=False)
TOKENS = np.arange(12)[None] * 5 % QWEN3_TINY.vocab_size


@pytest.mark.parametrize(
    ("name", "published", "non_embedding"),
    [
        ("Qwen2.5-Coder-0.5B", "0.49B", "0.36B"),  # the model cards' numbers
        ("Qwen2.5-Coder-1.5B", "1.54B", "1.31B"),
        ("Qwen3-0.6B", "0.6B", "0.44B"),
        ("Qwen3-1.7B", "1.7B", "1.4B"),
        ("Qwen3-4B", "4.0B", "3.6B"),
        ("Qwen3-8B", "8.2B", "6.95B"),
    ],
)
def test_presets_have_the_published_parameter_counts(name, published, non_embedding):
    cfg = QWEN_PRESETS[name]
    total = nn.count_params(jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg)))
    embeddings = cfg.vocab_size * cfg.emb_dim * (1 if cfg.tie_embeddings else 2)

    def as_card(n: int, like: str) -> str:
        decimals = len(like.split(".")[1]) - 1 if "." in like else 0
        return f"{n / 1e9:.{decimals}f}B"

    assert as_card(total, published) == published
    assert as_card(total - embeddings, non_embedding) == non_embedding


def test_qwen3_normalises_each_heads_queries_and_keys_before_rotating():
    params = models.init_params(jax.random.key(0), QWEN3_TINY)
    att = params["trf_blocks"]["att"]
    assert att["q_norm"]["scale"].shape == (2, QWEN3_TINY.head_dim) and "bias" not in att["W_query"]
    base = models.forward(params, TOKENS, QWEN3_TINY)
    scaled = jax.tree.map(lambda a: a, params)
    scaled["trf_blocks"]["att"]["k_norm"]["scale"] = 2 * att["k_norm"]["scale"]
    assert not np.allclose(models.forward(scaled, TOKENS, QWEN3_TINY), base, atol=1e-3)
    # A key scaled as a whole changes nothing after the norm: the norm came first.
    bigger = jax.tree.map(lambda a: a, params)
    bigger["trf_blocks"]["att"]["W_key"]["kernel"] = 3 * att["W_key"]["kernel"]
    np.testing.assert_allclose(models.forward(bigger, TOKENS, QWEN3_TINY), base, atol=2e-4)


def test_qwen2_adds_biases_and_without_either_option_it_is_the_llama():
    params = models.init_params(jax.random.key(1), QWEN2_TINY)
    att = params["trf_blocks"]["att"]
    assert {"bias"} <= set(att["W_query"]) and "bias" not in att["out_proj"] and "q_norm" not in att
    plain = QWEN3_TINY.replace(qk_norm=False)
    llama_cfg = LlamaConfig(**{f: getattr(plain, f) for f in (
        "vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads", "hidden_dim",
        "n_layers", "rope_base", "rms_eps", "tie_embeddings", "head_dim")})  # fmt: skip
    params = models.init_params(jax.random.key(2), plain)
    np.testing.assert_allclose(
        models.forward(params, TOKENS, plain), models.forward(params, TOKENS, llama_cfg),
        rtol=1e-6, atol=1e-6,
    )  # fmt: skip
