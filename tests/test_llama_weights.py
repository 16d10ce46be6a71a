"""Llama-like weights from files the tests write in the real formats: GGUF as llama.cpp's
converter writes it (query/key rows reordered for llama, Gemma's norms plus one; quantized) and
Hugging Face safetensors folders."""

import json

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from gptflax import models
from gptflax.config import GEMMA3_TINY, LLAMA_TINY, QWEN3_TINY
from gptflax.gguf import GGUFError
from gptflax.weights import names
from gptflax.weights.gguf import load_gguf
from gptflax.weights.hf import load_hf

pytestmark = pytest.mark.labllama
CFG = LLAMA_TINY
PARAMS = jax.tree.map(np.asarray, models.init_params(jax.random.key(0), CFG))
TOKENS = np.arange(10)[None] * 7 % CFG.vocab_size


def named_tensors(params, source: int, block_names=names.LLAMA_BLOCK) -> dict:
    """The params under a format's names (`names.HF`, `names.GGUF`), (out, in) matrices."""
    out = {}

    def put(path, leaf, table, layer=None):
        keys = tuple(k.key for k in path)
        w = np.asarray(leaf)
        w = np.ascontiguousarray(w.T) if keys[-1] == "kernel" else w
        out[names.tensor_name(table, keys, source, layer)] = w

    for path, leaf in jax.tree_util.tree_flatten_with_path(
        {k: v for k, v in params.items() if k != "trf_blocks"}
    )[0]:
        put(path, leaf, names.OUTSIDE_BLOCKS)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["trf_blocks"])[0]:
        for i in range(leaf.shape[0]):
            put(path, leaf[i], block_names, i)
    return out


def llama_cpp_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a query/key matrix: within each head, row j of the
    first half and row j of the second half become neighbours."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, params, cfg, qtype: Q, arch: str = "llama") -> None:
    """A GGUF file as llama.cpp writes one: metadata for `arch`, tensors under its names."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    block_names = {"gemma3": names.GEMMA3_BLOCK, "qwen3": {**names.LLAMA_BLOCK, **names.QK_NORM}}
    block_names = block_names.get(arch, names.LLAMA_BLOCK)
    if arch != "llama":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    else:
        writer.add_vocab_size(cfg.vocab_size)
    for name, w in named_tensors(params, names.GGUF, block_names).items():
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_cpp_order(w, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp stores Gemma's 1 + scale
        if w.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms in float32
            writer.add_tensor(name, w.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_trip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a weight becomes after quantizing to qtype and back (the reference for the loader)."""
    if qtype in (Q.F32,) or w.ndim == 1:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_loads_every_weight_in_its_place(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, PARAMS, CFG, qtype)
    cfg, params = load_gguf(path)
    assert cfg == CFG
    expected = named_tensors(PARAMS, names.HF)
    got = named_tensors(params, names.HF)
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        np.testing.assert_allclose(
            got[name], round_trip(w, qtype), rtol=1e-6, atol=1e-7, err_msg=name
        )


def test_gguf_float32_file_gives_the_same_logits(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", PARAMS, CFG, Q.F32)
    cfg, params = load_gguf(tmp_path / "tiny.gguf")
    np.testing.assert_allclose(
        models.forward(params, TOKENS, cfg),
        models.forward(PARAMS, TOKENS, CFG),
        rtol=1e-5,
        atol=1e-6,
    )


def test_the_query_key_reordering_matters(tmp_path, monkeypatch):
    """Without undoing llama.cpp's row order, the logits would differ: the test above can fail."""
    from gptflax.weights import gguf as gguf_weights

    write_gguf(tmp_path / "tiny.gguf", PARAMS, CFG, Q.F32)
    config, table, _ = gguf_weights.ARCHITECTURES["llama"]
    as_stored = (config, table, lambda cfg: lambda name, w: w)
    monkeypatch.setitem(gguf_weights.ARCHITECTURES, "llama", as_stored)
    _, kept = load_gguf(tmp_path / "tiny.gguf")
    wrong = models.forward(kept, TOKENS, CFG)
    assert float(jnp.abs(wrong - models.forward(PARAMS, TOKENS, CFG)).max()) > 1e-3


def test_a_gemma3_file_loads_with_its_norms_and_windows(tmp_path):
    """A Gemma 3 GGUF (QK-norm, four norms a block stored plus one, two RoPE bases): the same
    logits; read without subtracting the one, they would differ."""
    params = jax.tree.map(np.asarray, models.init_params(jax.random.key(3), GEMMA3_TINY))
    params = jax.tree.map(lambda a: a + 0.1 if a.ndim <= 2 and a.shape[-1] in (16, 32) else a,
                          params)  # norms away from their zero start  # fmt: skip
    write_gguf(tmp_path / "g.gguf", params, GEMMA3_TINY, Q.F32, arch="gemma3")
    cfg, loaded = load_gguf(tmp_path / "g.gguf")
    assert cfg == GEMMA3_TINY  # its query_pre_attn_scalar is its head size, as llama.cpp takes it
    tokens = np.arange(20)[None] * 5 % cfg.vocab_size
    np.testing.assert_allclose(
        models.forward(loaded, tokens, cfg), models.forward(params, tokens, cfg), atol=1e-5
    )
    assert np.allclose(loaded["final_norm"]["scale"], params["final_norm"]["scale"])


def write_hf_folder(folder, params, cfg, dtype=np.float32, shards=1, rope_scaling=None):
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_scaling": rope_scaling, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.astype(dtype) for k, v in named_tensors(params, names.HF).items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: tensors[k] for k in part}, str(folder / shard))
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_hugging_face_folders_load_sharded_and_bf16(tmp_path, dtype):
    write_hf_folder(tmp_path / "m", PARAMS, CFG, dtype, shards=3)
    cfg, params = load_hf(tmp_path / "m")
    assert cfg == CFG
    expected = jax.tree.map(lambda a: np.asarray(a.astype(dtype), np.float32), PARAMS)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)


def test_hugging_face_llama3_config_and_untied_head(tmp_path):
    cfg = CFG.replace(tie_embeddings=False)
    params = jax.tree.map(np.asarray, models.init_params(jax.random.key(1), cfg))
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    write_hf_folder(tmp_path / "m", params, cfg, rope_scaling=scaling)
    loaded_cfg, loaded = load_hf(tmp_path / "m")
    assert loaded_cfg.rope_scaling.factor == 32.0 and not loaded_cfg.tie_embeddings
    np.testing.assert_array_equal(loaded["out_head"]["kernel"], params["out_head"]["kernel"])


def test_damaged_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file, though long enough")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(tmp_path / "bad.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a readable Hugging Face model folder"):
        load_hf(tmp_path / "empty")
    write_hf_folder(tmp_path / "m", PARAMS, CFG)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError, match="shape"):
        load_hf(tmp_path / "m")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_files_load_with_their_biases_or_qk_norms(tmp_path, arch):
    cfg = QWEN3_TINY.replace(qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    params = jax.tree.map(np.asarray, models.init_params(jax.random.key(4), cfg))
    params = jax.tree.map(lambda a: a + 0.01, params)  # biases and norms off their zero and one
    write_gguf(tmp_path / "q.gguf", params, cfg, Q.F32, arch=arch)
    loaded_cfg, loaded = load_gguf(tmp_path / "q.gguf")
    assert loaded_cfg == cfg
    tokens = np.arange(12)[None] * 3 % cfg.vocab_size
    np.testing.assert_allclose(
        models.forward(loaded, tokens, cfg), models.forward(params, tokens, cfg), atol=1e-5
    )
