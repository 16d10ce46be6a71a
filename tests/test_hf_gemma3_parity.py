"""gptflax's Gemma 3 against Hugging Face transformers reading the same GGUF file: logits, greedy
continuations, token ids, and the KV-cached decoder past the sliding window.

Optional: needs `make setup-torch` (torch, transformers); skipped without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import files, models, sources
from gptflax.generate import generate

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make setup-torch)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

pytestmark = [
    pytest.mark.torch, pytest.mark.labgemma3, pytest.mark.slow,
    pytest.mark.big_models,  # `make test` runs these one at a time, after the rest
]  # fmt: skip
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Die Hauptstadt von Deutschland ist"]
TEXTS = [
    "Héllo wörld! Ça va? 日本語のテキストです。Привет, как дела? Γειά σου κόσμε.",
    "العربية हिन्दी 한국어 ไทย Tiếng Việt עברית",
    "def f(x):\n    return x**2  # 12345 + 678 = 13023\n\ttabs  and   spaces",
    "emoji 😀🎉 and symbols ∑∫√ ™ © “quotes” — dashes…",
    "<start_of_turn>user\nhi<end_of_turn>\n<eos> in text",
]


@pytest.fixture(scope="module")
def reference():
    path = files.resolve(files.GEMMA3_GGUF)
    kwargs = {"gguf_file": path.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=torch.float32, **kwargs
    )
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)


@pytest.fixture(scope="module")
def gemma():
    return sources.load_model("gemma3-270m")


def test_logits_and_greedy_tokens_equal_transformers(reference, gemma):
    hf, hf_tok = reference
    for prompt in PROMPTS:
        ids = gemma.tokenizer.encode(prompt, bos=True)
        assert ids == hf_tok(prompt)["input_ids"]
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits.numpy()
            hf_greedy = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        ours = np.asarray(models.forward(gemma.params, jnp.asarray([ids]), gemma.cfg))
        assert np.abs(ours - expected).max() < 1e-3 * np.abs(expected).max()
        np.testing.assert_array_equal(generate(gemma.params, [ids], 16, gemma.cfg), hf_greedy)


def test_token_ids_equal_transformers_on_many_scripts(reference, gemma):
    hf_tok = reference[1]
    for text in TEXTS:
        ids = gemma.tokenizer.encode(text, allowed_special="all")
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert gemma.tokenizer.decode(ids) == text


def test_past_the_window_the_cache_gives_the_full_forward_and_transformers(reference, gemma):
    """600 positions: the sliding layers' rings (512 slots) have wrapped around."""
    cfg, params = gemma.cfg, gemma.params
    ids = gemma.tokenizer.encode(" ".join(TEXTS * 8), bos=True)[:600]
    assert len(ids) == 600 > cfg.sliding_window
    full = np.asarray(jax.jit(models.forward)(params, jnp.asarray([ids]), cfg))[0]  # (600, V)
    with torch.no_grad():
        expected = reference[0](torch.tensor([ids])).logits.numpy()[0]
    assert np.abs(full - expected).max() < 1e-3 * np.abs(expected).max()
    cache = models.init_cache(cfg, 1, 1024)
    positions = jnp.arange(600)[None]

    @jax.jit
    def step(params, cache, tokens, positions):  # -> (the last position's logits, the cache)
        h, cache = models.hidden_cached(params, tokens, cache, positions, cfg)
        return models.head(params, h[0, -1]), cache

    first, cache = step(params, cache, jnp.asarray([ids[:590]]), positions[:, :590])
    logits = [first]
    for t in range(590, 599):
        last, cache = step(params, cache, jnp.asarray([ids[t : t + 1]]), positions[:, t : t + 1])
        logits.append(last)
    np.testing.assert_allclose(np.stack(logits), full[589:599], atol=1e-4 * np.abs(full).max())
