"""The glibc mmap-threshold fix: activation-sized blocks freed between long-lived small ones go back to the OS.
Each case runs in a fresh interpreter (mallopt settings are per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
