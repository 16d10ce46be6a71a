"""gptflax's Llama against Hugging Face transformers, code we did not write: the same GGUF file read
by both, a random Llama 3 model saved by transformers, and the tokenizers library's BPE.

Optional: needs `make setup-torch` (torch, transformers, accelerate); skipped without it.
"""

import random

import numpy as np
import pytest

from gptflax import files, models, sources
from gptflax.generate import generate
from gptflax.weights.hf import load_hf

torch = pytest.importorskip("torch", reason="the torch extra is not installed (make setup-torch)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

pytestmark = [pytest.mark.torch, pytest.mark.labllama, pytest.mark.slow, pytest.mark.big_models]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hf_smollm2():
    path = files.resolve(files.SMOLLM2_GGUF)
    kwargs = {"gguf_file": path.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=torch.float32, **kwargs
    )
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)


def test_logits_and_greedy_tokens_equal_transformers_from_the_same_gguf(hf_smollm2, smollm2):
    model, hf_tok = hf_smollm2
    cfg, params = smollm2
    ids = hf_tok(PROMPT)["input_ids"]
    assert ids == sources.load_tokenizer("smollm2").encode(PROMPT)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits.numpy()
        hf_greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    ours = np.asarray(models.forward(params, np.array([ids]), cfg))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-3)  # logits reach ~27
    np.testing.assert_array_equal(generate(params, [ids], 12, cfg), hf_greedy.numpy())


def test_tokenizer_equals_the_tokenizers_library_with_smollm2s_pre_tokenizer(hf_smollm2):
    """transformers' GGUF conversion leaves out SmolLM2's digit splitting (its tokenizer.json and
    llama.cpp's 'smollm' pre-tokenizer have it), so the reference gets it back first."""
    from tokenizers import pre_tokenizers

    reference = hf_smollm2[1].backend_tokenizer
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    ours = sources.load_tokenizer("smollm2")
    pieces = list(
        "abXY 0123456789\n\t\r.,'!?-_()[]{}<>\"éüß日本語한국어Здравствуй🤖👍🏽\u200d\u00a0"
    )
    pieces += ["'s", "'ll", "  ", "\n\n", "def ", "return ", "<|im_end|>", "<|im_start|>"]
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert ours.encode(text, allowed_special="all") == reference.encode(text).ids, repr(text)


def test_a_llama3_model_saved_by_transformers_loads_with_the_same_logits(tmp_path):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500_000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_hf(tmp_path)
    assert cfg.rope_scaling.original_context_length == 16 and not cfg.tie_embeddings
    tokens = np.arange(40)[None] * 7 % 300
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(models.forward(params, tokens, cfg), expected, rtol=1e-4, atol=1e-5)
