"""The PyTorch baselines: the book's GPTModel, Llama3Model and Qwen3Model (bonus chapters) with our
weights, a KV-cached decoder for the GPT, the book's own KV-cached Llama and its batched KV-cached
Qwen3 (kv_cache_batched).

They need `make setup-torch` (torch and the book's llms-from-scratch package); without it `torch`
is None and the benchmarks leave the PyTorch rows out."""

from __future__ import annotations

import copy
import dataclasses
import types
from functools import partial

import jax

from gptflax import models
from gptflax.config import LlamaConfig, QwenConfig
from gptflax.weights.gpt2 import from_book_state_dict
from gptflax.weights.hf import from_book_llama_state_dict

try:
    import torch
    from llms_from_scratch import ch04 as book
    from llms_from_scratch import llama3 as book_llama
    from llms_from_scratch.kv_cache import generate as book_kv_generate
    from llms_from_scratch.kv_cache import llama3 as book_kv_llama
    from llms_from_scratch.kv_cache_batched import generate as book_batched_generate
    from llms_from_scratch.kv_cache_batched import qwen3 as book_qwen3
except ImportError:  # the PyTorch comparison is optional
    torch = book = book_llama = book_kv_generate = book_kv_llama = None
    book_batched_generate = book_qwen3 = None


def book_llama_config(cfg: LlamaConfig) -> dict:
    """The book's Llama3Model config dict for ours (float32; its RMSNorm eps is fixed at 1e-5)."""
    assert cfg.rms_eps == 1e-5 and cfg.rope_scaling is None, "the book's model can't run this"
    return {
        "vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
        "emb_dim": cfg.emb_dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "hidden_dim": cfg.hidden_dim, "n_kv_groups": cfg.n_kv_heads, "rope_base": cfg.rope_base,
        "rope_freq": None, "dtype": torch.float32,
    }  # fmt: skip


def book_llama_model(cfg: LlamaConfig, module=None):
    """The book's Llama3Model (`module`: llama3, or kv_cache.llama3 for the cached one), its
    output head tied to the token embedding when the config ties them."""
    m = (module or book_llama).Llama3Model(book_llama_config(cfg))
    if cfg.tie_embeddings:
        m.out_head.weight = m.tok_emb.weight
    return m


def book_qwen3_model(cfg: QwenConfig):
    """The book's batched KV-cache Qwen3Model (float32; its norms' eps is fixed at 1e-6), its
    output head tied to the token embedding when the config ties them."""
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.rms_eps == 1e-6, "not a Qwen3 the book runs"
    m = book_qwen3.Qwen3Model({
        "vocab_size": cfg.vocab_size, "context_length": cfg.context_length,
        "emb_dim": cfg.emb_dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "hidden_dim": cfg.hidden_dim, "head_dim": cfg.head_dim, "qk_norm": True,
        "n_kv_groups": cfg.n_kv_heads, "rope_base": cfg.rope_base, "dtype": torch.float32,
    })  # fmt: skip
    if cfg.tie_embeddings:
        m.out_head.weight = m.tok_emb.weight
    return m


def starting_models(cfg, with_torch: bool = True):
    """(the book's PyTorch GPTModel, Llama3Model or Qwen3Model, or None; our params with the same
    weights)."""
    if torch is None or not with_torch:
        return None, models.init_params(jax.random.key(0), cfg)
    torch.manual_seed(123)
    if isinstance(cfg, QwenConfig):
        book_model, convert = book_qwen3_model(cfg), from_book_llama_state_dict
    elif isinstance(cfg, LlamaConfig):
        book_model, convert = book_llama_model(cfg), from_book_llama_state_dict
    else:
        book_model, convert = book.GPTModel(dataclasses.asdict(cfg)), from_book_state_dict
    state = {k: v.detach().numpy() for k, v in book_model.state_dict().items()}
    return book_model, convert(state, cfg)


def with_sdpa(m):
    """A copy of the book's GPTModel whose attention runs torch's fused
    F.scaled_dot_product_attention (scores, causal mask, softmax and dropout in one call): what a
    PyTorch user would pick."""
    m = copy.deepcopy(m)

    def forward(att, x):  # (B, T, D) -> (B, T, D), as the book's MultiHeadAttention.forward
        b, t, _ = x.shape
        q, k, v = (
            w(x).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)
            for w in (att.W_query, att.W_key, att.W_value)
        )  # (B, H, T, Dh) each
        drop = att.dropout.p if att.training else 0.0
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=drop, is_causal=True
        )
        return att.out_proj(context.transpose(1, 2).reshape(b, t, -1))

    for blk in m.trf_blocks:
        blk.att.forward = types.MethodType(forward, blk.att)
    return m


def torch_train_step(m, x, y):
    """A callable running one AdamW step of the book's model on the batch (x, y) (numpy)."""
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=4e-4, weight_decay=0.1)
    tx, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()

    def step():
        opt.zero_grad()
        logits = m(tx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ty.flatten()).backward()
        opt.step()

    return step


def torch_kv_generate(m, idx, new_tokens: int):
    """Greedy decoding with a KV cache, in PyTorch, over the layers of the book's GPTModel: the
    baseline for ours. (llms-from-scratch 1.0.19's kv_cache.gpt2 fails on one-token steps: its
    causal mask slices the wrong axis.)"""
    caches = [None] * len(m.trf_blocks)

    def run(tokens, start):
        x = m.tok_emb(tokens) + m.pos_emb(torch.arange(start, start + tokens.shape[1]))
        for i, blk in enumerate(m.trf_blocks):
            att, h = blk.att, blk.norm1(x)
            b, t, _ = h.shape
            q, k, v = (
                w(h).view(b, t, att.num_heads, att.head_dim).transpose(1, 2)
                for w in (att.W_query, att.W_key, att.W_value)
            )
            if caches[i] is not None:
                k, v = torch.cat([caches[i][0], k], 2), torch.cat([caches[i][1], v], 2)
            caches[i] = (k, v)
            context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            x = x + att.out_proj(context.transpose(1, 2).reshape(b, t, -1))
            x = x + blk.ff(blk.norm2(x))
        return m.out_head(m.final_norm(x[:, -1]))

    logits, start = run(idx, 0), idx.shape[1]
    for i in range(new_tokens):
        next_idx = logits.argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_idx], dim=1)
        logits = run(next_idx, start + i)
    return idx


def torch_generators(m, prompt, new_tokens: int, cfg) -> dict:
    """The book's naive generate_text_simple loop and a KV-cached decoder (for a Llama3Model the
    book's own, kv_cache.llama3 with its generate_text_simple; for a Qwen3Model the batched one,
    kv_cache_batched), as callables."""
    m.eval()
    tp = torch.from_numpy(prompt).long()
    if isinstance(cfg, QwenConfig):
        kv_decode = partial(book_batched_generate.generate_text_simple, m, tp, new_tokens)
    elif isinstance(cfg, LlamaConfig):
        cached = book_llama_model(cfg, book_kv_llama)
        cached.load_state_dict(m.state_dict())
        cached.eval()
        kv_decode = partial(book_kv_generate.generate_text_simple, cached, tp, new_tokens)
    else:
        kv_decode = partial(torch_kv_generate, m, tp, new_tokens)

    def naive():
        with torch.no_grad():
            book.generate_text_simple(m, tp, new_tokens, cfg.context_length)

    def kv_cached():
        with torch.no_grad():
            kv_decode()

    return {"book PyTorch, naive loop": naive, "book PyTorch, KV cache": kv_cached}
