"""K-quants (q4_k_m, q5_k_m, q6_k) of a GGUF with llama.cpp's own quantizer, `llama_model_quantize` (what
`llama-quantize` runs), from the llama-cpp-python package: the optional `medtune[gguf]` extra (no wheel on PyPI:
pip builds llama.cpp from source with cmake, which took 61 minutes on 2 busy cores; minutes on a free 8-core box).

It runs in a child process (`python -m medtune.export.quantize IN OUT TYPE`): llama.cpp logs to the C stderr,
and a crash in C must not take medtune down; the log's last line becomes the error message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medtune.errors import MedtuneError

# medtune's name → llama.cpp's llama_ftype (LLAMA_FTYPE_MOSTLY_*). Tensors whose rows are not a multiple of 256
# (tiny models) fall back to a 32-block type (q5_0/q8_0), as llama-quantize does.
LLAMA_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
INSTALL_HINT = ("pip install 'medtune[gguf]' (llama-cpp-python: pip builds llama.cpp from source; set "
                "CMAKE_BUILD_PARALLEL_LEVEL to your core count)")


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_llama_cpp(what: str) -> None:
    if not have_llama_cpp():
        raise MedtuneError(f"{what} needs llama.cpp's Python bindings: {INSTALL_HINT}")


def quantize(src: Path, dst: Path, quant: str) -> None:
    """Write `dst` as the `quant` k-quant of the f16/f32 GGUF `src`; `dst` appears only when it worked."""
    if quant not in LLAMA_FTYPES:
        raise MedtuneError(f"unknown llama.cpp quantisation '{quant}': use {', '.join(LLAMA_FTYPES)}",
                           field="--quant")
    require_llama_cpp(f"--quant {quant}")
    tmp = dst.with_name(dst.name + ".tmp")
    done = subprocess.run([sys.executable, "-m", "medtune.export.quantize", str(src), str(tmp), quant],
                          capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise MedtuneError(f"llama.cpp's quantizer failed: {lines[-1].strip() if lines else '(no output)'}",
                           file=str(src))
    tmp.rename(dst)


def _main(src: str, dst: str, quant: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if code != 0:
        print(f"llama_model_quantize returned {code}", file=sys.stderr)
    return 1 if code != 0 else 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:4]))
