"""The book's attention alternatives (bonus ch04/04 to 07) as options of the GPT: the estimators
reproduce the numbers the folders' READMEs print; every variant decodes from its cache the tokens
it computes without one, and at its neutral setting is the plain GPT; MLA's absorbed form equals
its plain form; MoE's sorted dispatch equals computing every expert."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import models, parallel, sizes
from gptflax.config import GPTConfig
from gptflax.generate import generate
from gptflax.models import gpt, llama, mla, moe

pytestmark = pytest.mark.labattention

BASE = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
VARIANTS = {
    "gqa": BASE.replace(n_kv_groups=2),
    "swa": BASE.replace(window=4, n_layers=3, full_attention_every=3),
    "mla": BASE.replace(latent_dim=8),
    "moe": BASE.replace(num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                        moe_hidden_dim=16),
}  # fmt: skip
TOKENS = jax.random.randint(jax.random.key(1), (2, 20), 0, BASE.vocab_size)


def gb(n_bytes: int) -> float:
    return round(n_bytes / 1000**3, 2)  # the book's estimators print decimal GB


# --- the estimators -------------------------------------------------------------------------------


def test_kv_estimates_are_the_gqa_and_swa_readmes():
    """ch04/04_gqa: 4096-wide, 32 heads, 32 layers, 32k context, 8 KV heads, bf16; ch04/06_swa:
    the same with a 1024 window on 5 of every 6 layers (27 sliding, 5 full)."""
    mha = GPTConfig(emb_dim=4096, n_heads=32, n_layers=32)
    gqa = mha.replace(n_kv_groups=8)
    assert gb(sizes.kv_cache_bytes(mha, 32768)) == 17.18
    assert gb(sizes.kv_cache_bytes(gqa, 32768)) == 4.29
    assert sizes.kv_cache_bytes(mha, 32768) / sizes.kv_cache_bytes(gqa, 32768) == 4.0
    assert sizes.swa_layers(32, 5, 1) == (27, 5)
    swa = dict(window=1024, full_attention_every=6)
    assert sum(mha.replace(**swa).kv_window(i) is None for i in range(32)) == 5
    assert gb(sizes.kv_cache_bytes(mha.replace(**swa), 32768)) == 3.14
    assert gb(sizes.kv_cache_bytes(gqa.replace(**swa), 32768)) == 0.78


def test_kv_estimates_are_the_mla_readme():
    """ch04/05_mla: 2048-wide, 24 heads (head_dim rounded up to 86, as its estimator does), 48
    layers, 8k context, 6 KV heads or a 1024 latent, bf16."""
    head_dim = math.ceil(2048 / 24)
    mha = 48 * sizes.kv_bytes_per_layer(8192, 24, head_dim)
    gqa = 48 * sizes.kv_bytes_per_layer(8192, 6, head_dim)
    latent = 48 * sizes.mla_bytes_per_layer(8192, 1024)
    assert (gb(mha), gb(gqa), gb(latent)) == (3.25, 0.81, 0.81)
    assert f"{mha / latent:.2f}x, {100 * (1 - latent / mha):.2f}%" == "4.03x, 75.19%"
    cfg = GPTConfig(emb_dim=2048, n_heads=16, n_layers=48, latent_dim=1024)  # from a config
    assert sizes.kv_cache_bytes(cfg, 8192) == latent
    assert sizes.kv_bytes_per_token(cfg, 8192) == 48 * 1024 * 2


def test_a_deltanet_state_does_not_grow_with_the_context():
    """ch04/08_deltanet's plot (its README prints no numbers): 2048-wide, 16 heads of 128, bf16;
    a (128, 128) state per head against keys and values per token."""
    assert sizes.deltanet_bytes_per_layer(16, 128) == 16 * 128 * 128 * 2 == 524_288
    assert sizes.kv_bytes_per_layer(131_072, 16, 128) == 131_072 * 2048 * 2 * 2


def test_moe_parameter_estimates_are_the_moe_readme():
    """ch04/07_moe: 7168-wide, hidden 14336, SwiGLU, 8 experts, top 2, matched to the dense."""
    assert sizes.moe_params(7168, 14336, 8, 2, match_dense=True) == {
        "dense": 308_281_344, "per_expert": 38_535_168, "router": 57_344,
        "total": 308_338_688, "active": 77_127_680, "moe_hidden_dim": 1792,
    }  # fmt: skip


def test_a_models_total_and_active_parameters():
    cfg = VARIANTS["moe"]
    params = jax.eval_shape(models.init_params, jax.random.key(0), cfg)
    total, active = sizes.param_counts(params, cfg)
    assert total == sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    assert total - active == cfg.n_layers * 2 * sizes.moe_params(32, 16, 4, 2)["per_expert"]
    dense = jax.eval_shape(models.init_params, jax.random.key(0), BASE)
    assert sizes.param_counts(dense, BASE)[0] == sizes.param_counts(dense, BASE)[1]


# --- decoding and neutral settings ----------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_greedy_decoding_equals_uncached(name):
    cfg = VARIANTS[name]
    params = models.init_params(jax.random.key(0), cfg)
    cached = generate(params, TOKENS[:, :5], 6, cfg)  # past SWA's 4-slot ring
    np.testing.assert_array_equal(cached, generate(params, TOKENS[:, :5], 6, cfg, use_cache=False))


@pytest.mark.parametrize("name", ["swa", "mla"])
def test_prefill_and_steps_give_the_forward_logits(name):
    """A 4-slot ring on the sliding layers (so positions wrap) and MLA's absorbed form."""
    cfg = VARIANTS[name]
    params = models.init_params(jax.random.key(0), cfg)
    reference = models.forward(params, TOKENS, cfg)
    cache = models.init_cache(cfg, 2, 32)
    if name == "swa":
        assert [c.keys.shape[2] for c in cache] == [4, 4, 32]
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    step = jax.jit(lambda tokens, cache, positions: models.hidden_cached(
        params, tokens, cache, positions, cfg))  # fmt: skip
    h, cache = step(TOKENS[:, :9], cache, positions[:, :9])
    np.testing.assert_allclose(models.head(params, h), reference[:, :9], atol=2e-5)
    for t in range(9, 20):
        h, cache = step(TOKENS[:, t : t + 1], cache, positions[:, t : t + 1])
        np.testing.assert_allclose(models.head(params, h[:, 0]), reference[:, t], atol=2e-5)


def test_neutral_settings_are_the_plain_gpt():
    """One KV group per head, a window as long as the context: the same params and logits."""
    plain = models.init_params(jax.random.key(0), BASE)
    reference = models.forward(plain, TOKENS, BASE)
    for cfg in (BASE.replace(n_kv_groups=4), BASE.replace(window=32, full_attention_every=2)):
        params = models.init_params(jax.random.key(0), cfg)
        jax.tree.map(np.testing.assert_array_equal, params, plain)
        np.testing.assert_allclose(models.forward(params, TOKENS, cfg), reference, atol=1e-6)


def test_grouped_query_attention_is_attention_with_repeated_key_value_heads():
    cfg = VARIANTS["gqa"]
    params = models.init_params(jax.random.key(0), cfg)

    def repeat_heads(linear):  # (L, D, G * Dh) -> (L, D, H * Dh), each head n_heads / G times
        kernel = linear["kernel"].reshape(cfg.n_layers, cfg.emb_dim, cfg.n_kv_groups, -1)
        return {"kernel": jnp.repeat(kernel, 2, axis=2).reshape(cfg.n_layers, cfg.emb_dim, -1)}

    att = params["trf_blocks"]["att"]
    expanded = {**att, "W_key": repeat_heads(att["W_key"]), "W_value": repeat_heads(att["W_value"])}
    plain = {**params, "trf_blocks": {**params["trf_blocks"], "att": expanded}}
    np.testing.assert_allclose(
        models.forward(params, TOKENS, cfg), models.forward(plain, TOKENS, BASE), atol=1e-5
    )


def test_mla_absorbed_equals_plain_and_an_identity_latent_is_plain_attention():
    cfg = VARIANTS["mla"]
    att = mla.init_attention(jax.random.key(2), cfg)
    x = jax.random.normal(jax.random.key(3), (2, 12, cfg.emb_dim))
    positions = jnp.arange(12)[None]
    reference = mla.plain(att, x, cfg, positions=positions)
    absorbed, _ = mla.absorbed(att, x, cfg, positions=positions)
    np.testing.assert_allclose(absorbed, reference, atol=1e-5)
    full = cfg.replace(latent_dim=cfg.emb_dim)  # W_DKV = I: the latent is x itself
    mha = gpt.init_attention(jax.random.key(4), BASE)
    identity = {**mha, "W_DKV": {"kernel": jnp.eye(cfg.emb_dim)}, "W_UK": mha["W_key"],
                "W_UV": mha["W_value"]}  # fmt: skip
    np.testing.assert_allclose(
        mla.plain(identity, x, full, positions=positions),
        gpt.attention(mha, x, BASE, layer=0, positions=positions)[0], atol=1e-5,
    )  # fmt: skip


# --- the mixture of experts -----------------------------------------------------------------------


def dense_moe(params, x, cfg):
    """Every expert on every token, weighted by the router (zero for the unchosen)."""
    _, chosen, weights = moe.route(params["gate"], x, cfg.num_experts_per_tok)
    gates = jnp.zeros((x.shape[0], cfg.num_experts)).at[jnp.arange(x.shape[0])[:, None],
                                                          chosen].set(weights)  # fmt: skip
    e = params["experts"]
    outputs = jnp.stack([llama.feed_forward({n: {"kernel": e[n][i]} for n in e}, x)
                         for i in range(cfg.num_experts)], axis=1)  # (N, E, D)  # fmt: skip
    return jnp.einsum("ne,ned->nd", gates, outputs)


def test_sorted_dispatch_equals_the_dense_reference_and_one_expert_is_swiglu():
    cfg = VARIANTS["moe"].replace(num_shared_experts=0)
    params = moe.init_feed_forward(jax.random.key(5), cfg)
    x = jax.random.normal(jax.random.key(6), (3, 7, cfg.emb_dim))
    reference = dense_moe(params, x.reshape(-1, cfg.emb_dim), cfg).reshape(x.shape)
    np.testing.assert_allclose(jax.jit(moe.feed_forward)(params, x, cfg), reference, atol=1e-5)
    one = cfg.replace(num_experts=1, num_experts_per_tok=1)
    params = moe.init_feed_forward(jax.random.key(7), one)
    swiglu = {n: {"kernel": params["experts"][n][0]} for n in ("fc1", "fc2", "fc3")}
    np.testing.assert_allclose(
        moe.feed_forward(params, x, one), llama.feed_forward(swiglu, x), atol=1e-5
    )


def test_the_load_balancing_loss_reaches_the_router_through_the_gradient():
    cfg = VARIANTS["moe"].replace(num_shared_experts=0)
    params = moe.init_feed_forward(jax.random.key(5), cfg)
    x = jax.random.normal(jax.random.key(6), (2, 9, cfg.emb_dim))
    even = moe.load_balancing_loss(jnp.zeros((8, 4)), jnp.arange(8).reshape(4, 2) % 4)
    assert float(even) == pytest.approx(1.0)  # balanced: 1; one expert for all: up to E

    def grad_of(coef):
        loss = lambda p: moe.feed_forward(p, x, cfg.replace(router_aux_coef=coef)).sum()  # noqa: E731
        return jax.jit(jax.grad(loss))(params)["gate"]["kernel"]

    def aux(p):
        logits, chosen, _ = moe.route(p["gate"], x.reshape(-1, cfg.emb_dim), 2)
        return moe.load_balancing_loss(logits, chosen)

    np.testing.assert_allclose(
        grad_of(0.5) - grad_of(0.0), 0.5 * jax.grad(aux)(params)["gate"]["kernel"], atol=1e-5
    )


def test_experts_split_over_the_model_axis():
    cfg = VARIANTS["moe"]
    params = models.init_params(jax.random.key(0), cfg)
    mesh = parallel.make_mesh(data=2, model=4)
    specs = parallel.shardings(params, cfg, mesh, "ep")["trf_blocks"]["ff"]
    assert specs["experts"]["fc1"].spec == jax.sharding.PartitionSpec(None, "model", None, None)
    sharded = parallel.shard(params, cfg, mesh, "ep")
    np.testing.assert_allclose(
        jax.jit(models.forward)(sharded, TOKENS, cfg),
        models.forward(params, TOKENS, cfg), atol=1e-5,
    )  # fmt: skip
