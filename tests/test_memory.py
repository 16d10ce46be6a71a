"""glibc's heap on huge pages: the environment `python -m gptflax` runs itself again with."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gptflax.memory import HUGE_PAGES, huge_pages_env

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's tunable")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A child that asks for huge pages as `python -m gptflax` does, fills 64 MB from the heap, and
# prints its GLIBC_TUNABLES and the kB of its memory on huge pages.
CHILD = """
import os
from gptflax.memory import with_huge_pages
with_huge_pages()
data = b"x" * (64 << 20)
huge = [line.split()[1] for line in open("/proc/self/smaps_rollup") if "AnonHugePages" in line]
print(os.environ.get("GLIBC_TUNABLES"), huge[0])
"""


@glibc_only
def test_huge_pages_env_adds_the_tunable_once_and_keeps_the_others():
    assert huge_pages_env({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": f"{HUGE_PAGES}=1"}
    other = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    assert huge_pages_env(other)["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{HUGE_PAGES}=1"
    assert huge_pages_env({"GLIBC_TUNABLES": f"{HUGE_PAGES}=1"}) is None  # already there
    assert huge_pages_env({"GLIBC_TUNABLES": f"{HUGE_PAGES}=0"}) is None  # the user's opt-out


def run_child(tunables: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
@pytest.mark.skipif(
    not THP.exists() or "[madvise]" not in THP.read_text(),
    reason="needs transparent huge pages given only where asked for",
)
def test_with_huge_pages_reruns_the_process_with_its_heap_on_huge_pages():
    tunables, huge_kb = run_child(None)
    assert tunables == f"{HUGE_PAGES}=1" and huge_kb > 0  # the process ran again, asking
    tunables, huge_kb = run_child(f"{HUGE_PAGES}=0")
    assert tunables == f"{HUGE_PAGES}=0" and huge_kb == 0  # opted out: not run again, 4 KB pages
