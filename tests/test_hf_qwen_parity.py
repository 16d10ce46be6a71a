"""gptflax's Qwen family against Hugging Face transformers, code we did not write: Qwen2.5-Coder's
GGUF file read by both, a random Qwen3 saved by transformers in bf16 shards (Qwen3's weights are on
no machine here), the tokenizers built from GGUF metadata against Qwen3's tokenizer.json, and the
chat templates against the Jinja templates that ship with the models.

Optional: needs `make setup-torch` (torch, transformers); skipped without it.
"""

import gc
import random
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import chat, files, models, sources
from gptflax.generate import generate
from gptflax.weights.hf import load_hf

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make setup-torch)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

pytestmark = [
    pytest.mark.torch, pytest.mark.labqwen, pytest.mark.slow,
    pytest.mark.big_models,  # `make test` runs these one at a time, after the rest
]  # fmt: skip
THINK, END_THINK = 151_667, 151_668  # Qwen3's <think> and </think>
PROMPTS = [
    chat.QWEN2_5.render([{"role": "user", "content": "Write a Python function that adds 2."}]),
    "# 北京是中国的首都\ndef fibonacci(n):\n    ",
]
PIECES = list("abXYZ 0123456789\n\t\r.,'!?-_()[]{}<>\"=+*/#:;éüßñ日本語中文한국어Здравствуй🤖👍🏽")
PIECES += ["'s", "'ll", "  ", "    ", "\n\n", "\u00a0", "def ", "return ", "import numpy as np",
           "self.", "<|im_end|>", "<|im_start|>", "<think>", "</think>", "1.5e-3"]  # fmt: skip


def from_the_gguf(auto_class, **kwargs):
    """transformers' model or tokenizer of Qwen2.5-Coder-0.5B's GGUF file."""
    path = files.resolve(files.QWEN_0_5B_GGUF)
    return auto_class.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)


@pytest.fixture(scope="module")
def hf_tok():
    return from_the_gguf(transformers.AutoTokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    return sources.load_tokenizer("qwen2.5-coder-0.5b")


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_logits_and_greedy_tokens_equal_transformers_from_the_same_gguf(hf_tok):
    """transformers' answers first, its model let go before ours loads: the two at once (fp32,
    2.4 GB each, and transformers' dequantizing) took a test worker past 11 GB."""
    hf = from_the_gguf(transformers.AutoModelForCausalLM, dtype=torch.float32).eval()
    expected = {}
    for prompt in PROMPTS:
        ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits.numpy()
            greedy = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False).numpy()
        expected[prompt] = ids, logits, greedy
    del hf
    gc.collect()
    coder = sources.load_model("qwen2.5-coder-0.5b-instruct")
    for prompt, (hf_ids, hf_logits, hf_greedy) in expected.items():
        ids = coder.tokenizer.encode(prompt, allowed_special="all")
        assert ids == hf_ids, prompt
        ours = np.asarray(models.forward(coder.params, jnp.asarray([ids]), coder.cfg))
        assert np.abs(ours - hf_logits).max() < 1e-3 * np.abs(hf_logits).max(), prompt
        np.testing.assert_array_equal(generate(coder.params, [ids], 16, coder.cfg), hf_greedy)


def test_the_gguf_tokenizer_equals_transformers_and_qwen3s_tokenizer_json(hf_tok, tokenizer):
    """Qwen2.5 and Qwen3 share one byte-level BPE (151,643 regular tokens); our tokenizer built
    from the GGUF's merges must cut every text as both references do."""
    from tokenizers import Tokenizer

    qwen3_json = Tokenizer.from_file(str(files.resolve(files.QWEN3_TOKENIZER)))
    for text in texts(1500):
        ids = tokenizer.encode(text, allowed_special="all")
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], repr(text)
        if "<" not in text:  # the special tokens differ between the two models' lists
            assert ids == qwen3_json.encode(text, add_special_tokens=False).ids, repr(text)
        assert tokenizer.decode(ids) == text


def test_qwen2_5s_chat_template_equals_the_ggufs_jinja_template(hf_tok, tokenizer):
    conversation = [
        {"role": "user", "content": "Write is_even(n)."},
        {"role": "assistant", "content": "def is_even(n):\n    return n % 2 == 0"},
        {"role": "user", "content": "Explain it."},
    ]
    for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.chat.render(messages) == expected


@pytest.fixture(scope="module")
def qwen3_tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    for file in (files.QWEN3_TOKENIZER, files.QWEN3_TOKENIZER_CONFIG):
        shutil.copy(files.resolve(file), folder)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3s_chat_template_equals_its_jinja_template_with_thoughts(
    qwen3_tokenizer_folder, thinking
):
    hf_tok = qwen3_tokenizer_folder
    ours = sources.load_tokenizer("qwen3")
    first = [{"role": "system", "content": "Answer in one line."},
             {"role": "user", "content": "2 + 2?"}]  # fmt: skip
    replied = first + [{"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"}]
    asked_again = replied + [{"role": "user", "content": "And 3 + 3?"}]
    answered = asked_again + [{"role": "assistant", "content": "<think>\nSix.\n</think>\n\n6"}]
    for messages, prompt in ((first, True), (asked_again, True), (replied, False),
                             (answered, False)):  # fmt: skip
        expected = hf_tok.apply_chat_template(messages, tokenize=False, enable_thinking=thinking,
                                              add_generation_prompt=prompt)  # fmt: skip
        text = ours.chat.render(messages, add_generation_prompt=prompt, thinking=thinking)
        assert text == expected, messages
        ids = ours.encode(text, allowed_special="all")
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert (THINK in ids) == ("<think>" in expected) == (END_THINK in ids)


def test_a_random_qwen3_saved_by_transformers_in_bf16_shards_loads_and_decodes_the_same(tmp_path):
    hf_cfg = transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        rope_theta=1_000_000.0, tie_word_embeddings=True, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()  # really sharded
    cfg, params = load_hf(tmp_path)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 32 and cfg.tie_embeddings
    # the reference reads the same files in fp32 (`model.float()` would keep RoPE's frequencies
    # rounded to bf16, up to 0.04 off in these logits)
    model = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = np.arange(48)[None] * 13 % 320
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
        greedy = {cache: model.generate(torch.tensor(tokens[:, :8]), max_new_tokens=24,
                                        do_sample=False, use_cache=cache).numpy()
                  for cache in (False, True)}  # fmt: skip
    ours = np.asarray(models.forward(params, jnp.asarray(tokens), cfg))
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()
    np.testing.assert_array_equal(greedy[True], greedy[False])
    np.testing.assert_array_equal(generate(params, tokens[:, :8], 24, cfg), greedy[True])
