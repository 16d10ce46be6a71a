"""Token files: a corpus tokenized once into files on disk, for pretraining on more text than
fits in memory (the book's bonus ch05/03 does this for Project Gutenberg).

    manifest = prepare(["books/", "notes.txt"], "runs/corpus")   # python -m gptflax prepare
    files = TokenFiles.open("runs/corpus")                       # checked against the manifest

Each source file is one document. The last `val_share` of each document's text (cut at a line
break) is held out: `val.bin` holds those parts, `train.bin` the rest, each document's part
followed by the tokenizer's end-of-text token. Token ids are stored as uint16 where the
vocabulary fits (GPT-2's 50,257 does), else uint32. `manifest.json` records the tokenizer, the
split, each document (source file, size, sha256, token counts) and each token file (tokens,
sha256); it is written last, so a folder without one holds no finished token files.

Documents are cut into pieces of a few MB where GPT-2's pre-tokenizer splits the text anyway
(after a line break between two printable characters, between a paragraph's two breaks, or
after a sentence's end before the next one's space), so the pieces, tokenized in parallel
processes, give exactly the tokens of the whole.
Re-running `prepare` on unchanged sources with the same settings does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptflax.files import save_json, sha256_of

MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "val")
PIECE_BYTES = 1 << 22  # text per task: 4 MiB
# A safe cut: right after a line break that follows a printable ASCII character and comes
# before another, or before a second line break and one (between a paragraph's two breaks); or
# right after a sentence's end, before the single space and capital letter of the next.
_CUT = re.compile(rb"[!-~]\n(?=\n?[!-~])|[.!?](?= [A-Z])")
_SEARCH = 1 << 16


class TokenFilesError(Exception):
    """Token files or their sources that cannot be used: one line says why and what to do."""


@dataclass(frozen=True)
class Document:
    """A source file as prepared: where it is, what it held, and its tokens in each split
    (each part's end-of-text token included)."""

    source: str
    bytes: int
    mtime_ns: int
    sha256: str
    train_tokens: int
    val_tokens: int


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one document's part, tokenized by one task."""

    path: str
    start: int
    end: int
    split: str
    last: bool  # the part's last piece: its end-of-text token follows


def prepare(
    sources: list[str | Path],
    out: str | Path,
    *,
    tokenizer: str = "gpt2",
    val_share: float = 0.05,
    workers: int | None = None,
) -> dict:
    """Tokenize the text files (folders: every file under them) into token files in `out`
    and return the manifest; with the manifest already there for the same sources (size and
    modification time, else sha256) and settings, return it and do nothing."""
    if not 0 <= val_share < 1:
        raise TokenFilesError(f"val_share must be at least 0 and below 1, got {val_share}")
    out = Path(out)
    paths = list_sources(sources)
    settings = {"format": FORMAT, "tokenizer": tokenizer, "val_share": val_share}
    old = _read_manifest(out / MANIFEST) if (out / MANIFEST).is_file() else None
    if old is not None and _up_to_date(old, settings, paths, out):
        print(f"{out}: up to date ({_summary(old)})")
        return old
    from gptflax.sources import load_tokenizer  # imports JAX: only once there is work to do

    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.n_vocab <= 1 << 16 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # token files being rewritten are not finished
    pieces = [p for path in paths for p in _pieces(path, val_share)]
    total = sum(p.end - p.start for p in pieces)
    workers = workers or (os.cpu_count() if total > 1 << 24 else 1)
    writers = {split: _TokenWriter(out / f"{split}.bin") for split in SPLITS}
    counts = {(str(path), split): 0 for path in paths for split in SPLITS}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing ({workers} process(es))",
              mininterval=1.0) as bar:  # fmt: skip
        for piece, ids in _encode_all(pieces, tokenizer, workers):
            ids = np.append(ids, tok.eos_id) if piece.last else ids
            writers[piece.split].write(ids.astype(dtype))
            counts[(piece.path, piece.split)] += len(ids)
            bar.update(piece.end - piece.start)
    token_files = {split: writers[split].close() for split in SPLITS}
    documents = [asdict(_document(path, counts)) for path in paths]
    manifest = {**settings, "vocab_size": tok.n_vocab, "eos_id": tok.eos_id,
                "dtype": np.dtype(dtype).name, "files": token_files,
                "documents": documents}  # fmt: skip
    save_json(manifest, out / MANIFEST)
    print(f"{out}: {_summary(manifest)}")
    return manifest


def list_sources(sources: list[str | Path]) -> list[Path]:
    """The text files named, folders expanded to the files under them (sorted, hidden ones
    left out); a missing path or an empty list is an error."""
    paths: list[Path] = []
    for source in sources:
        source = Path(source).absolute()
        if source.is_dir():
            paths += sorted(p for p in source.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(source).parts))  # fmt: skip
        elif source.is_file():
            paths.append(source)
        else:
            raise TokenFilesError(f"no file or folder {source}: name text files or folders")
    if not paths:
        raise TokenFilesError(f"no files in {', '.join(map(str, sources))}: nothing to prepare")
    return paths


def _pieces(path: Path, val_share: float) -> Iterator[Piece]:
    """The pieces of a file's training part, then of its held-out part."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        split_at = _cut_after(f, int(size * (1 - val_share)), size) if val_share else size
        for split, (start, end) in zip(SPLITS, [(0, split_at), (split_at, size)], strict=True):
            while start < end:
                stop = _cut_after(f, start + PIECE_BYTES, end)
                yield Piece(str(path), start, stop, split, stop == end)
                start = stop


def _cut_after(f, position: int, end: int) -> int:
    """The first safe cut at or after `position` and before `end` (see `_CUT`), else `end`.
    A cut's pattern starts at most two bytes before it; blocks overlap by four bytes."""
    while position < end:
        base = max(position - 2, 0)
        f.seek(base)
        block = f.read(_SEARCH + 4)
        match = next((m for m in _CUT.finditer(block) if base + m.end() >= position), None)
        if match is not None:
            return min(base + match.end(), end)
        if len(block) < _SEARCH + 4:
            return end
        position += _SEARCH
    return end


def _encode_all(pieces: list[Piece], tokenizer: str, workers: int):
    """(piece, token ids) for every piece, in order: in `workers` processes when more than one."""
    if workers <= 1:
        _start_worker(tokenizer)
        yield from zip(pieces, map(_encode, pieces), strict=True)
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
    with _workers_skip_main(), context.Pool(workers, _start_worker, (tokenizer,)) as pool:
        yield from zip(pieces, pool.imap(_encode, pieces), strict=True)


@contextlib.contextmanager
def _workers_skip_main():
    """Spawned workers start by running the main script again unless it has an
    `if __name__ == "__main__":` guard (a lab read as a notebook has none); these workers need
    nothing from it, so they are not told where it is while they start."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None) if getattr(main, "__spec__", None) is None else None
    if path is not None:
        del main.__file__
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


_TOKENIZER = None


def _start_worker(name: str) -> None:
    global _TOKENIZER
    from gptflax.sources import load_tokenizer

    _TOKENIZER = load_tokenizer(name)


def _encode(piece: Piece) -> np.ndarray:
    """The token ids of one piece (special tokens written in the text are ordinary text)."""
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenFilesError(
            f"{piece.path} is not UTF-8 text (byte {data[e.start]:#04x} at position "
            f"{piece.start + e.start}): save it as UTF-8 or leave it out"
        ) from None
    encode = getattr(_TOKENIZER, "encode_ordinary", None) or _TOKENIZER.encode
    return np.asarray(encode(text), dtype=np.int64)


class _TokenWriter:
    """Appends token ids to a temporary file beside `path`, hashing them; `close` moves it into
    place and returns what the manifest records of it."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.partial")
        self.file, self.hash, self.tokens = open(self.tmp, "wb"), hashlib.sha256(), 0  # noqa: SIM115

    def write(self, ids: np.ndarray) -> None:
        data = ids.tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.tokens += len(ids)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "tokens": self.tokens, "sha256": self.hash.hexdigest()}


def _document(path: Path, counts: dict) -> Document:
    stat = path.stat()
    return Document(str(path), stat.st_size, stat.st_mtime_ns, sha256_of(path),
                    counts[(str(path), "train")], counts[(str(path), "val")])  # fmt: skip


def _up_to_date(manifest: dict, settings: dict, paths: list[Path], out: Path) -> bool:
    """Whether `manifest` holds these sources, unchanged, prepared with these settings, and its
    token files are there at their sizes."""
    if any(manifest.get(k) != v for k, v in settings.items()):
        return False
    documents = manifest["documents"]
    if [d["source"] for d in documents] != [str(p) for p in paths]:
        return False
    for doc, path in zip(documents, paths, strict=True):
        stat = path.stat()
        if stat.st_size != doc["bytes"]:
            return False
        if stat.st_mtime_ns != doc["mtime_ns"] and sha256_of(path) != doc["sha256"]:
            return False
    width = np.dtype(manifest["dtype"]).itemsize
    paths = {out / f["file"]: width * f["tokens"] for f in manifest["files"].values()}
    return all(path.is_file() and path.stat().st_size == size for path, size in paths.items())


def _read_manifest(path: Path) -> dict:
    """The manifest at `path`, or a one-line error when it is missing or not whole."""
    if not path.is_file():
        raise TokenFilesError(
            f"{path.parent} holds no {MANIFEST}: it is not a folder of finished token files; "
            f"prepare it with: python -m gptflax prepare SOURCES --out {path.parent}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, this gptflax reads {FORMAT}")
        for key in ("tokenizer", "vocab_size", "eos_id", "dtype", "files", "documents"):
            manifest[key]  # noqa: B018 (a KeyError says which is missing)
    except (ValueError, KeyError, UnicodeDecodeError, AttributeError) as e:
        raise TokenFilesError(
            f"{path} is damaged or half-written ({type(e).__name__}: {e}): prepare the token "
            "files again"
        ) from None
    return manifest


def _summary(manifest: dict) -> str:
    count = {split: manifest["files"][split]["tokens"] for split in SPLITS}
    return (
        f"{len(manifest['documents'])} document(s), {count['train']:,} training and "
        f"{count['val']:,} held-out {manifest['tokenizer']} tokens ({manifest['dtype']})"
    )


class TokenFiles:
    """Prepared token files, opened read-only as memory maps after checking every file against
    the manifest (`open`): each split's tokens and each document's span in them."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.tokenizer, self.vocab_size = manifest["tokenizer"], manifest["vocab_size"]

    @classmethod
    def open(cls, folder: str | Path, *, verify: bool = True) -> TokenFiles:
        """The token files in `folder`; with `verify`, each one's size and sha256 are checked
        against the manifest (a one-line error names the file that differs)."""
        folder = Path(folder)
        manifest = _read_manifest(folder / MANIFEST)
        width = np.dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            entry = manifest["files"][split]
            path = folder / entry["file"]
            redo = f"prepare {folder} again"
            if not path.is_file():
                raise TokenFilesError(f"{path} is missing, though {MANIFEST} lists it: {redo}")
            if path.stat().st_size != width * entry["tokens"]:
                raise TokenFilesError(
                    f"{path} holds {path.stat().st_size:,} bytes, the manifest says "
                    f"{width * entry['tokens']:,}: it was changed or cut short; {redo}"
                )
            if verify and sha256_of(path) != entry["sha256"]:
                raise TokenFilesError(f"{path} does not match its sha256 in {MANIFEST}: {redo}")
        return cls(folder, manifest)

    def tokens(self, split: str) -> np.ndarray:
        """A split's token ids: a read-only memory map, nothing read until it is indexed."""
        entry = self.manifest["files"][split]
        if entry["tokens"] == 0:
            return np.zeros(0, self.manifest["dtype"])
        return np.memmap(self.folder / entry["file"], self.manifest["dtype"], "r")

    def document_lengths(self, split: str) -> np.ndarray:
        """Tokens of each document's part in a split, in file order (end-of-text included)."""
        return np.array([d[f"{split}_tokens"] for d in self.manifest["documents"]], np.int64)

    def fingerprint(self) -> dict:
        """What a run records of its data: the folder, its token bytes, one sha256 over its
        token files' hashes."""
        hashes = "".join(self.manifest["files"][s]["sha256"] for s in SPLITS)
        width = np.dtype(self.manifest["dtype"]).itemsize
        size = width * sum(self.manifest["files"][s]["tokens"] for s in SPLITS)
        return {"file": str(self.folder.absolute()), "bytes": size,
                "sha256": hashlib.sha256(hashes.encode()).hexdigest()}  # fmt: skip
