"""Instruction fine-tuning (Book ch. 7): Alpaca-style prompts, the book's collation with -100
targets, batched KV-cached responses, and scores for them (a judge model through Ollama or any
OpenAI-compatible server, a local judge read from its yes/no log-probabilities, and measures that
need no judge).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections import Counter
from functools import partial
from typing import NamedTuple

import numpy as np

from gptflax import evaluate, files
from gptflax.config import GPTConfig
from gptflax.data import DataLoader, ragged, round_up
from gptflax.decoding import decoding_params
from gptflax.generate import generate_cached, trim_at_eos
from gptflax.losses import IGNORE_INDEX
from gptflax.tokenizer import EOT_ID

INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"

# --- data (Book §7.2) -----------------------------------------------------------------------------


def load_instruction_data(path=None) -> list[dict]:
    """The book's 1,100 entries, each with "instruction", "input" (maybe "") and "output"."""
    path = path or files.resolve("instruction-data.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def format_input(entry: dict) -> str:
    """The Alpaca-style prompt: intro, instruction, and the input when there is one (§7.2)."""
    text = f"{INTRO}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def split_instruction_data(data: list, train_frac=0.85, test_frac=0.10) -> tuple[list, list, list]:
    """The book's split, in file order (no shuffling): 85% train, 10% test, the rest validation
    -> (train, val, test); 935 / 55 / 110 entries for the book's file."""
    train_end = int(len(data) * train_frac)
    test_end = train_end + int(len(data) * test_frac)
    return data[:train_end], data[test_end:], data[train_end:test_end]


def encode_entries(entries: list[dict], tokenizer) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of prompt + response for each entry (the book's InstructionDataset), and each
    prompt's length in tokens (to mask the instruction from the loss, exercise 7.2)."""
    prompts = [tokenizer.encode(format_input(e) + RESPONSE_HEADER, bos=True) for e in entries]
    full = [
        tokenizer.encode(format_input(e) + RESPONSE_HEADER + e["output"], bos=True) for e in entries
    ]
    return full, np.array([len(p) for p in prompts], dtype=np.int32)


# --- batches (Book §7.3) --------------------------------------------------------------------------


def custom_collate_fn(
    batch,
    prompt_lengths=None,
    *,
    pad_token_id: int = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    pad_to_multiple: int = 1,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (B, T) inputs and targets, as the book collates them (§7.3).

    Each item gets one end-of-text token, which its target keeps (the model must learn to stop);
    the padding after it is pad_token_id in the inputs and ignore_index in the targets, which the
    loss skips. T is the longest item, rounded up to a multiple of pad_to_multiple and cut to
    allowed_max_length; with batch_size, missing rows are added as padding whose targets are all
    ignored. Both keep the shapes, and so the compilations, few. With prompt_lengths, the targets
    that are prompt tokens are ignored too (the book's exercise 7.2).
    """
    width = max(len(item) for item in batch)  # the book's longest item + 1, minus the shift
    width = round_up(width, pad_to_multiple)
    width = min(width, allowed_max_length or width)
    inputs = np.full((batch_size or len(batch), width), pad_token_id, dtype=np.int32)
    targets = np.full_like(inputs, ignore_index)
    for row, item in enumerate(batch):
        n = min(len(item), width)
        inputs[row, :n] = item[:n]
        targets[row, :n] = [*item[1:], pad_token_id][:n]  # shifted, ending in one end token
        if prompt_lengths is not None:
            targets[row, : prompt_lengths[row] - 1] = ignore_index
    return inputs, targets


def instruction_loader(
    encoded: list[list[int]],
    batch_size: int = 8,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 123,
    prompt_lengths: np.ndarray | None = None,
    **collate_options,
) -> DataLoader:
    """A loader of collated (B, T) inputs and targets; every batch has batch_size rows (§7.4).

    collate_options go to `custom_collate_fn` (allowed_max_length, pad_to_multiple, ...).
    """
    items = ragged(encoded)
    arrays = (items,) if prompt_lengths is None else (items, prompt_lengths)
    collate = partial(custom_collate_fn, batch_size=batch_size, **collate_options)
    return DataLoader(
        *arrays, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
        collate=collate,
    )  # fmt: skip


def batch_shapes(loader: DataLoader, num_epochs: int) -> set[tuple[int, int]]:
    """The distinct input shapes over num_epochs: how many times a jitted step compiles."""
    return {x.shape for epoch in range(num_epochs) for x, *_ in loader.batches(epoch)}


# --- responses (Book §7.7) ------------------------------------------------------------------------


class Completion(NamedTuple):
    """What the model wrote after a prompt, up to its end-of-text token if it emitted one."""

    text: str
    finished: bool

    @property
    def response(self) -> str:
        """The answer without the response header, as the book extracts it."""
        return self.text.replace("### Response:", "").strip()

    @property
    def follows_format(self) -> bool:
        """Opens with the response header, says something, stops, and starts no new section."""
        body = self.text.removeprefix(RESPONSE_HEADER)
        return self.finished and body != self.text and bool(body.strip()) and "###" not in body


def generate_responses(
    params: dict,
    entries: list[dict],
    tokenizer,
    cfg: GPTConfig,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> list[Completion]:
    """Greedy completions of each entry's prompt, batch_size prompts at a time with the KV cache,
    stopping at the tokenizer's end token (§7.7). max_new_tokens is cut to what the context
    leaves after the longest prompt. A short last batch is filled up with copies, so it compiles
    nothing new."""
    prompts = [tokenizer.encode(format_input(e), bos=True) for e in entries]
    max_new_tokens = min(max_new_tokens, cfg.context_length - max(len(p) for p in prompts))
    end, completions = tokenizer.eos_id, []
    params = decoding_params(params)  # laid out once for all the batches
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))
        new_ids = generate_cached(params, filled, max_new_tokens, cfg, eos_id=end)
        for row in new_ids[: len(chunk)]:
            kept = trim_at_eos(row, end)
            completions.append(Completion(tokenizer.decode(kept), len(kept) < len(row)))
    return completions


# --- scoring (Book §7.8) --------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(response: str, reference: str) -> float:
    """Word-overlap F1 between a response and the reference answer, 0-1 (lowercased, no
    punctuation): a rough score that needs no judge model."""
    common = sum((Counter(_words(response)) & Counter(_words(reference))).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(_words(response)), common / len(_words(reference))
    return 2 * precision * recall / (precision + recall)


OLLAMA_URL = "http://localhost:11434/api/chat"


class JudgeUnavailable(RuntimeError):
    """No judge server answered."""


def query_model(
    prompt: str,
    model: str = "llama3",
    url: str = OLLAMA_URL,
    timeout: float = 120.0,
    api_key: str | None = None,
) -> str:
    """Ask a judge model, deterministically (seed 123, temperature 0, as in the book); the reply
    text. `url` is Ollama's /api/chat (with the book's 2,048 tokens of context), or any
    OpenAI-compatible server: its /v1/chat/completions or its base ending in /v1 (`python -m
    gptflax serve`, vLLM, llama.cpp's server, Ollama's own /v1), with `api_key` if it needs one."""
    messages = [{"role": "user", "content": prompt}]
    if url.rstrip("/").endswith("/api/chat"):
        options = {"seed": 123, "temperature": 0, "num_ctx": 2048}
        reply = _post_json(url, {"model": model, "messages": messages, "options": options},
                           timeout, model, api_key)  # fmt: skip
        chunks = [json.loads(line) for line in reply.splitlines() if line.strip()]  # streamed
        return "".join(chunk["message"]["content"] for chunk in chunks if "message" in chunk)
    if not url.rstrip("/").endswith("/chat/completions"):
        url = url.rstrip("/") + "/chat/completions"
    request = {"model": model, "messages": messages, "seed": 123, "temperature": 0}
    reply = json.loads(_post_json(url, request, timeout, model, api_key))
    return reply["choices"][0]["message"]["content"]


def _post_json(url: str, request: dict, timeout: float, model: str, api_key: str | None) -> str:
    """POST a JSON request to a judge server: the reply's text."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    post = urllib.request.Request(url, data=json.dumps(request).encode(), headers=headers)
    try:
        with urllib.request.urlopen(post, timeout=timeout) as reply:
            return reply.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise JudgeUnavailable(f"the judge at {url} refused the request: {e}") from e
    except (urllib.error.URLError, OSError) as e:
        raise JudgeUnavailable(
            f"no judge server at {url} ({e}). Install Ollama (https://ollama.com), run `ollama "
            f"serve` and `ollama pull {model}`, or start an OpenAI-compatible server (`python -m "
            "gptflax serve --model NAME`, url=http://127.0.0.1:8000/v1), then score again; the "
            "offline scores (held-out loss, token_f1) need no server."
        ) from e


def judge_prompt(entry: dict, response: str) -> str:
    """Ask for a 0-100 score of the response, given the prompt and the reference answer."""
    return (
        f"Here is a task: `{format_input(entry)}`\n"
        f"The reference answer is `{entry['output']}`.\n"
        f"Rate this answer from 0 (worst) to 100 (best): `{response}`.\n"
        "Reply with the number only."
    )


def generate_model_scores(
    entries: list[dict], json_key: str = "model_response", model: str = "llama3", **query
) -> tuple[list[int], int]:
    """Judge's 0-100 scores of entry[json_key] for each entry, and how many replies had no
    number in range (those are left out of the scores), as in Book §7.8."""
    scores, unreadable = [], 0
    for entry in entries:
        reply = query_model(judge_prompt(entry, entry[json_key]), model, **query)
        number = re.search(r"\d+", reply)
        if number is not None and 0 <= int(number.group()) <= 100:
            scores.append(int(number.group()))
        else:
            unreadable += 1
    return scores, unreadable


# --- a local judge: yes or no, read from log-probabilities ----------------------------------------


def judge_question(entry: dict, response: str) -> str:
    """Ask whether the response answers the task as the reference answer does: yes or no."""
    return (
        f"Here is a task: `{format_input(entry)}`\n"
        f"The reference answer is `{entry['output']}`.\n"
        f"Is this answer correct and complete: `{response}`?\n"
        "Reply with yes or no."
    )


def judge_yes_probabilities(
    judge, entries: list[dict], json_key: str = "model_response", batch_size: int = 8
) -> np.ndarray:
    """A local judge (`sources.Model`, a chat model): for each entry, the probability that it
    replies "Yes" rather than "No" to `judge_question` about entry[json_key], from its
    log-probabilities of the two replies (`evaluate.score`), not from a number it writes. (N,)"""
    tokenizer = judge.tokenizer
    replies = [tokenizer.encode("Yes"), tokenizer.encode("No")]
    questions = [[{"role": "user", "content": judge_question(e, e[json_key])}] for e in entries]
    encoded = [evaluate.Encoded(tokenizer.encode_chat(q), replies) for q in questions]
    scores = evaluate.score(judge.params, judge.cfg, encoded, batch_size=batch_size)
    loglik = np.stack(scores.loglik)  # (N, 2)
    return np.exp(loglik[:, 0] - np.logaddexp(loglik[:, 0], loglik[:, 1]))


# A judge's check: answers labelled by hand as right, partly right and wrong.
JUDGE_CHECKS = [
    ("What is the capital of France?", "", "The capital of France is Paris.",
     {"right": "Paris is the capital of France.", "partly": "Paris, in Germany.",
      "wrong": "The capital of France is Berlin."}),
    ("Convert 5 kilometers to meters.", "", "5 kilometers is 5000 meters.",
     {"right": "5000 meters.", "partly": "5 kilometers is 5000 meters, or 50 kilometers.",
      "wrong": "5 kilometers is 500 meters."}),
    ("Provide the plural form of the word.", "mouse", "The plural form of 'mouse' is 'mice'.",
     {"right": "mice", "partly": "mouses or mice", "wrong": "The plural of mouse is mouses."}),
    ("Rewrite the sentence in passive voice.", "The cat chased the mouse.",
     "The mouse was chased by the cat.",
     {"right": "The mouse was chased by the cat.", "partly": "The mouse was chased.",
      "wrong": "The cat was chasing the mouse."}),
    ("What is 12 multiplied by 3?", "", "12 multiplied by 3 is 36.",
     {"right": "36", "partly": "It is 36, since 12 + 3 = 36.",
      "wrong": "12 multiplied by 3 is 15."}),
]  # fmt: skip


def judge_check_entries() -> list[dict]:
    """JUDGE_CHECKS as entries with a "model_response" and its "label" (right, partly, wrong)."""
    return [
        {"instruction": instruction, "input": inp, "output": output, "model_response": answer,
         "label": label}
        for instruction, inp, output, answers in JUDGE_CHECKS
        for label, answer in answers.items()
    ]  # fmt: skip


def judge_agreement(entries: list[dict], p_yes: np.ndarray) -> float:
    """The share of the answers labelled right or wrong that the judge calls so (yes above 0.5
    for right, below for wrong); partly right ones have no single correct verdict."""
    calls = [(e["label"] == "right") == (p > 0.5) for e, p in zip(entries, p_yes, strict=True)
             if e["label"] != "partly"]  # fmt: skip
    return float(np.mean(calls))
