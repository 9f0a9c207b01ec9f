"""CPU memory: how freed activation memory gets back to the OS, or stays for reuse without fragmenting.

A training step allocates and frees a few GB of activations. glibc's malloc serves requests above its mmap
threshold with fresh mappings and returns them on free, but it raises that threshold each time such a block is
freed (up to 32 MB), so from the second step on the activations (1-12 MB tensors) come from the heap, which
fragments and keeps growing. Measured on SmolLM2-135M, batch 4 x 512, fp32 (bench/RESULTS.md, AVX2 EPYC):
glibc peaks at 4.0 GB, tcmalloc at 3.25 GB. Two cures:

- a caching allocator preloaded into the process (`use_caching_allocator`): tcmalloc (else jemalloc) keeps
  freed pages for reuse by size class, so the heap neither fragments nor faults in fresh pages every step
  (tcmalloc: ~3,000 page faults per step from step 3 on; glibc ~230,000; jemalloc, whose decay hands pages back,
  1.8 million). `medtune train` on CPU re-executes itself once with LD_PRELOAD set whenever the library is
  installed (`make setup` installs Debian's libtcmalloc-minimal4 where it can). Opt out with
  MEDTUNE_ALLOCATOR=system, or choose a library with MEDTUNE_ALLOCATOR=/path/to/lib.so.
- a fixed glibc mmap threshold (`return_freed_memory_to_os`, `train.release_memory`): about the same peak, but
  every step faults in fresh zeroed pages for all its activations (3.4 million faults, ~40 % slower steps). For
  machines short of memory without a caching allocator; with `train.release_memory` no allocator is preloaded.
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

ENV_CHOICE = "MEDTUNE_ALLOCATOR"  # auto (default): tcmalloc, else jemalloc, else the system's; or system / a path
ENV_DONE = "MEDTUNE_ALLOCATOR_PRELOADED"  # set on the re-executed process: never re-execute twice
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# jemalloc (used when tcmalloc is absent): keep freed pages for the next step. Its default decay hands them back to
# the OS between steps, and every step then faults them in again (1.8 million faults per step, 25-40 % more CPU).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


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


def allocator_for_training(device: str, release_memory: bool) -> None:
    """What `medtune train` calls first: a caching allocator for CPU training, unless `train.release_memory` asks
    for glibc's release-at-once mode instead (the two do not combine) or the run is on CUDA."""
    if device != "cuda" and not release_memory:
        use_caching_allocator()


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
