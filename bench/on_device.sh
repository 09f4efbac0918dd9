#!/usr/bin/env bash
# Run on the device machine (see docs/benchmarks.md): install the carried wheels, expose this checkout as the
# package `video_offload`, then run what is asked: `tests` (the GPU tests), `layerwise`, `e2e`, `vae`, `host_ram`, `multi_gpu` or `lean_block`, with their arguments.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl || exit 2
ln -sfn "$PWD" /tmp/site/video_offload
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
what="$1"; shift
case "$what" in
  tests) python3 -m pytest -q -p no:cacheprovider -m gpu "$@" 2>&1 | tee "$out/gpu_tests.log" | tail -30 ;;
  layerwise) python3 bench/layerwise.py "$@" 2>"$out/layerwise.err"; echo "rc=$?" ;;
  e2e) python3 bench/e2e.py --out "$out/e2e.jsonl" "$@" 2>"$out/e2e.err" | tail -40; echo "rc=$?" ;;
  multi_gpu) python3 bench/multi_gpu.py "$@" 2>"$out/multi_gpu.err"; echo "rc=$?" ;;
  host_ram) python3 bench/host_ram.py "$@" 2>"$out/host_ram.err"; echo "rc=$?" ;;
  vae) python3 bench/vae.py "$@" 2>"$out/vae.err" | tail -20; echo "rc=$?" ;;
  lean_block) python3 bench/lean_block.py "$@" 2>"$out/lean_block.err"; echo "rc=$?" ;;
  *) echo "usage: bench/on_device.sh tests|layerwise|e2e|multi_gpu|host_ram|vae|lean_block [args]"; exit 2 ;;
esac
