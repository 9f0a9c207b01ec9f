"""CPU memory: how freed activation memory gets back to the OS, or stays for reuse without fragmenting.

A training step allocates and frees a few GB of activations. glibc's malloc serves requests above its mmap
threshold with fresh mappings and returns them on free, but it raises that threshold each time such a block is
freed (up to 32 MB), so from the second step on the activations (1-5 MB tensors) come from the heap, which
fragments and keeps growing: measured on SmolLM2-135M, batch 4 x 512, peak RSS 3.5 GB after step 1 and 4.3 GB
from step 2 on. Two cures:

- a caching allocator (jemalloc, else tcmalloc) preloaded into the process (`use_caching_allocator`): size
  classes and per-size reuse, so the heap neither fragments nor faults in fresh pages every step. Used by
  `medtune train` on CPU whenever the library is installed (`make setup` installs Debian's libjemalloc2 where it
  can); the process re-executes itself once with LD_PRELOAD set. Opt out with MEDTUNE_ALLOCATOR=system.
- a fixed glibc mmap threshold (`return_freed_memory_to_os`, `train.release_memory`): peak 3.0 GB at every
  step, but every step then faults in fresh zeroed pages for all its activations: measured 6.7 -> 9.5 s per
  step (~40 % slower). For machines short of memory rather than time, when no caching allocator is present.
Linux only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("medtune")

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024  # blocks at least this large get their own mapping, returned to the OS on free

ENV_CHOICE = "MEDTUNE_ALLOCATOR"  # auto (default): jemalloc, else tcmalloc, else the system's; or system / a path
ENV_DONE = "MEDTUNE_ALLOCATOR_PRELOADED"  # set on the re-executed process: never re-execute twice
LIBRARIES = ("libjemalloc.so.2", "libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# jemalloc: give unused dirty pages back after 10 s instead of keeping them for ever between steps of a long run
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:10000"


def return_freed_memory_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (and trim the heap top eagerly); True when glibc accepted it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, threshold) == 1


def find_caching_allocator(choice: str | None = None, dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
    """The shared library to preload: MEDTUNE_ALLOCATOR as a path, or the first of LIBRARIES found in `dirs`;
    None for `system` (or `glibc`, `off`) or when none is installed."""
    choice = (choice if choice is not None else os.environ.get(ENV_CHOICE, "auto")).strip()
    if choice.lower() in ("system", "glibc", "off", "none", "0"):
        return None
    if choice and choice.lower() != "auto":
        return choice if Path(choice).is_file() else None
    for name in LIBRARIES:
        for d in dirs:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return None


def preloaded_allocator() -> str | None:
    """The caching allocator this process runs with (from LD_PRELOAD), or None."""
    for entry in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if any(Path(entry).name.startswith(name.split(".so")[0]) for name in LIBRARIES):
            return entry
    return None


def preload_env(env: dict[str, str], library: str) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD, jemalloc's decay settings (unless set) and the once-only mark."""
    out = dict(env)
    out["LD_PRELOAD"] = " ".join([library, *out.get("LD_PRELOAD", "").split()])
    if "jemalloc" in Path(library).name:
        out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    out[ENV_DONE] = library
    return out


def use_caching_allocator() -> None:
    """Re-execute this process with a caching allocator preloaded, once, on Linux, when one is installed and the
    process does not already run with one (or has been re-executed before). Returns only when nothing is done;
    call it first thing, before threads or files are opened."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_DONE) or preloaded_allocator():
        return
    library = find_caching_allocator()
    if library is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, preload_env(dict(os.environ), library))
    except OSError as e:  # cannot re-execute: carry on with the system allocator
        log.debug("allocator: re-exec with %s failed: %s", library, e)
