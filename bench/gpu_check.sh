#!/usr/bin/env bash
# The GPU check of the fast-path issue: kandinsky22 against the reference (diffusers) at full size, in one process on
# the same random-weight components (bench/bench_pipeline.py). Run from the repository root on the GPU machine, with
# the reference's wheels (diffusers, plus any dependency the machine lacks) in .whl/:
#
#     bash bench/gpu_check.sh            # results and log in $OUT (else bench/results); extra arguments go to the
#                                        # benchmark (bash bench/gpu_check.sh --tiny: the same run on the CPU)
#
# BUDGET_S (default 480) is the benchmark's own deadline, counted from its start: it skips what would end later.
# Give the command about 150 s more than that (imports, pip, the CUDA-only tests, the last measurement running over);
# TESTS=0 skips those tests (a second call in one session).
set -uo pipefail

OUT="${OUT:-bench/results}"
BUDGET_S="${BUDGET_S:-480}"
mkdir -p "$OUT"
LOG="$OUT/bench_pipeline.log"

{
  echo "== $(date -u +%FT%TZ) gpu_check.sh, budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
} | tee "$LOG"

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: carry the folder holding the diffusers wheel" | tee -a "$LOG"
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | tee -a "$LOG"
export PYTHONPATH="/tmp/site:$PWD/src"

# Everything the benchmark imports, with versions; a missing module is named before any time is spent.
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import importlib, sys
missing = []
for name in ("torch", "transformers", "diffusers", "safetensors", "huggingface_hub", "numpy", "PIL", "tqdm", "regex"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
if missing:
    sys.exit("missing: " + "; ".join(missing) + " -- add their wheels to .whl/")
import torch
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed: the Triton norms are not measured")
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || exit "$status"

# The CUDA-only tests (skipped in CI): no host sync inside a sampler step, also with a CPU generator; offloading to
# the GPU gives the images of a resident pipeline; the fast path's CUDA graphs give the eager images; the Triton
# norms' kernels and models (compiled for real here, not interpreted). About a minute and a half; TEST_FILES picks
# other test files.
if [ "${TESTS:-1}" = 0 ]; then
  echo "TESTS=0: CUDA-only tests not run" | tee -a "$LOG"
elif python3 -c "import pytest" 2>/dev/null; then
  # shellcheck disable=SC2086  # TEST_FILES: a list of paths
  timeout 300 python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/test_schedulers_cuda.py \
    tests/pipelines/test_offload_cuda.py tests/pipelines/test_fast_cuda.py tests/test_norms.py} 2>&1 | tail -25 \
    | tee -a "$LOG"
else
  echo "pytest not importable here: CUDA-only tests not run (carry its wheels in .whl/ to run them)" | tee -a "$LOG"
fi

# GPU time of each distinct norm call of a 768² UNet step and MoVQ decode, per path (Triton's three kernels, its one
# kernel, PyTorch's ops): where the one-kernel path should end. Compiles extra Triton variants: up to ~1 min cold,
# into a cache of its own, so that the benchmark's first Triton-norm call still compiles from a cold one.
# NORM_PATHS=0 skips it.
if [ "${NORM_PATHS:-1}" != 0 ] && python3 -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
  TRITON_CACHE_DIR="$(mktemp -d)" timeout 150 python3 bench/norm_paths.py --out "$OUT/norm_paths.json" 2>&1 \
    | tail -15 | tee -a "$LOG"
fi

PYTHONUNBUFFERED=1 python3 bench/bench_pipeline.py --budget-s "$BUDGET_S" --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
