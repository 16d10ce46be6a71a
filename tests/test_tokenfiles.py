"""Token files (gptflax.tokenfiles, `python -m gptflax prepare`): the pieces tokenized in parallel
give exactly the whole text's tokens, the split and the manifest say what the files hold, an
unchanged corpus is not prepared again, and bad inputs get one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gptflax import files, tokenfiles
from gptflax.tokenfiles import TokenFiles, TokenFilesError, prepare
from gptflax.tokenizer import gpt2_tokenizer

pytestmark = pytest.mark.labpretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three documents: the-verdict in two parts, and a 1,500-line text of many short pieces."""
    folder = tmp_path_factory.mktemp("corpus")
    verdict = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
    (folder / "a.txt").write_text(verdict[:9000], encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(verdict[9000:], encoding="utf-8")
    lines = [f"Line {i}: the {'quick ' * (i % 5)}fox, {i * 7} times.\n" for i in range(1500)]
    (folder / "sub" / "c.txt").write_text("".join(lines) + "\nThe end.\n\n  ", encoding="utf-8")
    (folder / ".hidden").write_text("never read")
    return folder


def split_tokens(tf: TokenFiles) -> list[list[int]]:
    """Each document's tokens, its training part then its held-out part, end-of-text removed."""
    eos, out, at = tf.manifest["eos_id"], [], {"train": 0, "val": 0}
    for i in range(len(tf.manifest["documents"])):
        ids = []
        for split in ("train", "val"):
            n = int(tf.document_lengths(split)[i])
            part = [int(t) for t in tf.tokens(split)[at[split] : at[split] + n]]
            assert part == [] or part[-1] == eos  # each part ends with end-of-text
            ids += part[:-1]
            at[split] += n
        out.append(ids)
    return out


def test_pieces_tokenized_apart_give_the_whole_texts_tokens(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenfiles, "PIECE_BYTES", 700)  # dozens of pieces per document
    manifest = prepare([corpus], tmp_path / "tok", val_share=0.2, workers=1)
    tf = TokenFiles.open(tmp_path / "tok")
    tok = gpt2_tokenizer()
    sources = [corpus / "a.txt", corpus / "sub" / "b.txt", corpus / "sub" / "c.txt"]
    assert [d["source"] for d in manifest["documents"]] == [str(p) for p in sources]
    for path, ids in zip(sources, split_tokens(tf), strict=True):
        assert ids == tok.encode_ordinary(path.read_text(encoding="utf-8"))
    train, val = tf.document_lengths("train"), tf.document_lengths("val")
    assert np.all(val > 0.1 * (train + val)) and np.all(val < 0.3 * (train + val))
    assert manifest["dtype"] == "uint16" and tf.tokens("train").dtype == np.uint16
    assert manifest["files"]["train"]["tokens"] == train.sum() == len(tf.tokens("train"))


def test_two_processes_write_the_same_files_as_one(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenfiles, "PIECE_BYTES", 5000)
    one = prepare([corpus], tmp_path / "one", workers=1)
    two = prepare([corpus], tmp_path / "two", workers=2)
    assert one["files"] == two["files"] and one["documents"] == two["documents"]


def test_a_large_vocabulary_is_stored_as_uint32(corpus, tmp_path):
    manifest = prepare([corpus / "a.txt"], tmp_path / "qwen", tokenizer="qwen3")
    tf = TokenFiles.open(tmp_path / "qwen")
    assert manifest["vocab_size"] > 65536 and tf.tokens("train").dtype == np.uint32
    assert tf.tokens("train")[-1] == manifest["eos_id"]


def test_unchanged_sources_are_not_prepared_again(corpus, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    prepare([src], tmp_path / "tok")
    stamp = (tmp_path / "tok" / "train.bin").stat().st_mtime_ns
    os.utime(src / "a.txt")  # touched, not changed: its sha256 still matches
    capsys.readouterr()
    assert prepare([src], tmp_path / "tok")["files"]["train"]["tokens"] > 0
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "tok" / "train.bin").stat().st_mtime_ns == stamp
    (src / "a.txt").write_text("A different story.\nIt is short.\n", encoding="utf-8")
    changed = prepare([src], tmp_path / "tok")
    assert (tmp_path / "tok" / "train.bin").stat().st_mtime_ns != stamp
    assert changed["documents"][0]["bytes"] == len("A different story.\nIt is short.\n")
    again = prepare([src], tmp_path / "tok", val_share=0.2)  # other settings: prepared again
    assert again["val_share"] == 0.2 and again["files"] != changed["files"]


def test_opening_checks_every_file_against_the_manifest(corpus, tmp_path):
    prepare([corpus / "a.txt"], tmp_path / "tok")
    tok = tmp_path / "tok"
    data = bytearray((tok / "train.bin").read_bytes())
    data[10] ^= 1
    (tok / "train.bin").write_bytes(bytes(data))
    with pytest.raises(TokenFilesError, match="does not match its sha256 in manifest.json"):
        TokenFiles.open(tok)
    (tok / "train.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(TokenFilesError, match="it was changed or cut short"):
        TokenFiles.open(tok)
    (tok / "manifest.json").write_text((tok / "manifest.json").read_text()[:200])
    with pytest.raises(TokenFilesError, match="damaged or half-written"):
        TokenFiles.open(tok)
    (tok / "manifest.json").unlink()
    with pytest.raises(TokenFilesError, match="holds no manifest.json"):
        TokenFiles.open(tok)


def test_prepare_on_the_command_line_reports_bad_input_in_one_line(corpus, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cases = [
        ([str(bad)], "is not UTF-8 text (byte 0xe9 at position 3)"),
        ([str(tmp_path / "missing.txt")], "no file or folder"),
        ([str(corpus / "a.txt"), "--val-share", "1.5"], "val_share must be at least 0"),
    ]
    for sources, message in cases:
        run = subprocess.run([sys.executable, "-m", "gptflax", "prepare", *sources, "--out",
                              str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and lines[-1].startswith("error: ") and message in lines[-1]
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    ok = subprocess.run([sys.executable, "-m", "gptflax", "prepare", str(corpus), "--out",
                         str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["documents"]) == 3 and manifest["tokenizer"] == "gpt2"
