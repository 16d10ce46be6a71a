"""Instruction fine-tuning pieces (Book ch. 7): data, collation, responses, scores, the judge."""

import http.server
import json
import socket
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import generate as G
from gptflax import instruct, models
from gptflax.losses import loss_fn
from gptflax.sources import load_tokenizer
from gptflax.tokenizer import EOT_ID, gpt2_tokenizer
from gptflax.training import fit, init_train_state, make_optimizer

pytestmark = pytest.mark.lab7


@pytest.fixture(scope="module")
def data():
    return instruct.load_instruction_data()


def test_the_book_data_and_its_unshuffled_split(data):
    assert len(data) == 1100 and all(set(e) == {"instruction", "input", "output"} for e in data)
    train, val, test = instruct.split_instruction_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train[0] is data[0] and test[0] is data[935] and val[0] is data[1045]


def test_prompt_format_with_and_without_input(data):
    with_input = instruct.format_input(data[50])
    assert with_input.startswith(instruct.INTRO + "\n\n### Instruction:\nIdentify the correct")
    assert with_input.endswith("word.\n\n### Input:\nOcassion")
    without = instruct.format_input(data[999])
    assert without.endswith("### Instruction:\nWhat is an antonym of 'complicated'?")
    assert "### Input" not in without


def test_book_toy_batch():
    inputs, targets = instruct.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    p, i = EOT_ID, -100
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, p, p, p], [7, 8, 9, p, p]]
    assert targets.tolist() == [[1, 2, 3, 4, p], [6, p, i, i, i], [8, 9, p, i, i]]


def test_bucketed_and_filled_batches_give_the_book_loss(small_cfg):
    items = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    collate = partial(instruct.custom_collate_fn, pad_token_id=96)  # in the 97-token vocabulary
    book = collate(items)
    bucketed = collate(items, pad_to_multiple=8, batch_size=5)
    assert book[0].shape == (3, 7) and bucketed[0].shape == (5, 8)
    assert (bucketed[1][3:] == -100).all()  # filler rows teach nothing
    params = models.init_params(jax.random.key(0), small_cfg)
    loss = partial(loss_fn, cfg=small_cfg)
    assert float(loss(params, *bucketed)) == pytest.approx(float(loss(params, *book)), rel=1e-6)


def test_max_length_and_prompt_masking():
    inputs, targets = instruct.custom_collate_fn([list(range(1, 11))], allowed_max_length=6)
    assert inputs.tolist() == [[1, 2, 3, 4, 5, 6]] and targets.tolist() == [[2, 3, 4, 5, 6, 7]]
    _, targets = instruct.custom_collate_fn([[1, 2, 3, 4, 5]], prompt_lengths=[3])
    assert targets.tolist() == [[-100, -100, 4, 5, EOT_ID]]  # only response tokens and the end


def test_prompt_lengths_mark_where_the_response_starts(data):
    tok = gpt2_tokenizer()
    full, prompt_lengths = instruct.encode_entries(data[:3], tok)
    for entry, ids, n in zip(data[:3], full, prompt_lengths, strict=True):
        assert tok.decode(ids[n:]) == entry["output"]
        assert tok.decode(ids[:n]).endswith("### Response:\n")


def test_training_compiles_once_per_bucket(data, tiny_cfg, compiles):
    full, _ = instruct.encode_entries(data[:96], gpt2_tokenizer())
    loader = instruct.instruction_loader(full, 8, shuffle=True, drop_last=True, pad_to_multiple=32)
    shapes = instruct.batch_shapes(loader, num_epochs=2)
    assert {t for _, t in shapes} <= {64, 96} and {b for b, _ in shapes} == {8}
    cfg = tiny_cfg.replace(context_length=96)
    state = init_train_state(models.init_params(jax.random.key(0), cfg), make_optimizer(1e-3))
    fit(state, loader, loader, cfg, make_optimizer(1e-3), num_epochs=2, key=jax.random.key(1),
        eval_freq=100, eval_iter=1)  # fmt: skip
    assert compiles("train_step") == len(shapes)  # 1-2 compilations for 24 steps
    val = instruct.instruction_loader(full[:13], 8, pad_to_multiple=32)
    assert [x.shape[0] for x, _ in val.batches(0)] == [8, 8]  # the short last batch is filled


def test_batched_responses_equal_one_by_one_decoding(data, small_cfg):
    tok = gpt2_tokenizer()
    cfg = small_cfg.replace(vocab_size=50257, context_length=128)
    params = models.init_params(jax.random.key(1), cfg)
    entries = data[:5]
    got = instruct.generate_responses(params, entries, tok, cfg, max_new_tokens=6, batch_size=2)
    for entry, completion in zip(entries, got, strict=True):
        prompt = np.array([tok.encode(instruct.format_input(entry))])
        alone = G.generate(params, prompt, 6, cfg, eos_id=EOT_ID, use_cache=False)
        new = G.trim_at_eos(alone[0, prompt.shape[1] :], EOT_ID)
        assert completion.text == tok.decode(new)


@pytest.mark.parametrize(
    "tokenizer, model_end, stops",
    [("gpt2", EOT_ID, True), ("gpt2", 2, False),
     ("smollm2", 2, True), ("smollm2", 0, False)],  # 0: SmolLM2's <|endoftext|>
)  # fmt: skip
def test_responses_end_at_the_tokenizers_end_token(data, small_cfg, tokenizer, model_end, stops):
    tok, cfg = load_tokenizer(tokenizer), small_cfg.replace(vocab_size=50257, context_length=128)
    params = models.init_params(jax.random.key(1), cfg)
    # A model that always says `model_end`: constant final features, one nonzero head column.
    params["final_norm"] = {"scale": jnp.zeros(cfg.emb_dim), "shift": jnp.ones(cfg.emb_dim)}
    head = jnp.zeros_like(params["out_head"]["kernel"]).at[:, model_end].set(1.0)
    params["out_head"] = {"kernel": head}
    got = instruct.generate_responses(params, data[:2], tok, cfg, max_new_tokens=4)
    assert (model_end == tok.eos_id) == stops
    assert all(c.finished == stops for c in got)
    assert all(c.text == ("" if stops else tok.decode([model_end] * 4)) for c in got)


def test_completion_response_and_format():
    good = instruct.Completion("\n\n### Response:\nThe capital is Paris.", finished=True)
    assert good.response == "The capital is Paris." and good.follows_format
    assert not good._replace(finished=False).follows_format  # ran out of tokens
    assert not instruct.Completion("Paris.", True).follows_format  # no header
    rambling = "\n\n### Response:\nParis.\n\n### Instruction:\nName a city."
    assert not instruct.Completion(rambling, True).follows_format
    assert not instruct.Completion("\n\n### Response:\n  ", True).follows_format


def test_token_f1():
    assert instruct.token_f1("The cat sat.", "the cat sat") == 1.0
    assert instruct.token_f1("a dog", "the cat") == 0.0
    assert instruct.token_f1("the cat sat", "the cat ran") == pytest.approx(2 / 3)
    assert instruct.token_f1("", "the cat") == 0.0


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """Streams a reply as Ollama's /api/chat does: one JSON object per line."""

    replies = iter(())
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOllama.requests.append(body)
        text = next(FakeOllama.replies)
        lines = [{"message": {"role": "assistant", "content": c}, "done": False} for c in text]
        lines.append({"done": True})
        self.send_response(200)
        self.end_headers()
        self.wfile.write("\n".join(json.dumps(line) for line in lines).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def ollama():
    server = http.server.HTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/api/chat"
    server.shutdown()


def test_the_judge_client_talks_to_ollama(ollama, data):
    FakeOllama.replies, FakeOllama.requests = iter(["8", "Score: 70", "no idea", "250"]), []
    assert instruct.query_model("hi", "llama3", url=ollama) == "8"
    assert FakeOllama.requests[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert FakeOllama.requests[0]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    entries = [{**e, "model_response": "x"} for e in data[:3]]
    scores, unreadable = instruct.generate_model_scores(entries, url=ollama)
    assert scores == [70] and unreadable == 2  # no number, and 250 is out of range
    assert data[0]["output"] in FakeOllama.requests[1]["messages"][0]["content"]


def test_no_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(instruct.JudgeUnavailable, match="ollama serve.*offline scores"):
        instruct.query_model("hi", url=f"http://127.0.0.1:{port}/api/chat", timeout=5)


def test_the_local_judge_reads_yes_or_no_from_log_probabilities():
    """Through a chat model (a tiny random one: the plumbing, not the verdicts): one probability
    of "Yes" over "No" per answer, equal to the softmax of the two replies' log-likelihoods."""
    from gptflax import evaluate, sources

    judge = sources.load_model("tiny-llama")
    entries = instruct.judge_check_entries()
    assert len(entries) == 15 and {e["label"] for e in entries} == {"right", "partly", "wrong"}
    p_yes = instruct.judge_yes_probabilities(judge, entries[:3], batch_size=2)
    assert p_yes.shape == (3,) and ((p_yes > 0) & (p_yes < 1)).all()
    question = [{"role": "user", "content": instruct.judge_question(entries[0], "Paris")}]
    yes, no = judge.tokenizer.encode("Yes"), judge.tokenizer.encode("No")
    e = evaluate.Encoded(judge.tokenizer.encode_chat(question), [yes, no])
    ll = evaluate.score_uncached(judge.params, judge.cfg, [e]).loglik[0]
    first = {**entries[0], "model_response": "Paris"}
    expected = np.exp(ll[0] - np.logaddexp(*ll))
    assert instruct.judge_yes_probabilities(judge, [first])[0] == pytest.approx(expected, abs=1e-4)
    labelled = [{"label": label} for label in ("right", "partly", "wrong", "wrong")]
    assert instruct.judge_agreement(labelled, np.array([0.9, 0.2, 0.3, 0.6])) == pytest.approx(
        2 / 3
    )
