"""The tensor names of the Llama-like families in each file format, and params built from them.

A table maps a layer's path in gptflax params (e.g. "att/W_query" inside block i) to its name in
Hugging Face's files, llama.cpp's GGUF files and the book's PyTorch models; the `source`
arguments index these tuples. A layer's tensors are `<name>.weight` (a linear's (out, in) matrix,
transposed into the kernel; a norm's scale; an embedding) and `<name>.bias`. Which tensors to read,
and their shapes, come from the family's own params (`jax.eval_shape` of `init_params`): a new
family or option needs only its names here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptflax.models import init_params

HF, GGUF, BOOK = 0, 1, 2
BLOCK_PREFIX = ("model.layers.{i}.", "blk.{i}.", "trf_blocks.{i}.")  # before each name in block i

LLAMA_BLOCK = {
    "att/W_query": ("self_attn.q_proj", "attn_q", "att.W_query"),
    "att/W_key": ("self_attn.k_proj", "attn_k", "att.W_key"),
    "att/W_value": ("self_attn.v_proj", "attn_v", "att.W_value"),
    "att/out_proj": ("self_attn.o_proj", "attn_output", "att.out_proj"),
    "ff/fc1": ("mlp.gate_proj", "ffn_gate", "ff.fc1"),
    "ff/fc2": ("mlp.up_proj", "ffn_up", "ff.fc2"),
    "ff/fc3": ("mlp.down_proj", "ffn_down", "ff.fc3"),
    "norm1": ("input_layernorm", "attn_norm", "norm1"),
    "norm2": ("post_attention_layernorm", "ffn_norm", "norm2"),
}
QK_NORM = {
    "att/q_norm": ("self_attn.q_norm", "attn_q_norm", "att.q_norm"),
    "att/k_norm": ("self_attn.k_norm", "attn_k_norm", "att.k_norm"),
}
# Gemma 3's four norms: Hugging Face's post_attention_layernorm is the norm *after* attention
# here, where Llama's is the one before the feed-forward.
GEMMA3_BLOCK = {
    **LLAMA_BLOCK,
    **QK_NORM,
    "post_att_norm": ("post_attention_layernorm", "post_attention_norm", "post_att_norm"),
    "norm2": ("pre_feedforward_layernorm", "ffn_norm", "norm2"),
    "post_ff_norm": ("post_feedforward_layernorm", "post_ffw_norm", "post_ff_norm"),
}
OUTSIDE_BLOCKS = {
    "tok_emb": ("model.embed_tokens", "token_embd", "tok_emb"),
    "final_norm": ("model.norm", "output_norm", "final_norm"),
    "out_head": ("lm_head", "output", "out_head"),
}
SUFFIX = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def tensor_name(table: dict, path: tuple[str, ...], source: int, layer: int | None = None) -> str:
    """The source's name of the tensor at a params path (inside block `layer`, if given)."""
    *module, leaf = path
    name = table["/".join(module)][source]
    prefix = "" if layer is None else BLOCK_PREFIX[source].format(i=layer)
    return f"{prefix}{name}.{SUFFIX[leaf]}"


def params_from_tensors(get, cfg, source: int, block_names: dict, dtype=np.float32) -> dict:
    """Params of `cfg` from named tensors: `get(name, shape)` returns the array under the source's
    name, (out, in) for a linear layer (transposed here into the (in, out) kernel)."""
    like = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    blocks = like.pop("trf_blocks")
    dtype = jnp.dtype(dtype)  # each tensor is cast as it is read: a bf16 load never holds fp32

    def read(path, shape: tuple, table: dict, layer: int | None = None) -> np.ndarray:
        keys = tuple(k.key for k in path)
        name = tensor_name(table, keys, source, layer)
        value = get(name, shape[::-1]).T if keys[-1] == "kernel" else get(name, shape)
        return np.asarray(value, dtype)

    # Each leaf becomes a jax array as soon as it is read, so that no second copy of the whole
    # model is ever held (Qwen2.5-Coder-1.5B's load peaked at 17.3 GB for 6.2 GB of weights).
    def stacked(path, leaf) -> jax.Array:  # (n_layers, ...)
        layers = [read(path, leaf.shape[1:], block_names, i) for i in range(cfg.n_layers)]
        return jnp.asarray(np.stack(layers))

    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(read(path, leaf.shape, OUTSIDE_BLOCKS)), like
    )
    params["trf_blocks"] = jax.tree_util.tree_map_with_path(stacked, blocks)
    return params
