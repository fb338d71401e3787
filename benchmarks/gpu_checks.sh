#!/usr/bin/env bash
# Every GPU check in one go, for a machine with CUDA but no network: installs the carried
# wheels (.whl/: megatron-core, flash-linear-attention, fla-core, einops), maps the two
# import packages onto this checkout, then runs the `gpu` tests and the benchmarks.
#
#   bash benchmarks/gpu_checks.sh [tests|bench|model|all]   (results under $OUT or ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
out="${OUT:-gpu_out}"
mkdir -p "$out"

site=/tmp/site
if [ -d .whl ] && [ ! -d "$site/megatron" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || exit 1
fi
mkdir -p "$site"
ln -sfn "$PWD/kernels" "$site/nsa_kernels"
ln -sfn "$PWD/megatron_nsa" "$site/megatron_nsa"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

python3 - <<'PY'
import torch, triton
import megatron.core
import megatron_nsa, nsa_kernels
print(f"torch {torch.__version__}, triton {triton.__version__}, "
      f"megatron-core {megatron.core.__version__}, {torch.cuda.get_device_name()}")
PY

status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" \
    || status=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in window selected compressed nsa; do
    [ -f "benchmarks/bench_$b.py" ] || continue
    python3 "benchmarks/bench_$b.py" --out "$out/bench_$b.md" 2>&1 | tee "$out/bench_$b.log" \
      || status=1
  done
fi
if [ "$what" = model ] || [ "$what" = all ]; then
  [ -f benchmarks/bench_model.py ] && { python3 benchmarks/bench_model.py --out "$out/bench_model.md" \
    2>&1 | tee "$out/bench_model.log" || status=1; }
fi
exit $status
