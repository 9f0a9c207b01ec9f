"""The glibc mmap-threshold fix: activation-sized blocks freed between long-lived small ones go back to the OS.
Each case runs in a fresh interpreter (mallopt settings are per process). Then the caching allocator: found,
preloaded through one re-execution, never twice, never when opted out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medtune.train.allocator import JEMALLOC_CONF, find_caching_allocator, preload_env

SCRIPT = """
import sys, torch
from medtune.train.allocator import return_freed_memory_to_os
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "fix":
    assert return_freed_memory_to_os()
survivors, base = [], rss()
for _ in range(3):  # three "steps": 300 activation-sized blocks, each followed by a small tensor that stays
    blocks = []
    for i in range(300):
        blocks.append(torch.ones(512 * 1024 + i))  # ~2 MB
        survivors.append(torch.ones(1000))
    del blocks
print(rss() - base)
"""


def _retained_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_activations_go_back_to_the_os():
    assert _retained_mb("default") > 300  # glibc's rising threshold keeps the freed blocks in a fragmented heap
    assert _retained_mb("fix") < 50


REEXEC = """
import os, sys
from medtune.train.allocator import allocator_for_training, use_caching_allocator
print("start", flush=True) if os.environ.get("MEDTUNE_ALLOCATOR_PRELOADED") else None
{"any": use_caching_allocator, "cpu": lambda: allocator_for_training("cpu", False),
 "cuda": lambda: allocator_for_training("cuda", False), "release": lambda: allocator_for_training("cpu", True)}[sys.argv[1]]()
print("preload", os.environ.get("LD_PRELOAD"), sys.argv[1:])
"""


def _libc_path() -> str:
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return path
    pytest.skip("no libc mapping found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_reexecutes_once_with_the_library_preloaded():
    lib = _libc_path()  # a library that is harmless to preload
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MEDTUNE_ALLOCATOR_PRELOADED")}

    def run(*args: str, choice: str = lib) -> list[str]:
        return subprocess.run([sys.executable, "-c", REEXEC, *args], capture_output=True, text=True, check=True,
                              env={**env, "MEDTUNE_ALLOCATOR": choice}).stdout.splitlines()

    assert run("any", "b") == ["start", f"preload {lib} ['any', 'b']"]  # ran again from the top, same arguments, once
    assert run("cpu") == ["start", f"preload {lib} ['cpu']"]
    assert run("any", choice="system") == ["preload None ['any']"]  # opted out: no re-execution
    assert run("cuda") == ["preload None ['cuda']"]
    assert run("release") == ["preload None ['release']"]  # train.release_memory: glibc's mode instead


def test_finds_the_first_installed_library(tmp_path):
    assert find_caching_allocator("auto", dirs=(str(tmp_path),)) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert find_caching_allocator("auto", dirs=(str(tmp_path),)) == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # preferred: no page faults from step 2 on
    assert find_caching_allocator("auto", dirs=(str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")
    assert find_caching_allocator("system", dirs=(str(tmp_path),)) is None
    assert find_caching_allocator(str(tmp_path / "libjemalloc.so.2")) == str(tmp_path / "libjemalloc.so.2")
    assert find_caching_allocator(str(tmp_path / "missing.so")) is None


def test_preload_env_puts_the_library_first():
    env = preload_env({"LD_PRELOAD": "/x/other.so", "PATH": "/bin"}, "/usr/lib/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2 /x/other.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF and env["MEDTUNE_ALLOCATOR_PRELOADED"] == "/usr/lib/libjemalloc.so.2"
    assert preload_env({"MALLOC_CONF": "narenas:1"}, "/l/libjemalloc.so.2")["MALLOC_CONF"] == "narenas:1"
    assert "MALLOC_CONF" not in preload_env({}, "/l/libtcmalloc_minimal.so.4")
