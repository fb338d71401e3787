#!/usr/bin/env bash
# Every GPU check in one go, for a machine with CUDA but no network: installs the carried
# wheels (.whl/: megatron-core, flash-linear-attention, fla-core, einops), maps the two
# import packages onto this checkout, then runs the `gpu` tests and the benchmarks.
#
#   bash benchmarks/gpu_checks.sh [tests|bench|model|all|train|cp|none]  (results: $OUT or ./gpu_out)
#
# train: the 64k training comparison (~6 minutes); cp: the ~350M preset at 64k and 128k on one
# GPU and, with two GPUs, at 128k with CP = 2, as tokens/s per GPU against the one-GPU 64k
# rate (~5 minutes; the one-GPU 128k run peaks at ~104 GiB, so it needs an H200-class GPU);
# none: the setup alone.
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
ln -sfn "$PWD/nsa_kernels" "$site/nsa_kernels"
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
  python3 -m pytest -q -m gpu tests/kernels tests/megatron/test_fusion.py -p no:cacheprovider \
    2>&1 | tee "$out/gpu_tests.log" \
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
if [ "$what" = train ]; then
  # The ~350M preset at 64k on one GPU, ASA (LG) next to dense (D), with each recompute
  # choice; ASA_DATA: a prepared dataset (default: the carried stdlib corpus).
  data="${ASA_DATA:-.gpudata/stdlib32k}"
  for recompute in full mlp; do
    flags="--recompute full"
    [ "$recompute" = mlp ] && flags="--recompute selective --recompute-modules mlp"
    for pattern in LG D; do
      python3 examples/pretrain_asa.py --preset 350m --seq-length 65536 --data "$data" \
        --pattern "$pattern" $flags --train-iters 12 --lr-warmup-iters 10 --log-interval 4 \
        --log-file "$out/train_64k_${pattern}_${recompute}.jsonl" 2>&1 | grep "^step" || status=1
    done
  done
  python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
rate = {}
for log in sorted(Path(sys.argv[1]).glob("train_64k_*.jsonl")):
    rows = [json.loads(line) for line in log.open()]
    rate[log.stem] = statistics.median(r["tokens_per_s"] for r in rows if r["step"] >= 3)
    print(f"{log.stem}: median tokens/s over steps 3+ {rate[log.stem]:,.0f}, "
          f"peak {rows[-1]['peak_mem_gib']:.2f} GiB")
for recompute in ("full", "mlp"):
    asa, dense = rate.get(f"train_64k_LG_{recompute}"), rate.get(f"train_64k_D_{recompute}")
    if asa and dense:
        print(f"recompute {recompute}: ASA / dense = {asa / dense:.2f}x")
PY
fi
if [ "$what" = cp ]; then
  # One GPU at 64k and 128k, then CP = 2 at 128k when there are two GPUs. A CP = 2 rank does
  # half of the one-GPU 128k step's work, so the one-GPU 128k rate bounds its rate per GPU.
  data="${ASA_DATA:-.gpudata/stdlib32k}"
  flags="--preset 350m --data $data --recompute selective --recompute-modules mlp"
  flags="$flags --train-iters 8 --lr-warmup-iters 10 --log-interval 4"
  for seq in 65536 131072; do
    python3 examples/pretrain_asa.py $flags --seq-length $seq \
      --log-file "$out/cp_${seq}_gpus1.jsonl" 2>&1 | grep "^step" || status=1
  done
  if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    python3 -m torch.distributed.run --nproc-per-node 2 examples/pretrain_asa.py $flags \
      --seq-length 131072 --context-parallel-size 2 \
      --log-file "$out/cp_131072_gpus2.jsonl" 2>&1 | grep "^step" || status=1
  fi
  python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
per_gpu = {}
for log in sorted(Path(sys.argv[1]).glob("cp_*_gpus*.jsonl")):
    rows = [json.loads(line) for line in log.open()]
    gpus = int(log.stem.rsplit("gpus", 1)[1])
    per_gpu[log.stem] = statistics.median(
        r["tokens_per_s"] for r in rows if 3 <= r["step"] <= 6) / gpus
base = per_gpu.get("cp_65536_gpus1")
for name, rate in per_gpu.items():
    share = f", {rate / base:.1%} of one GPU at 64k" if base else ""
    print(f"{name}: {rate:,.0f} tokens/s per GPU (median of steps 3-6){share}")
PY
fi
exit $status
