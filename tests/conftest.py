"""Test setup: offline data resolution, 8 simulated CPU devices, exact matmuls, a tiny config."""

import ctypes
import ctypes.util
import gc
import os

os.environ["GPTFLAX_OFFLINE"] = "1"  # no test touches the network
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX call: sharding tests
jax.config.update("jax_default_matmul_precision", "highest")

from gptflax import files, sources  # noqa: E402
from gptflax.config import TINY  # noqa: E402

LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "cpu":
        skip = pytest.mark.skip(reason="needs a GPU; this run has only the CPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def models_unloaded_after_each_module():
    """A test worker runs many modules, each loading the real models it needs: they are let go
    after it, and the memory they took is returned to the system, so that a worker does not keep
    every module's peak (one reached 15 GB and was killed for memory). Measured on Qwen2.5-Coder
    0.5B loaded by transformers and by gptflax: 6.4 GB, 3.0 GB after unloading, 1.1 GB after
    malloc_trim."""
    yield
    sources.unload_models()
    gc.collect()
    if hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)  # give the freed heap back: glibc keeps it, a worker's RSS only grows


@pytest.fixture
def compiles():
    """compiles("name"): how many times XLA has compiled the jitted function `name` during the
    test, counted from JAX's public compile events (jax.monitoring); a cache hit is not one."""
    names = []

    def listen(event: str, duration: float, **meta):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(meta.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield lambda name: names.count(f"jit({name})")
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="session")
def verdict_text() -> str:
    """The book's ch. 2/5 corpus, from the mirror (tests run offline)."""
    return files.resolve("the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def small_cfg():
    """TINY with a 97-token vocabulary: for tests that need no real text, compiles fast."""
    return TINY.replace(vocab_size=97)


@pytest.fixture(scope="session")
def smollm2():
    """(cfg, params) of SmolLM2-135M-Instruct, loaded once per test run (a few seconds)."""
    from gptflax import sources

    return sources.load_model("smollm2-135m-instruct")[1:3]
