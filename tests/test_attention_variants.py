"""The book's attention alternatives (bonus ch04/04 to 08) as options of the GPT: the estimators
reproduce the numbers the folders' READMEs print; every variant decodes from its cache the tokens
it computes without one, and at its neutral setting is the plain GPT; MLA's absorbed form equals
its plain form; MoE's sorted dispatch equals computing every expert; Gated DeltaNet's chunked
form equals its recurrence; KV-shared layers read their source layer's keys and values; DSA
attends to its indexer's top k and the indexer learns from its own loss only."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptflax import models, parallel, sizes
from gptflax.attention import split_heads, visible_keys
from gptflax.batching import BatchDecoder
from gptflax.config import GPTConfig
from gptflax.generate import generate, generate_cached
from gptflax.models import deltanet, dsa, gpt, llama, mla, moe
from gptflax.streaming import Decoder, Sampling

pytestmark = pytest.mark.labattention

BASE = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
VARIANTS = {
    "gqa": BASE.replace(n_kv_groups=2),
    "swa": BASE.replace(window=4, n_layers=3, full_attention_every=3),
    "mla": BASE.replace(latent_dim=8),
    "moe": BASE.replace(num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                        moe_hidden_dim=16),
    "deltanet": BASE.replace(gated_deltanet=True, n_layers=4, full_attention_every=4),  # 3:1
    # layers 2 (sliding) and 3 (full) attend over the keys and values of layers 0 and 1
    "kv-sharing": BASE.replace(n_layers=4, window=4, full_attention_every=2, kv_shared_layers=2),
    "dsa": BASE.replace(dsa_top_k=4, n_kv_groups=2),
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
    """ch04/08_deltanet's plot (its README prints no numbers): 2048-wide, 16 heads of 128, 48
    layers, bf16; a (128, 128) state per head against keys and values per token, and its 3:1
    mix (12 full layers), which a config's cache matches once the convolution's inputs (which
    the plot leaves out) are taken off."""
    assert sizes.deltanet_bytes_per_layer(16, 128) == 16 * 128 * 128 * 2 == 524_288
    assert sizes.kv_bytes_per_layer(131_072, 16, 128) == 131_072 * 2048 * 2 * 2
    cfg = GPTConfig(emb_dim=2048, n_heads=16, n_layers=48, gated_deltanet=True,
                    full_attention_every=4)  # fmt: skip
    conv = 3 * 3 * 2048 * 2  # taps - 1 inputs of q, k and v
    for context in (128, 4096, 131_072):
        plot = 12 * sizes.kv_bytes_per_layer(context, 16, 128) + 36 * 524_288
        assert sizes.kv_cache_bytes(cfg, context) - 36 * conv == plot


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


@pytest.mark.parametrize("name", ["swa", "mla", "deltanet", "kv-sharing", "dsa"])
def test_prefill_and_steps_give_the_forward_logits(name):
    """A 4-slot ring on the sliding layers (so positions wrap), MLA's absorbed form, and DeltaNet's
    state: prefilled by the chunked form, then stepped by the recurrence."""
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
    """One KV group per head, a window as long as the context, DeltaNet's every layer full
    attention: the same params and logits."""
    plain = models.init_params(jax.random.key(0), BASE)
    reference = models.forward(plain, TOKENS, BASE)
    for cfg in (BASE.replace(n_kv_groups=4), BASE.replace(window=32, full_attention_every=2),
                BASE.replace(gated_deltanet=True, full_attention_every=1),
                BASE.replace(dsa_top_k=32)):  # fmt: skip
        params = models.init_params(jax.random.key(0), cfg)
        params["trf_blocks"]["att"].pop("indexer", None)  # DSA's: the rest is the plain GPT's
        jax.tree.map(np.testing.assert_array_equal, params, plain)
        with_indexer = models.init_params(jax.random.key(0), cfg)
        np.testing.assert_allclose(models.forward(with_indexer, TOKENS, cfg), reference, atol=1e-6)


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


# --- Gated DeltaNet -------------------------------------------------------------------------------


def delta_inputs(t, seed=0, b=2, h=3, dh=8):
    """Random q, k (L2-normed), v, write strengths in (0, 1), log decays below 0, a state."""
    r = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, v = normal(b, h, t, dh), deltanet.l2_normed(normal(b, h, t, dh)), normal(b, h, t, dh)
    beta, g = jax.nn.sigmoid(normal(b, h, t)), -jax.nn.softplus(normal(b, h, t))
    return q, k, v, beta, g, normal(b, h, dh, dh)


def test_the_recurrence_is_the_books_delta_rule():
    """Per head and token: S <- a S; d = b (v - S^T k); S <- S + k d^T; o = S^T q (NumPy)."""
    q, k, v, beta, g, s0 = (np.asarray(z, np.float64) for z in delta_inputs(7))
    out, state = deltanet.recurrent(*(jnp.asarray(z, jnp.float32) for z in (q, k, v, beta, g, s0)))
    for b, h in np.ndindex(2, 3):
        s = s0[b, h].copy()
        for t in range(7):
            s *= np.exp(g[b, h, t])
            s += np.outer(k[b, h, t], beta[b, h, t] * (v[b, h, t] - s.T @ k[b, h, t]))
            np.testing.assert_allclose(out[b, h, t], s.T @ q[b, h, t], atol=1e-5)
        np.testing.assert_allclose(state[b, h], s, atol=1e-5)


@pytest.mark.parametrize(("t", "chunk"), [(50, 16), (64, 64), (5, 64)])
def test_the_chunked_form_equals_the_recurrence(t, chunk):
    """Several chunks with a padded last one, one whole chunk, a chunk shorter than the default;
    from a non-zero state, to 1e-5."""
    inputs = delta_inputs(t)
    out, state = deltanet.recurrent(*inputs)
    chunked_out, chunked_state = deltanet.chunked(*inputs, chunk=chunk)
    np.testing.assert_allclose(chunked_out, out, atol=1e-5)
    np.testing.assert_allclose(chunked_state, state, atol=1e-5)
    grads = jax.grad(lambda q: deltanet.chunked(q, *inputs[1:], chunk=chunk)[0].sum())(inputs[0])
    assert bool(jnp.isfinite(grads).all())


def test_deltanet_layers_keep_a_fixed_size_state_and_alternate_with_attention():
    cfg = VARIANTS["deltanet"]
    params = models.init_params(jax.random.key(0), cfg)
    assert ["A_log" in block["att"] for block in params["trf_blocks"]] == [True] * 3 + [False]
    cache = models.init_cache(cfg, 2, 32)
    assert [type(c).__name__ for c in cache] == ["DeltaState"] * 3 + ["KVCache"]
    assert cache[0].state.shape == (2, cfg.n_heads, cfg.head_dim, cfg.head_dim)
    per_layer = sizes.deltanet_bytes_per_layer(4, 8) + 3 * 3 * 32 * 2  # the state, conv inputs
    for context in (32, 32_768):
        full = sizes.kv_bytes_per_layer(context, 4, 8)
        assert sizes.kv_cache_bytes(cfg, context) == 3 * per_layer + full


def test_ragged_prompts_decode_as_each_alone():
    """Right-padded prompts: the padding enters neither the state nor the convolution's inputs."""
    cfg = VARIANTS["deltanet"]
    params = models.init_params(jax.random.key(0), cfg)
    prompts = [list(TOKENS[0, :3]), list(TOKENS[1, :11])]
    together = generate_cached(params, prompts, 6, cfg)
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(together[row], generate_cached(params, [prompt], 6, cfg)[0])


def test_a_rewound_deltanet_decoder_runs_the_kept_tokens_again():
    """A state cannot forget: rewinding re-feeds the kept tokens; the logits are a fresh one's."""
    cfg = VARIANTS["deltanet"]
    params = models.init_params(jax.random.key(0), cfg)
    ids = [int(i) for i in TOKENS[0, :12]]
    decoder = Decoder(params, cfg, capacity=8)
    decoder.feed(ids)
    decoder.rewind(5)
    again = decoder.feed(ids[5:9])
    np.testing.assert_allclose(again, Decoder(params, cfg).feed(ids[:9]), atol=1e-5)


def test_deltanet_params_split_over_the_model_axis_by_heads():
    cfg = VARIANTS["deltanet"]
    params = models.init_params(jax.random.key(0), cfg)
    mesh = parallel.make_mesh(data=2, model=4)
    att = parallel.shardings(params, cfg, mesh, "tp")["trf_blocks"][0]["att"]
    spec = jax.sharding.PartitionSpec
    assert att["W_alpha"]["kernel"].spec == spec(None, "model")  # a head on each device
    assert att["conv1d"].spec == spec(None, None, "model")
    assert (att["A_log"].spec, att["head_norm"]["scale"].spec) == (spec("model"), spec(None))
    sharded = parallel.shard(params, cfg, mesh, "tp")
    np.testing.assert_allclose(
        jax.jit(models.forward)(sharded, TOKENS, cfg),
        models.forward(params, TOKENS, cfg), atol=1e-5,
    )  # fmt: skip


def test_a_reused_batch_row_forgets_its_state():
    """A row's prefill starts from an empty state whatever the row held before."""
    cfg = VARIANTS["deltanet"]
    params = models.init_params(jax.random.key(0), cfg)
    decoder, greedy = BatchDecoder(params, cfg, rows=2, capacity=8), Sampling(temperature=0.0)
    for prompt in ([int(i) for i in TOKENS[0, :9]], [int(i) for i in TOKENS[1, :3]]):
        tokens = [decoder.start(0, prompt, greedy, seed=0)]
        tokens += [int(decoder.step()[0]) for _ in range(5)]
        np.testing.assert_array_equal(tokens, generate_cached(params, [prompt], 6, cfg)[0])


def test_deltanet_takes_no_window_or_latent():
    with pytest.raises(ValueError, match="no window and no latent_dim"):
        BASE.replace(gated_deltanet=True, window=8)
    with pytest.raises(ValueError, match="deltanet_conv=0"):
        BASE.replace(gated_deltanet=True, deltanet_conv=0)


# --- KV sharing -----------------------------------------------------------------------------------


def test_shared_layers_read_the_gemma4_e2b_sources():
    """35 layers, a sliding window on 4 of every 5, the last 20 sharing: sliding layers read
    layer 13's keys and values, full ones layer 14's (ch05/17_gemma4), which keep every position;
    the shared layers keep nothing."""
    cfg = GPTConfig(emb_dim=1536, n_heads=8, n_layers=35, window=512, full_attention_every=5,
                    kv_shared_layers=20)  # fmt: skip
    assert {cfg.kv_source(i) for i in range(15, 35) if cfg.kv_window(i)} == {13}
    assert {cfg.kv_source(i) for i in range(15, 35) if not cfg.kv_window(i)} == {14}
    assert [i for i in range(15) if cfg.cache_window(i) is None] == [4, 9, 13, 14]
    per_position = sizes.kv_bytes_per_layer(1, 8, 192)
    assert sizes.kv_cache_bytes(cfg, 8192) == per_position * (11 * 512 + 4 * 8192)
    with pytest.raises(ValueError, match="no earlier layer is of its kind"):
        cfg.replace(n_layers=6, kv_shared_layers=2)  # layer 4 full: 0-3 are all sliding


def test_shared_layers_attend_over_their_sources_keys_and_values():
    """The model written out in NumPy, each shared layer reusing its source's K and V."""
    cfg = VARIANTS["kv-sharing"]
    params = models.init_params(jax.random.key(0), cfg)
    n = jax.tree.map(np.asarray, params)
    tokens = np.asarray(TOKENS[:1])
    x = n["tok_emb"]["embedding"][tokens[0]] + n["pos_emb"]["embedding"][: tokens.shape[1]]
    t, h = x.shape[0], cfg.n_heads
    norm = lambda p, z: (z - z.mean(-1, keepdims=True)) / np.sqrt(  # noqa: E731
        z.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["shift"]  # fmt: skip
    split = lambda z: z.reshape(t, h, -1).transpose(1, 0, 2)  # (T, D) -> (H, T, Dh)  # noqa: E731
    kv = {}
    for i, block in enumerate(n["trf_blocks"]):
        a, z = block["att"], norm(block["norm1"], x)
        if "W_key" in a:
            kv[i] = (split(z @ a["W_key"]["kernel"]), split(z @ a["W_value"]["kernel"]))
        k, v = kv[cfg.kv_source(i)]
        q = split(z @ a["W_query"]["kernel"])
        back = np.arange(t)[:, None] - np.arange(t)[None]
        sees = (back >= 0) & (back < (cfg.kv_window(i) or t))
        scores = np.where(sees, q @ k.transpose(0, 2, 1) / np.sqrt(cfg.head_dim), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        context = (weights / weights.sum(-1, keepdims=True)) @ v
        x = x + context.transpose(1, 0, 2).reshape(t, -1) @ a["out_proj"]["kernel"]
        x = x + a["out_proj"]["bias"]
        z = norm(block["norm2"], x) @ block["ff"]["fc1"]["kernel"] + block["ff"]["fc1"]["bias"]
        z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
        x = x + z @ block["ff"]["fc2"]["kernel"] + block["ff"]["fc2"]["bias"]
    logits = norm(n["final_norm"], x) @ n["out_head"]["kernel"]
    np.testing.assert_allclose(models.forward(params, tokens, cfg)[0], logits, atol=2e-4)
    assert sorted(n["trf_blocks"][2]["att"]) == ["W_query", "out_proj"]
    with pytest.raises(ValueError, match="without its source layer"):
        models.hidden(params, tokens, cfg, frozen_blocks=2)


# --- DeepSeek sparse attention --------------------------------------------------------------------


def test_sparse_attention_reads_the_indexers_top_keys():
    """NumPy: I_ts = sum_j w_tj ReLU(q_tj . k_s); each query's 4 best visible keys (all of them
    for the first 4 queries), softmax attention over those only."""
    cfg = BASE.replace(dsa_top_k=4)
    p = gpt.init_attention(jax.random.key(3), cfg)
    n = jax.tree.map(np.asarray, p)
    x = np.random.default_rng(0).normal(size=(1, 12, 32)).astype(np.float32)
    ix = n["indexer"]
    q_index = (x[0] @ ix["W_query"]["kernel"]).reshape(12, 4, 16)
    k_index = x[0] @ ix["W_key"]["kernel"]  # (T, 16)
    scores = np.einsum("sh,sht->st", x[0] @ ix["W_weights"]["kernel"],
                       np.maximum(np.einsum("shd,td->sht", q_index, k_index), 0))  # fmt: skip
    out = np.zeros((4, 12, 8))
    heads = lambda z: z.reshape(12, 4, 8).transpose(1, 0, 2)  # noqa: E731
    q, k, v = (
        heads(x[0] @ n[w]["kernel"] + n[w].get("bias", 0)) for w in ("W_query", "W_key", "W_value")
    )
    for t in range(12):
        chosen = np.argsort(-scores[t, : t + 1])[:4]
        assert len(chosen) == min(t + 1, 4)
        logits = np.einsum("hd,hkd->hk", q[:, t], k[:, chosen]) / np.sqrt(8)  # (H, k)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, t] = np.einsum("hk,hkd->hd", weights / weights.sum(-1, keepdims=True), v[:, chosen])
    ours = out.transpose(1, 0, 2).reshape(12, 32) @ n["out_proj"]["kernel"] + n["out_proj"]["bias"]
    lib = gpt.attention(p, x, cfg, layer=0, positions=jnp.arange(12)[None])[0][0]
    np.testing.assert_allclose(lib, ours, atol=1e-5)


def test_the_indexer_learns_from_its_own_loss_only():
    """The top-k choice passes no gradient: without its loss the indexer gets none, and its loss
    reaches no other parameter (the indexer reads a detached input)."""
    cfg = VARIANTS["dsa"]
    params = models.init_params(jax.random.key(0), cfg)

    def grads(coef):
        loss = lambda p: models.forward(p, TOKENS, cfg.replace(indexer_loss_coef=coef)).std()  # noqa: E731
        return jax.grad(loss)(params)

    without, with_loss = grads(0.0), grads(1.0)
    indexer = lambda g: g["trf_blocks"]["att"].pop("indexer")  # noqa: E731
    assert all(not leaf.any() for leaf in jax.tree.leaves(indexer(without)))
    assert all(leaf.any() for leaf in jax.tree.leaves(indexer(with_loss)))
    jax.tree.map(np.testing.assert_array_equal, without, with_loss)


def test_adam_on_the_indexer_alone_lowers_its_kl_to_the_attention():
    """The indexer's loss is one it can learn: 30 Adam steps on it halve it, for fixed
    attention queries and keys."""
    cfg = BASE.replace(dsa_top_k=6)
    p = gpt.init_attention(jax.random.key(3), cfg)
    x = jax.random.normal(jax.random.key(4), (2, 24, 32))
    q, k = (split_heads(x @ p[w]["kernel"], 4) for w in ("W_query", "W_key"))
    visible = visible_keys(jnp.arange(24)[None], jnp.arange(24)[None])

    def kl(indexer):
        scores = dsa.index_scores(indexer, x, x @ indexer["W_key"]["kernel"], 4)
        return dsa.indexer_loss(q, k, scores, dsa.top_keys(scores, visible, 6))

    tx = optax.adam(1e-2)

    @jax.jit
    def step(indexer, opt):
        updates, opt = tx.update(jax.grad(kl)(indexer), opt)
        return optax.apply_updates(indexer, updates), opt

    indexer, opt = p["indexer"], tx.init(p["indexer"])
    first = kl(indexer)
    for _ in range(30):
        indexer, opt = step(indexer, opt)
    assert kl(indexer) < 0.5 * first


def test_dsa_caches_the_indexers_keys_beside_keys_and_values():
    cfg = VARIANTS["dsa"]  # 2 key/value heads of 8, an indexer key of 16, 2 layers
    cache = models.init_cache(cfg, 3, 32)
    assert cache[0].index_keys.shape == (3, 1, 32, 16)
    assert sizes.kv_bytes_per_token(cfg, 32_768) == 2 * (2 * 8 * 2 + 16) * 2
