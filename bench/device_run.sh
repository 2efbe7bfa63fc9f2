#!/usr/bin/env bash
# One call on a GPU machine: build the extension with CUDA, run the GPU tests, run the
# benchmarks, and write logs and JSON results to OUTDIR (at most 8 files come back).
#
#   bench/device_run.sh OUTDIR [STEP ...]
#
# STEPs (default: build tests bench):
#   build[=REGEX]       pip install --no-build-isolation -e . with CUDA (FOMOE_CUDA=1); if that
#                       fails and REGEX is given, retry building only the CUDA files it matches
#   tests[=PATHS]       pytest the GPU tests (default: everything marked 'cuda')
#   bench[=SCRIPTS]     run bench/bench_*.py (or the named scripts), each writing OUTDIR/<name>.json
#   sanitizer           compute-sanitizer memcheck + racecheck over bench/sanitize_cases.py
#   diagnose            toolchain facts, and bad-input errors each in its own process (a crash
#                       there gets a native backtrace from cuda-gdb)
# Wheels in .whl/ (packages the GPU image lacks) are installed to /tmp/site first.
set -uo pipefail
OUT_DIR=${1:?usage: bench/device_run.sh OUTDIR [STEP ...]}
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests bench)
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."

# NVLink multicast stays off on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

status=0
for step in "${STEPS[@]}"; do
  name=${step%%=*}
  arg=""; [[ "$step" == *=* ]] && arg=${step#*=}
  case "$name" in
    build)
      echo "== build"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
      start=$(date +%s)
      if ! FOMOE_CUDA=1 FOMOE_BUILD_JOBS=${FOMOE_BUILD_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT_DIR/build.log" 2>&1; then
        echo "BUILD FAILED"; grep -E "error|Error" "$OUT_DIR/build.log" | head -30
        [ -n "${arg}" ] || exit 1
        # build=REGEX: retry with only the kernel families REGEX selects, so the rest still runs.
        echo "retrying with FOMOE_CUDA_SOURCES='$arg'"; status=1
        FOMOE_CUDA_SOURCES="$arg" FOMOE_CUDA=1 FOMOE_BUILD_JOBS=${FOMOE_BUILD_JOBS:-16} \
          $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build-retry.log" 2>&1 \
          || { echo "RETRY FAILED"; tail -40 "$OUT_DIR/build-retry.log"; exit 1; }
      fi
      echo "built in $(( $(date +%s) - start )) s"
      $PY -c "import fomoe, torch; print('fomoe', fomoe.__version__, 'cuda kernels:', fomoe.WITH_CUDA, 'fallbacks:', fomoe.ops.reference_fallbacks(), 'torch', torch.__version__)"
      ;;
    tests)
      echo "== tests ${arg:-(-m cuda)}"
      # Parallel workers when pytest-xdist is there: faster, and a crashing test loses one worker, not the run.
      xdist=""; $PY -c "import xdist" 2> /dev/null && xdist="-n ${FOMOE_TEST_WORKERS:-4}"
      if [ -n "$arg" ]; then
        $PY -m pytest -q -rs $xdist ${arg//,/ } 2>&1 | tee -a "$OUT_DIR/tests.log" | tail -40; rc=${PIPESTATUS[0]}
      else
        $PY -m pytest -q -rs $xdist -m cuda tests 2>&1 | tee -a "$OUT_DIR/tests.log" | tail -40; rc=${PIPESTATUS[0]}
      fi
      [ "$rc" -ne 0 ] && status=1
      ;;
    bench)
      scripts=${arg:-$(ls bench/bench_*.py 2>/dev/null | tr '\n' ',')}
      for script in ${scripts//,/ }; do
        [ -f "$script" ] || continue
        echo "== $script"
        $PY "$script" --json "$OUT_DIR/$(basename "$script" .py).json" 2>&1 | tee -a "$OUT_DIR/bench.log" | tail -40
        [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
      done
      ;;
    sanitizer)
      echo "== compute-sanitizer"
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 9 $PY bench/sanitize_cases.py \
          > "$OUT_DIR/sanitizer-$tool.log" 2>&1; rc=$?
        echo "$tool: exit $rc"; tail -5 "$OUT_DIR/sanitizer-$tool.log"
        [ "$rc" -ne 0 ] && status=1
      done
      ;;
    diagnose)
      echo "== diagnose"
      { c++ --version | head -1; nvcc --version | tail -1; cmake --version | head -1
        $PY -c "import torch; print('torch', torch.__version__, 'cxx11 abi', torch.compiled_with_cxx11_abi())"
        so=$(ls fomoe/_C*.so 2>/dev/null | head -1); [ -n "$so" ] && ldd "$so" | grep -E "stdc|c10|torch|nccl|cuda"
        $PY -c "import fomoe, os; print([l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l][:1])"
      } 2>&1 | tee -a "$OUT_DIR/diagnose.log"
      $PY bench/diagnose_errors.py 2>&1 | tee -a "$OUT_DIR/diagnose.log"
      if [ "${PIPESTATUS[0]}" -ne 0 ] && command -v cuda-gdb > /dev/null; then
        $PY bench/toolchain_probe.py 2>&1 | tee -a "$OUT_DIR/diagnose.log"
        cuda-gdb -batch -ex run -ex bt --args $PY -c "import torch, fomoe; fomoe.ops.route(torch.randn(4, 3), 0)" \
          2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40 | tee -a "$OUT_DIR/diagnose.log"
      fi
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
