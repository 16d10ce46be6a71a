"""The PyTorch baselines: the book's GPTModel with our weights, and a KV-cached decoder for it.

They need `make setup-torch` (torch and the book's llms-from-scratch package); without it `torch`
is None and the benchmarks leave the PyTorch rows out."""

from __future__ import annotations

import dataclasses

import jax

from gptflax import gpt
from gptflax.config import GPTConfig
from gptflax.weights import from_book_state_dict

try:
    import torch
    from llms_from_scratch import ch04 as book
except ImportError:  # the PyTorch comparison is optional
    torch = book = None


def starting_models(cfg: GPTConfig, with_torch: bool = True):
    """(the book's PyTorch GPTModel or None, our params with the same weights)."""
    if torch is None or not with_torch:
        return None, gpt.init_params(jax.random.key(0), cfg)
    torch.manual_seed(123)
    book_model = book.GPTModel(dataclasses.asdict(cfg))
    state = {k: v.detach().numpy() for k, v in book_model.state_dict().items()}
    return book_model, from_book_state_dict(state, cfg)


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


def torch_generators(m, prompt, new_tokens: int) -> dict:
    """The book's naive generate_text_simple loop and the KV-cached decoder, as callables."""
    m.eval()
    tp = torch.from_numpy(prompt).long()
    context = m.pos_emb.weight.shape[0]

    def naive():
        with torch.no_grad():
            book.generate_text_simple(m, tp, new_tokens, context)

    def kv_cached():
        with torch.no_grad():
            torch_kv_generate(m, tp, new_tokens)

    return {"book PyTorch, naive loop": naive, "book PyTorch, KV cache": kv_cached}
