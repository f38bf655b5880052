#!/usr/bin/env bash
# GPU readiness check (issue 15): device tests, throughput against K, block voxels/s, host
# share and host wait, peak memory, training; <= ~8 minutes on one H100-class GPU.
#
#   bench/gpu_check.sh cuda            # or cuda:1, xpu, xpu:0 -> bench/results/gpu-check-<device>.json
#   bench/gpu_check.sh cpu --quick     # smoke run of the script on a CPU (a few minutes)
#
# Extra arguments go to bench/gpu_check.py (--only tests,sweep,..., --out FILE, --print json).
# The environment is used as found: CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK / ZE_FLAT_DEVICE_HIERARCHY
# pick the device(s) (the JSON records them); FFN_SHARED points at the shared data (default ../shared).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 DEVICE [--quick] [gpu_check.py options]   (DEVICE: cuda, cuda:N, xpu, xpu:N or cpu)" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# the source tree's package when its kernels are built in place (else the installed one)
if compgen -G "$repo/python/floodfilling/_kernels*.so" > /dev/null; then
    export PYTHONPATH="$repo/python${PYTHONPATH:+:$PYTHONPATH}"
fi
export FFN_SHARED="${FFN_SHARED:-$repo/../shared}"
export PYTHONUNBUFFERED=1  # progress lines as they happen
exec python bench/gpu_check.py "$@" --print summary
