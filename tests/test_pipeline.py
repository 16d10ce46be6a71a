"""The grain pipeline over token files (gptflax.pipeline): the order depends only on (seed, epoch),
each epoch is a permutation cut to whole batches, a process reads only its rows, memory does not
grow with the corpus, and a run resumed mid-epoch sees exactly the uninterrupted run's batches."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gptflax import checkpoint, files
from gptflax.data import Position
from gptflax.pipeline import TokenStream, Windows
from gptflax.tokenfiles import TokenFiles, prepare
from gptflax.training.run import Run, RunError, pretrain, resume_run

pytestmark = pytest.mark.labpretrain


def write_token_files(folder, train: np.ndarray, val: np.ndarray, train_docs=None) -> TokenFiles:
    """Token files as `prepare` writes them, from given token arrays (uint16)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, ids in (("train", train), ("val", val)):
        data = ids.astype(np.uint16).tobytes()
        (folder / f"{split}.bin").write_bytes(data)
        entries[split] = {"file": f"{split}.bin", "tokens": len(ids),
                          "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    lengths = train_docs if train_docs is not None else [len(train)]
    docs = [{"source": f"doc{i}", "bytes": 0, "mtime_ns": 0, "sha256": "", "train_tokens": n,
             "val_tokens": len(val) if i == 0 else 0} for i, n in enumerate(lengths)]  # fmt: skip
    manifest = {"format": 1, "tokenizer": "gpt2", "val_share": 0.1, "vocab_size": 50257,
                "eos_id": 50256, "dtype": "uint16", "files": entries,
                "documents": docs}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return TokenFiles.open(folder)


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """Token files whose token at position i is i % 60000: a window shows where it starts."""
    ids = np.arange(10_001) % 60000
    return write_token_files(tmp_path_factory.mktemp("counting"), ids, ids[:1001],
                             train_docs=[3000, 4001, 3000])  # fmt: skip


def window_ids(batch, T: int) -> list[int]:
    return [int(row[0]) // T for row in batch[0]]


def test_windows_are_inputs_and_shifted_targets_inside_documents_or_across(counting):
    stream = TokenStream(counting, "train", 100, 8, concatenate=True)
    x, y = next(stream.batches(0))
    assert x.shape == y.shape == (8, 100) and x.dtype == np.int32
    assert np.array_equal(y, x + 1) and np.array_equal(x[:, 0], np.arange(8) * 100)
    assert stream.num_examples == 10_000 // 100
    per_doc = Windows(counting, "train", 100, concatenate=False)
    assert len(per_doc) == 29 + 40 + 29  # (3000 - 1) // 100, (4001 - 1) // 100, ...
    starts = per_doc.starts(np.arange(len(per_doc)))
    assert starts[29] == 3000 and starts[69] == 7001  # each document's first window
    doc_end = np.array([3000, 7001, 10_001])
    ends = starts + 101
    assert np.all(ends <= doc_end[np.searchsorted(doc_end, starts, side="right")])


def test_the_order_depends_only_on_seed_and_epoch(counting):
    def stream(seed):
        return TokenStream(counting, "train", 100, 8, shuffle=True, seed=seed)

    a, b = stream(7), stream(7)
    epoch1 = [window_ids(batch, 100) for batch in a.batches(1)]
    assert epoch1 == [window_ids(batch, 100) for batch in b.batches(1)]  # epoch 0 never read
    epoch0 = [window_ids(batch, 100) for batch in a.batches(0)]
    other = [window_ids(batch, 100) for batch in stream(8).batches(1)]
    assert epoch0 != epoch1 and other != epoch1
    for epoch in (epoch0, epoch1):  # 100 windows: 12 batches of 8, 4 windows left out
        seen = [i for batch in epoch for i in batch]
        assert len(epoch) == len(a) == 12 and len(set(seen)) == 96 and max(seen) < 100
    streamed = [(p, window_ids(batch, 100)) for p, batch in a.epoch_batches(2, Position(1, 5))]
    assert streamed == [(Position(1, i), epoch1[i]) for i in range(5, 12)]


def test_each_process_reads_only_its_rows_of_every_global_batch(counting, monkeypatch):
    reads = []
    real_read = Windows.read
    monkeypatch.setattr(Windows, "read", lambda self, ids: reads.append(list(ids)) or
                        real_read(self, ids))  # fmt: skip
    stream = TokenStream(counting, "train", 100, 8, shuffle=True, seed=3)
    whole = [batch for _, batch in stream.epoch_batches(1)]
    reads.clear()
    halves = [[batch for _, batch in stream.epoch_batches(1, rows=rows)]
              for rows in (slice(0, 4), slice(4, 8))]  # fmt: skip
    assert all(len(r) == 4 for r in reads) and len(reads) == 2 * len(whole)
    for k, batch in enumerate(whole):
        for i in range(2):
            assert np.array_equal(np.concatenate([halves[0][k][i], halves[1][k][i]]), batch[i])


MEMORY = textwrap.dedent("""
    import itertools, sys
    from gptflax.pipeline import TokenStream
    from gptflax.tokenfiles import TokenFiles
    stream = TokenStream(TokenFiles.open(sys.argv[1]), "train", 256, 8, shuffle=True, seed=1)
    for _, (x, y) in itertools.islice(stream.epoch_batches(1), 300):
        assert x.shape == (8, 256)
    status = open("/proc/self/status").read()  # VmHWM: this program's peak resident memory
    print(int(status.split("VmHWM:")[1].split()[0]) // 1024)  # (ru_maxrss keeps the parent's)
""")


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    peaks = []
    for millions in (10, 100):
        ids = np.random.default_rng(0).integers(0, 50257, millions * 1_000_000, dtype=np.uint16)
        write_token_files(tmp_path / f"{millions}M", ids, ids[:10_000])
        del ids
        out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / f"{millions}M")],
                             capture_output=True, text=True, check=True)  # fmt: skip
        peaks.append(int(out.stdout.split()[-1]))
        shutil.rmtree(tmp_path / f"{millions}M")
    assert peaks[1] - peaks[0] < 100, f"peak resident memory {peaks} MB for 10M and 100M tokens"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    text = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
    for i in range(3):
        (folder / f"part{i}.txt").write_text(text[i * 6800 : (i + 1) * 6800], encoding="utf-8")
    prepare([folder], folder / "tokens", val_share=0.1)
    return folder / "tokens"


TINY = dict(model="tiny", context_length=16, batch_size=4, eval_freq=7, eval_iter=2, epochs=2)


def test_a_run_on_token_files_resumed_mid_epoch_equals_the_uninterrupted_run(prepared, tmp_path):
    run = Run(data=str(prepared), **TINY, checkpoint_every=25, keep=20)
    whole = pretrain(run, tmp_path / "whole")
    ckpts = tmp_path / "whole" / "checkpoints"
    mid = next(s for s in checkpoint.complete_steps(ckpts)
               if checkpoint.read_meta(ckpts, s)[1]["position"]["index"] > 0)  # fmt: skip
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for step in checkpoint.complete_steps(cut / "checkpoints"):
        if step > mid:
            shutil.rmtree(cut / "checkpoints" / str(step))
    resumed = resume_run(cut, data_workers=1)  # read ahead by a grain worker process this time
    h, w = resumed.history, whole.history
    assert (h.train_losses, h.val_losses, h.tokens_seen) == (
        w.train_losses, w.val_losses, w.tokens_seen)  # fmt: skip
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, resumed.state.params,
                                            whole.state.params)))  # fmt: skip
    assert w.val_losses[-1] < w.val_losses[0]


def test_a_run_refuses_token_files_it_cannot_use(prepared, tmp_path):
    with pytest.raises(RunError, match="holds gpt2 tokens, the model reads smollm2's"):
        pretrain(Run(data=str(prepared), model="tiny-llama", context_length=16), tmp_path / "a")
    with pytest.raises(
        RunError, match=r"part\d.txt has [\d,]+ training tokens, fewer than a window"
    ):
        pretrain(Run(data=str(prepared), model="tiny", context_length=1600, concatenate=False),
                 tmp_path / "b")  # fmt: skip
    with pytest.raises(RunError, match="holds no manifest.json"):
        pretrain(Run(data=str(prepared.parent), model="tiny"), tmp_path / "c")


def test_max_steps_ends_a_run_mid_epoch_and_more_steps_continue_it(prepared, tmp_path):
    result = pretrain(Run(data=str(prepared), **TINY, max_steps=5), tmp_path)
    assert int(result.state.step) == 5 and result.stopped is None
    with pytest.raises(RunError, match="has taken all 5 steps it was given"):
        resume_run(tmp_path)
    assert int(resume_run(tmp_path, max_steps=7).state.step) == 7


def test_train_data_on_the_command_line_reports_bad_token_files_in_one_line(prepared, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    (broken / "val.bin").write_bytes((broken / "val.bin").read_bytes()[:-2])
    for folder, message in [(prepared.parent, "holds no manifest.json"),
                            (broken, "it was changed or cut short")]:  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "gptflax", "train", "--data", str(folder),
                              "--model", "tiny", "--run-dir", str(tmp_path / "run")],
                             capture_output=True, text=True)  # fmt: skip
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and lines[-1].startswith("error: ") and message in lines[-1]
        assert "Traceback" not in run.stderr
