"""gptflax.files: cache -> mirrors -> download, verified every time, never half-written."""

import hashlib
import http.server
import json
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from gptflax import files
from gptflax.files import DataFile, DataFileError, resolve

pytestmark = pytest.mark.lab2

BOOK_FILES = [
    "the-verdict.txt",
    "instruction-data.json",
    "sms_spam_collection/SMSSpamCollection.tsv",
    "gpt2.tiktoken",
]


def spec_for(content: bytes, name="f.txt", urls=(), member=None) -> DataFile:
    return DataFile(name, urls, hashlib.sha256(content).hexdigest(), len(content), member, "test")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", BOOK_FILES)
def test_book_files_resolve_from_the_mirror_and_verify(name, tmp_path):
    path = resolve(name, cache_dir=tmp_path)
    spec = files.FILES[name]
    assert path.stat().st_size == spec.size
    assert files.sha256_of(path) == spec.sha256
    assert path.parent != tmp_path  # found in a mirror: nothing copied into the cache
    assert spec.urls[0].startswith("https://")


def test_gpt2_weights_are_named_for_every_book_size():
    for size in ("124M", "355M", "774M", "1558M"):
        spec = files.FILES[f"gpt2/{size}/model.safetensors"]
        assert spec.urls[0].startswith("https://huggingface.co/openai-community/gpt2")


def test_cache_comes_before_the_mirror(tmp_path):
    mirror_path = resolve("the-verdict.txt")
    cached = tmp_path / "the-verdict.txt"
    cached.write_bytes(mirror_path.read_bytes())
    assert resolve("the-verdict.txt", cache_dir=tmp_path) == cached


def test_a_corrupt_cache_copy_is_reported_once_and_replaced_by_the_mirrors(tmp_path, capsys):
    (tmp_path / "the-verdict.txt").write_text("not the story")
    path = resolve("the-verdict.txt", cache_dir=tmp_path)
    assert path == tmp_path / "the-verdict.txt"
    assert files.sha256_of(path) == files.FILES["the-verdict.txt"].sha256
    assert capsys.readouterr().err.count("was damaged") == 1
    resolve("the-verdict.txt", cache_dir=tmp_path)  # the repaired copy: nothing more to say
    assert "damaged" not in capsys.readouterr().err


def test_a_corrupt_only_copy_is_an_error_that_says_so(tmp_path):
    content = b"right bytes"
    (tmp_path / "f.txt").write_bytes(b"wrong bytes")  # same size, other hash
    with pytest.raises(DataFileError) as err:
        resolve(spec_for(content), cache_dir=tmp_path, mirrors=[])
    message = str(err.value)
    assert "sha256" in message and str(tmp_path / "f.txt") in message


def test_missing_everywhere_names_every_place_tried_and_the_fix(tmp_path):
    spec = spec_for(b"x", urls=("https://example.invalid/f.txt",))
    mirror = tmp_path / "mirror"
    with pytest.raises(DataFileError) as err:
        resolve(spec, cache_dir=tmp_path / "cache", mirrors=[mirror], download=False)
    message = str(err.value)
    assert "'f.txt'" in message
    assert str(tmp_path / "cache" / "f.txt") in message and str(mirror / "f.txt") in message
    assert "offline" in message and "https://example.invalid/f.txt" in message
    assert "put it at" in message and "GPTFLAX_MIRROR" in message


def test_mirror_folders_come_from_the_environment(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    (b / "f.txt").write_bytes(b"hello")
    monkeypatch.setenv("GPTFLAX_MIRROR", f"{a}:{b}")
    assert files.default_mirrors() == [a, b]
    assert resolve(spec_for(b"hello"), cache_dir=tmp_path / "cache") == b / "f.txt"


def test_download_from_a_file_url_verifies_then_moves_into_place(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_bytes(b"some text" * 1000)
    cache = tmp_path / "cache"
    spec = spec_for(source.read_bytes(), name="sub/f.txt", urls=(source.as_uri(),))
    path = resolve(spec, cache_dir=cache, mirrors=[], download=True)
    assert path == cache / "sub" / "f.txt" and path.read_bytes() == source.read_bytes()
    assert leftovers(cache) == ["f.txt"]  # no temporary file left behind


def test_a_download_with_a_bad_checksum_leaves_nothing(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_bytes(b"tampered!")
    cache = tmp_path / "cache"
    spec = spec_for(b"original!", urls=(source.as_uri(),))
    with pytest.raises(DataFileError, match="sha256"):
        resolve(spec, cache_dir=cache, mirrors=[], download=True)
    assert leftovers(cache) == []


def test_a_failed_download_keeps_the_users_file(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "f.txt").write_bytes(b"user's own edit")
    source = tmp_path / "remote.txt"
    source.write_bytes(b"bad")
    with pytest.raises(DataFileError, match="sha256"):
        resolve(
            spec_for(b"good", urls=(source.as_uri(),)), cache_dir=cache, mirrors=[], download=True
        )
    assert (cache / "f.txt").read_bytes() == b"user's own edit"


def test_zip_member_is_extracted_and_verified(tmp_path):
    archive = tmp_path / "spam.zip"
    content = b"ham\thello\nspam\twin money\n"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme", "about")
        zf.writestr("SMSSpamCollection", content)
    spec = spec_for(
        content, name="sms/SMS.tsv", urls=(archive.as_uri(),), member="SMSSpamCollection"
    )
    path = resolve(spec, cache_dir=tmp_path / "cache", mirrors=[], download=True)
    assert path.read_bytes() == content
    assert leftovers(tmp_path / "cache") == ["SMS.tsv"]


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=5)


def test_download_over_http_with_fallback_to_a_second_url(tmp_path, http_server):
    root, base = http_server
    content = bytes(range(256)) * 4096  # 1 MiB: more than one chunk
    (root / "f.bin").write_bytes(content)
    spec = spec_for(content, name="f.bin", urls=(f"{base}/missing.bin", f"{base}/f.bin"))
    path = resolve(spec, cache_dir=tmp_path / "cache", mirrors=[], download=True)
    assert path.read_bytes() == content


def test_http_404_is_reported_with_its_url(tmp_path, http_server):
    _, base = http_server
    spec = spec_for(b"x", urls=(f"{base}/missing.bin",))
    with pytest.raises(DataFileError) as err:
        resolve(spec, cache_dir=tmp_path / "cache", mirrors=[], download=True)
    assert f"{base}/missing.bin" in str(err.value) and "404" in str(err.value)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="the-verdict.txt"):
        resolve("the-verdict.md")


def test_save_json_never_leaves_half_a_file(tmp_path):
    path = files.save_json([{"a": 1}], tmp_path / "out.json")
    with pytest.raises(TypeError):
        files.save_json([{"a": object()}], path)
    assert json.loads(path.read_text()) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
