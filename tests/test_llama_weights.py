"""Llama weights from files the tests write in the real formats: GGUF as llama.cpp's converter
writes it (query/key rows reordered, quantized) and Hugging Face safetensors folders."""

import json

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from gptflax import llama, weights
from gptflax.config import LLAMA_TINY

pytestmark = pytest.mark.labllama
CFG = LLAMA_TINY
PARAMS = jax.tree.map(np.asarray, llama.init_params(jax.random.key(0), CFG))
TOKENS = np.arange(10)[None] * 7 % CFG.vocab_size


def hf_tensors(params, cfg) -> dict:
    """The params under Hugging Face's names, (out, in) matrices."""
    out = {
        "model.embed_tokens.weight": params["tok_emb"]["embedding"],
        "model.norm.weight": params["final_norm"]["scale"],
    }
    if "out_head" in params:
        out["lm_head.weight"] = np.ascontiguousarray(params["out_head"]["kernel"].T)
    for i in range(cfg.n_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], params["trf_blocks"])
        for (group, name), (hf_name, *_) in weights.LLAMA_BLOCK_NAMES.items():
            w = layer[group][name]
            out[hf_name.format(i=i)] = w if name == "scale" else np.ascontiguousarray(w["kernel"].T)
    return out


def llama_cpp_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a query/key matrix: within each head, row j of the
    first half and row j of the second half become neighbours."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, params, cfg, qtype: Q) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(cfg.vocab_size)
    hf_to_cpp = {hf.format(i=i): cpp.format(i=i)
                 for (hf, cpp, _) in weights.LLAMA_BLOCK_NAMES.values()
                 for i in range(cfg.n_layers)}  # fmt: skip
    hf_to_cpp |= {hf: cpp for hf, cpp, _ in weights.LLAMA_NAMES.values()}
    for hf_name, w in hf_tensors(params, cfg).items():
        name = hf_to_cpp[hf_name]
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
            w = llama_cpp_order(w, heads)
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
    cfg, params = weights.load_gguf(path)
    assert cfg == CFG
    expected = hf_tensors(PARAMS, CFG)
    got = hf_tensors(jax.tree.map(np.asarray, params), cfg)
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        np.testing.assert_allclose(
            got[name], round_trip(w, qtype), rtol=1e-6, atol=1e-7, err_msg=name
        )


def test_gguf_float32_file_gives_the_same_logits(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", PARAMS, CFG, Q.F32)
    cfg, params = weights.load_gguf(tmp_path / "tiny.gguf")
    np.testing.assert_allclose(
        llama.forward(params, TOKENS, cfg), llama.forward(PARAMS, TOKENS, CFG), rtol=1e-5, atol=1e-6
    )


def test_the_query_key_reordering_matters(tmp_path):
    """Without undoing llama.cpp's row order, the logits would differ: the test above can fail."""
    write_gguf(tmp_path / "tiny.gguf", PARAMS, CFG, Q.F32)
    _, tensors = weights.read_gguf(tmp_path / "tiny.gguf")
    kept = weights.from_llama_tensors(
        weights._getter(tensors, "t", "a Llama"), CFG, source=weights.GGUF
    )
    wrong = llama.forward(kept, TOKENS, CFG)
    assert float(jnp.abs(wrong - llama.forward(PARAMS, TOKENS, CFG)).max()) > 1e-3


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
    tensors = {k: v.astype(dtype) for k, v in hf_tensors(params, cfg).items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, str(folder / shard))
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_hugging_face_folders_load_sharded_and_bf16(tmp_path, dtype):
    write_hf_folder(tmp_path / "m", PARAMS, CFG, dtype, shards=3)
    cfg, params = weights.load_hf_llama(tmp_path / "m")
    assert cfg == CFG
    expected = jax.tree.map(lambda a: np.asarray(a.astype(dtype), np.float32), PARAMS)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)


def test_hugging_face_llama3_config_and_untied_head(tmp_path):
    cfg = CFG.replace(tie_embeddings=False)
    params = jax.tree.map(np.asarray, llama.init_params(jax.random.key(1), cfg))
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    write_hf_folder(tmp_path / "m", params, cfg, rope_scaling=scaling)
    loaded_cfg, loaded = weights.load_hf_llama(tmp_path / "m")
    assert loaded_cfg.rope_scaling.factor == 32.0 and not loaded_cfg.tie_embeddings
    np.testing.assert_array_equal(loaded["out_head"]["kernel"], params["out_head"]["kernel"])


def test_damaged_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        weights.load_gguf(tmp_path / "bad.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a readable Hugging Face Llama folder"):
        weights.load_hf_llama(tmp_path / "empty")
    write_hf_folder(tmp_path / "m", PARAMS, CFG)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError, match="shape"):
        weights.load_hf_llama(tmp_path / "m")
