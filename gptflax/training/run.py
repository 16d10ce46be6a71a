"""A pretraining run: its settings as one frozen, validated record (`Run`), and the two functions
that assemble it and continue it:

    run = Run(data="my_text.txt", model="124M", epochs=10)  # the book's settings by default
    result = pretrain(run, "runs/mine")                      # checkpoints in runs/mine/checkpoints
    result = resume_run("runs/mine", epochs=20)               # from its latest checkpoint

A checkpoint is written every `checkpoint_every` steps (default: at each epoch's end), at the end,
and when the run is stopped (Ctrl-C, SIGTERM); the newest `keep` are kept. Each holds the params,
the optimizer state, the history, the run record, where the run is in its data (epoch, batch)
and the data's fingerprint, so a resumed run sees exactly the batches, the dropout and the
losses of an uninterrupted one. The run folder is locked while a run uses it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from gptflax import checkpoint, files, models, parallel, sources
from gptflax.config import check_remat
from gptflax.data import DataLoader, Position, train_val_loaders
from gptflax.generate import sample_text
from gptflax.losses import loss_fn, mixed_precision
from gptflax.pipeline import TokenStream, check_windows
from gptflax.plots import plot_losses
from gptflax.tokenfiles import TokenFiles, TokenFilesError
from gptflax.training.fit import (
    EpochEnd,
    Evaluate,
    History,
    Progress,
    Record,
    jit_train_step,
)
from gptflax.training.loop import Every, Hook, Step, train_loop
from gptflax.training.optim import check_optimizer, make_optimizer, warmup_cosine_schedule
from gptflax.training.step import TrainState, init_train_state

STRATEGIES = ("dp", "fsdp", "tp", "fsdp+tp")
# The speed settings of the book's step, and of the fastest step measured on an H100 that
# trains the same model (docs/measurements.md: 124M at context 1024, 3.6x the book's fp32 step;
# the micro-batch is the run's batch_size / accum_steps, left to the user).
BOOK_STEP = {"bf16": False, "fused_attention": False, "pad_vocab": 1, "loss_chunk": 0}
FAST_STEP = {"bf16": True, "fused_attention": True, "pad_vocab": 128, "loss_chunk": 4096}


@dataclass(frozen=True)
class Run:
    """The settings of a pretraining run; the defaults are the book's (chapter 5).

    `model` names an architecture to train from scratch (GPT-2's 124M, 355M, 774M, 1558M; "tiny";
    or one of `sources.ARCHITECTURES`), `init` a model of `sources.MODELS` whose weights to start
    from instead (continued pretraining). Windows of `context_length` tokens train."""

    data: str | None = None  # a UTF-8 text file or a folder of token files; None: the-verdict
    train_ratio: float = 0.9  # of a text file: the first share of the characters trains
    concatenate: bool = True  # of token files: windows may span documents (False: one each)
    data_workers: int = 0  # of token files: processes that read ahead (a script needs a main guard)
    model: str = "124M"
    init: str | None = None
    context_length: int = 256
    drop_rate: float = 0.1
    lr: float = 4e-4  # the peak, with warmup
    weight_decay: float = 0.1
    warmup: float = 0.0  # the share of steps of linear warmup before cosine decay (App. D)
    max_grad_norm: float | None = None  # clip gradients to this global norm after warmup
    epochs: int = 10
    max_steps: int | None = None  # stop after this many steps, if sooner than the epochs end
    batch_size: int = 2
    eval_freq: int = 5
    eval_iter: int = 5
    start_context: str = "Every effort moves you"
    checkpoint_every: int | None = None  # steps; None: at each epoch's end
    keep: int = 3
    # How the step computes, each a rung of the speed lab (bonus ch05/10): the model trained stays
    # the same (within rounding), only time and memory change. Left at None, a setting is the
    # book's on a CPU and the fastest measured on an accelerator (FAST_STEP, `on_backend`).
    bf16: bool | None = None
    fused_attention: bool | None = None
    remat: str = "none"  # what the backward pass recomputes (config.REMAT_POLICIES)
    pad_vocab: int | None = None  # the head's vocabulary rounded up to a multiple of this
    loss_chunk: int | None = None  # positions per chunk of the fused head and loss (0: plain)
    accum_steps: int = 1  # micro-batches per step (gradient accumulation)
    optimizer: str = "adamw"  # or "muon" (optim.OPTIMIZERS)
    strategy: str = "dp"
    mesh: str | None = None  # e.g. "data=4,model=2"
    seed: int = 123

    # What a resumed run cannot change: the weights it holds depend on them.
    ARCHITECTURE = ("model", "init", "context_length")

    def __post_init__(self):
        for name in ("context_length", "epochs", "batch_size", "eval_freq", "eval_iter", "keep"):
            _check(name, getattr(self, name), lambda v: v >= 1, "at least 1", whole=True)
        _check("accum_steps", self.accum_steps, lambda v: v >= 1, "at least 1", whole=True)
        _check("data_workers", self.data_workers, lambda v: v >= 0, "0 or more", whole=True)
        if self.pad_vocab is not None:
            _check("pad_vocab", self.pad_vocab, lambda v: v >= 1, "at least 1", whole=True)
        if self.loss_chunk is not None:
            _check("loss_chunk", self.loss_chunk, lambda v: v >= 0, "0 or more", whole=True)
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"accum_steps: {self.accum_steps} micro-batches do not split a batch of "
                f"{self.batch_size} rows evenly: pick a divisor of batch_size"
            )
        check_remat(self.remat)
        check_optimizer(self.optimizer)
        if self.max_steps is not None:
            _check("max_steps", self.max_steps, lambda v: v >= 1, "at least 1", whole=True)
        if self.checkpoint_every is not None:
            _check("checkpoint_every", self.checkpoint_every, lambda v: v >= 1, "at least 1", True)
        _check("seed", self.seed, lambda v: True, "a whole number", whole=True)
        _check("lr", self.lr, lambda v: v > 0, "above 0")
        _check("weight_decay", self.weight_decay, lambda v: v >= 0, "0 or more")
        _check("warmup", self.warmup, lambda v: 0 <= v < 1, "at least 0 and below 1")
        _check("drop_rate", self.drop_rate, lambda v: 0 <= v < 1, "at least 0 and below 1")
        _check("train_ratio", self.train_ratio, lambda v: 0 < v < 1, "between 0 and 1")
        if self.max_grad_norm is not None:
            _check("max_grad_norm", self.max_grad_norm, lambda v: v > 0, "above 0")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.mesh is not None:
            try:
                parallel.parse_mesh(self.mesh)
            except ValueError as e:
                raise ValueError(f"mesh: {e}") from None
        if self.init is None and self.model not in sources.ARCHITECTURES:
            known = ", ".join(sources.ARCHITECTURES)
            raise ValueError(f"model: one of {known}, not {self.model!r}")
        if self.init is not None and self.init not in sources.SOURCES:
            raise ValueError(f"init: one of {', '.join(sources.MODELS)}, not {self.init!r}")

    def replace(self, **changes) -> Run:
        return dataclasses.replace(self, **changes)

    def on_backend(self, backend: str) -> Run:
        """The run with each speed setting left at None decided for `backend` ("cpu", "gpu",
        "tpu"): the book's plain step on a CPU, FAST_STEP elsewhere (fused attention only
        without dropout, which it does not have, and not where bf16 is turned off)."""
        chosen = BOOK_STEP if backend == "cpu" else FAST_STEP
        if self.drop_rate or self.bf16 is False:  # cuDNN's kernel: no dropout, bf16 only
            chosen = {**chosen, "fused_attention": False}
        return self.replace(**{k: v for k, v in chosen.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Run:
        """The run a checkpoint recorded: `to_dict`'s record, or the options of a checkpoint
        from before runs were records (its `text` is the data)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        record = {("data" if k == "text" else k): v for k, v in record.items()}
        if isinstance(record.get("mesh"), dict):
            record["mesh"] = ",".join(f"{k}={v}" for k, v in record["mesh"].items())
        return cls(**{k: v for k, v in record.items() if k in fields})


def _check(name: str, value, ok, what: str, whole: bool = False) -> None:
    kind = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name}: must be {'a whole' if whole else 'a'} number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value}")
    if not ok(value):
        raise ValueError(f"{name}: must be {what}, got {value}")


class RunError(Exception):
    """A run that cannot start or continue as asked: one line says why and what to do."""


class Result(NamedTuple):
    """How a run ended: its state and history, what stopped it (None: it finished), and its
    newest checkpoint's folder."""

    state: TrainState
    history: History
    stopped: str | None
    checkpoint: Path | None


def pretrain(run: Run, run_dir: str | Path) -> Result:
    """Assemble `run` and train it from its first step, checkpoints in run_dir/checkpoints."""
    run_dir = Path(run_dir).absolute()
    with RunDir(run_dir) as ckpt_dir:
        if checkpoint.complete_steps(ckpt_dir):
            raise RunError(f"{ckpt_dir} holds checkpoints: resume the run, or use another folder")
        parts = assemble(run)
        params = initial_params(run, parts.cfg)
        state = parallel.init_sharded(
            lambda: init_train_state(params, parts.tx), parts.cfg, parts.mesh, run.strategy
        )
        return _train(run, parts, state, History(), Position(0, 0), run_dir)


def resume_run(run_dir: str | Path, *, accept_new_data: bool = False, **changes) -> Result:
    """Continue the run in `run_dir` from its latest checkpoint, with its saved settings changed
    where `changes` says (e.g. epochs=20); a change of the architecture is refused by name, and so
    is other data than the run's, unless `accept_new_data`."""
    run_dir = Path(run_dir).absolute()
    with RunDir(run_dir) as ckpt_dir:
        if not checkpoint.complete_steps(ckpt_dir):
            raise RunError(f"{ckpt_dir} holds no checkpoint to resume from")
        step, meta = checkpoint.read_meta(ckpt_dir)
        saved = Run.from_dict(meta.get("run") or meta["options"])
        clashes = [f"{name}={changes[name]!r} (the run's is {getattr(saved, name)!r})"
                   for name in Run.ARCHITECTURE
                   if name in changes and changes[name] != getattr(saved, name)]  # fmt: skip
        if clashes:
            raise RunError(
                f"{ckpt_dir} holds another model than {' and '.join(clashes)}: leave those "
                "settings out to resume, or train into another folder"
            )
        try:
            run = saved.replace(**changes)
        except ValueError as e:
            raise RunError(f"bad setting: {e}") from None
        parts = assemble(run)
        if "data" in meta and meta["data"] != parts.fingerprint and not accept_new_data:
            raise RunError(
                f"the data differs from the run's: {_about(parts.fingerprint)} now, "
                f"{_about(meta['data'])} when it was saved; accept it explicitly to go on"
            )
        history = History(**meta["history"])
        position = Position(**meta["position"]) if "position" in meta else Position(
            history.epochs_done, 0
        )  # fmt: skip
        total = total_steps(run, len(parts.train_loader))
        if step >= total:
            given = f"of its {run.epochs} epochs: ask for more epochs"
            if total < run.epochs * len(parts.train_loader):
                given = "it was given (max_steps): ask for more max_steps"
            raise RunError(f"the run has taken all {total} steps {given} to train on")
        template = jax.eval_shape(
            lambda: init_train_state(models.init_params(jax.random.key(0), parts.cfg), parts.tx)
        )
        placed = parallel.shardings(template, parts.cfg, parts.mesh, run.strategy)
        like = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                            template, placed)  # fmt: skip
        params, train, _ = checkpoint.load_checkpoint(
            ckpt_dir, cfg=parts.cfg, params_like=like.params,
            train_like={"step": like.step, "opt_state": like.opt_state},
        )  # fmt: skip
        state = TrainState(train["step"], params, train["opt_state"])
        print(f"resuming at step {step}: epoch {position.epoch + 1}, batch {position.index + 1}")
        return _train(run, parts, state, history, position, run_dir)


class Parts(NamedTuple):
    """A run assembled: its data, model config, tokenizer, optimizer, mesh and keys."""

    train_loader: object
    val_loader: object
    fingerprint: dict
    cfg: object
    tokenizer_name: str
    tx: object
    mesh: object
    init_key: jax.Array
    dropout_key: jax.Array


def assemble(run: Run) -> Parts:
    """The pieces of a run, each checked: a bad input is a RunError of one line."""
    cfg, tokenizer_name = architecture(run)
    path = Path(run.data) if run.data else files.resolve("the-verdict.txt")
    if path.is_dir():
        train_loader, val_loader, fingerprint = token_streams(run, path, tokenizer_name)
    else:
        train_loader, val_loader = text_loaders(run, path, tokenizer_name)
        fingerprint = fingerprint_of(path)
    if len(train_loader) == 0:
        raise RunError(
            f"{path}: the training part has {train_loader.num_examples} windows of "
            f"{run.context_length} tokens, fewer than one batch: lower the batch size"
        )
    total = total_steps(run, len(train_loader))
    warmup_steps = int(run.warmup * total)
    lr = warmup_cosine_schedule(run.lr, total, warmup_steps) if warmup_steps else run.lr
    tx = make_optimizer(
        lr, run.weight_decay, max_grad_norm=run.max_grad_norm, clip_from_step=warmup_steps,
        optimizer=run.optimizer,
    )  # fmt: skip
    init_key, dropout_key, _ = jax.random.split(jax.random.key(run.seed), 3)  # and sampling's
    return Parts(train_loader, val_loader, fingerprint, cfg, tokenizer_name, tx, run_mesh(run),
                 init_key, dropout_key)  # fmt: skip


def text_loaders(run: Run, path: Path, tokenizer_name: str) -> tuple[DataLoader, DataLoader]:
    """The book's loaders over a text file: its first `train_ratio` of characters trains."""
    text = _read_text(path)
    try:
        return train_val_loaders(text, run.context_length, run.batch_size, run.train_ratio,
                                 run.seed, sources.load_tokenizer(tokenizer_name))  # fmt: skip
    except ValueError as e:
        raise RunError(
            f"{path}: {e}; use a longer text, a shorter context or another split"
        ) from None


def token_streams(run: Run, folder: Path, tokenizer_name: str) -> tuple:
    """(train, validation, fingerprint) of a folder of token files, each file checked against
    its manifest and the tokenizer against the model's."""
    try:
        token_files = TokenFiles.open(folder)
        if token_files.tokenizer != tokenizer_name:
            raise TokenFilesError(
                f"{folder} holds {token_files.tokenizer} tokens, the model reads "
                f"{tokenizer_name}'s: prepare the text again with --tokenizer {tokenizer_name}"
            )
        streams = [
            TokenStream(token_files, split, run.context_length, run.batch_size, shuffle=shuffle,
                        seed=run.seed, concatenate=run.concatenate, workers=run.data_workers)
            for split, shuffle in (("train", True), ("val", False))
        ]  # fmt: skip
        check_windows(streams[0], "training", every_document=True)
        check_windows(streams[1], "held-out")
    except TokenFilesError as e:
        raise RunError(str(e)) from None
    return *streams, token_files.fingerprint()


def total_steps(run: Run, per_epoch: int) -> int:
    """The steps a run takes: its epochs' batches, or max_steps if fewer."""
    epochs_end = run.epochs * per_epoch
    return min(epochs_end, run.max_steps) if run.max_steps else epochs_end


def architecture(run: Run) -> tuple[object, str]:
    """(model config, tokenizer name) of a run: its architecture's, with the run's context,
    dropout and attention kernel; with `init`, the initial model's (windows must fit it)."""
    if run.init is not None:
        source = sources.SOURCES[run.init]
        cfg, tokenizer = source.config(), source.tokenizer
        if run.context_length > cfg.context_length:
            raise RunError(
                f"context_length {run.context_length} exceeds {run.init}'s context of "
                f"{cfg.context_length}: train on shorter windows"
            )
    else:
        cfg, tokenizer = sources.ARCHITECTURES[run.model]
        cfg = cfg.replace(context_length=run.context_length)
    try:
        return step_config(run, cfg), tokenizer
    except ValueError as e:
        raise RunError(f"bad model settings: {e}") from None


def step_config(run: Run, cfg):
    """The model config as the run computes it on this backend: its dropout, fused attention
    and remat."""
    run = run.on_backend(jax.default_backend())
    if run.fused_attention and not run.bf16 and jax.default_backend() == "gpu":
        raise ValueError("fused attention on a GPU is cuDNN's, which computes in bf16: add --bf16")
    how = {"drop_rate": run.drop_rate, "fused_attention": run.fused_attention, "remat": run.remat}
    return cfg.replace(**{k: v for k, v in how.items() if hasattr(cfg, k)})


def initial_params(run: Run, cfg) -> dict:
    """The weights a run starts from: fresh ones from its seed, or its `init` model's."""
    if run.init is not None:
        return sources.load_model(run.init).params
    return models.init_params(jax.random.split(jax.random.key(run.seed), 3)[0], cfg)


def run_mesh(run: Run):
    """The device mesh a run's strategy and mesh setting ask for."""
    sizes = parallel.parse_mesh(run.mesh) if run.mesh else {}
    if "tp" in run.strategy and not sizes:
        if run.strategy != "tp":
            raise RunError(f"strategy {run.strategy} needs a mesh, e.g. data=4,model=2")
        sizes = {"data": 1, "model": len(jax.devices())}
    try:
        return parallel.make_mesh(run.batch_size, **sizes)
    except ValueError as e:
        raise RunError(f"mesh: {e}") from None


def run_loss(run: Run, cfg):
    """The run's training loss, `loss_fn` computed as its settings say on this backend (bf16,
    padded vocabulary, chunked head)."""
    run = run.on_backend(jax.default_backend())
    loss = partial(loss_fn, cfg=cfg, loss_chunk=run.loss_chunk or None, pad_vocab=run.pad_vocab)
    return mixed_precision(loss) if run.bf16 else loss


def _train(run: Run, parts: Parts, state, history, position, run_dir: Path) -> Result:
    """The loop of a run from `position`, with its evaluations, samples and checkpoints."""
    cfg, loader = parts.cfg, parts.train_loader
    loss = run_loss(run, cfg)
    state, step_fn, prepare = jit_train_step(state, cfg, parts.tx, loss, False, parts.mesh,
                                             run.strategy, run.accum_steps)  # fmt: skip
    tokenizer = sources.load_tokenizer(parts.tokenizer_name)
    rows = parallel.local_rows(parts.mesh, loader.batch_size)
    print(f"{parts.fingerprint['file']}: {len(loader)} batches per epoch; {cfg}")
    print(f"{run.strategy} on a mesh of {dict(parts.mesh.shape)} over {parts.mesh.size} of "
          f"{len(jax.devices())} {jax.default_backend()} devices in {jax.process_count()} "
          "process(es)")  # fmt: skip

    def at_epoch_end(step: Step) -> None:
        history.epochs_done = step.position.epoch + 1
        history.samples.append(sample_text(step.state.params, tokenizer, run.start_context, cfg))
        print(f"Ep {history.epochs_done} sample: {history.samples[-1]!r}")

    meta = {"run": run.to_dict(), "tokenizer": parts.tokenizer_name, "data": parts.fingerprint}
    saver = SaveCheckpoints(run_dir / "checkpoints", run, cfg, history, meta, len(loader))
    hooks = [
        Progress(total_steps(run, len(loader)), int(state.step)),
        Record(history),
        Every(
            run.eval_freq,
            Evaluate(loss, False, loader, parts.val_loader, run.eval_iter, history),
            first=1,
        ),  # fmt: skip
        EpochEnd(len(loader), at_epoch_end),
        saver,
        PlotAtEnd(run_dir / "loss.png", history, len(loader)),
    ]
    batches = itertools.islice(loader.epoch_batches(run.epochs, position, rows),
                               total_steps(run, len(loader)) - int(state.step))  # fmt: skip
    state, stopped = train_loop(state, batches, step_fn, parts.dropout_key, hooks, prepare=prepare)
    return Result(state, history, stopped, saver.newest)


class SaveCheckpoints(Hook):
    """A checkpoint every `run.checkpoint_every` steps (else at each epoch's end), after the last
    step and when the run is stopped; only the newest `run.keep` stay."""

    def __init__(self, directory: Path, run: Run, cfg, history, meta: dict, per_epoch: int):
        self.directory, self.run, self.cfg, self.history = directory, run, cfg, history
        self.meta, self.per_epoch, self.newest = meta, per_epoch, None

    def after_step(self, step: Step) -> None:
        every = self.run.checkpoint_every
        due = step.number % every == 0 if every else step.position.index == self.per_epoch - 1
        if due:
            self.save(step)

    def at_end(self, last: Step | None, stopped: str | None) -> None:
        if last is not None and (self.newest is None or self.newest.name != str(last.number)):
            self.save(last)

    def save(self, step: Step) -> None:
        epoch, index = step.position.epoch, step.position.index + 1
        if index == self.per_epoch:
            epoch, index = epoch + 1, 0
        state = step.state
        meta = {**self.meta, "history": dataclasses.asdict(self.history),
                "position": {"epoch": epoch, "index": index}}  # fmt: skip
        self.newest = checkpoint.save_checkpoint(
            self.directory, step.number, state.params, cfg=self.cfg,
            train_state={"step": state.step, "opt_state": state.opt_state}, meta=meta,
        )  # fmt: skip
        if jax.process_index() == 0:
            checkpoint.remove_old(self.directory, keep=self.run.keep)


class PlotAtEnd(Hook):
    """The loss plot (train and validation against epochs and tokens) when the run ends or is
    stopped; written by process 0."""

    def __init__(self, path: Path, history: History, per_epoch: int):
        self.path, self.history, self.per_epoch = path, history, per_epoch

    def at_end(self, last: Step | None, stopped: str | None) -> None:
        h = self.history
        if jax.process_index() == 0 and h.train_losses:
            epochs = (np.asarray(h.steps) + 1) / self.per_epoch
            plot_losses(epochs, h.tokens_seen, h.train_losses, h.val_losses, self.path)


class RunDir:
    """A run folder made ready and locked for one run: it must be a folder (or creatable) that
    this process can write; a second run on it is refused at once, and a killed run's lock
    goes with its process. Yields the checkpoint folder."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.lock = run_dir, None

    def __enter__(self) -> Path:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunError(f"{self.run_dir} is a file, not a folder: choose another run folder")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunError(f"cannot write into {self.run_dir} ({e.strerror}): choose another "
                           "run folder") from None  # fmt: skip
        if jax.process_index() == 0:
            self.lock = open(self.run_dir / ".lock", "w")  # noqa: SIM115 (held while training)
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock.close()
                raise RunError(
                    f"{self.run_dir} is in use by another run (pid {_holder(self.run_dir)}): "
                    "wait for it to end, or train into another folder"
                ) from None
            self.lock.write(str(os.getpid()))
            self.lock.flush()
        return self.run_dir / "checkpoints"

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.close()  # closing releases the lock


def _holder(run_dir: Path) -> str:
    try:
        return (run_dir / ".lock").read_text().strip() or "?"
    except OSError:
        return "?"


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RunError(f"no text file {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RunError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}): "
            "save it as UTF-8"
        ) from None


def _about(data: dict) -> str:
    return f"{data['file']} ({data['bytes']:,} bytes, sha256 {data['sha256'][:12]}...)"


def fingerprint_of(path: str | Path) -> dict:
    """What a run records of its data: the file, its size and its sha256."""
    path = Path(path)
    return {"file": str(path.absolute()), "bytes": path.stat().st_size,
            "sha256": files.sha256_of(path)}  # fmt: skip
