#!/usr/bin/env bash
# One device run: CUDA correctness check, 7b first-token + decode benchmark, decode-step profile, 2-hour movie benchmark.
# Usage (device machine, repo root; .whl carries the PyAV wheel): bash benchmarks/gpu.sh [OUT_DIR]
# Dry run on a CPU machine: DRY=1 bash benchmarks/gpu.sh /tmp/out   (tiny presets, no CUDA)
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import av" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
py=${PYTHON:-python3}
if [ "${DRY:-0}" = 1 ]; then
  preset=tiny; movie_args="--seconds 600 --frames 50 --film-dir /tmp/hyperowl_dry_films"; profile_frames=8
else
  preset=7b; movie_args="--film-dir ${FILM_DIR:-$HOME/.cache/hyperowl/films}"; profile_frames=400
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  timeout 45 $py -m benchmarks.cuda_check 2>&1 | tee "$out/cuda_check.txt"
fi
timeout 170 $py -m benchmarks.first_token --preset $preset --out "$out" 2>&1 | tee "$out/first_token_$preset.log"
timeout 60 $py -m benchmarks.decode_profile --preset $preset --frames $profile_frames --out "$out" 2>&1 | tee "$out/decode_profile_$preset.log"
# The 2-hour 720p film is made once (about 20 min on 2 cores) and reused from --film-dir: carry it in FILM_DIR.
timeout 540 $py -m benchmarks.movie --preset $preset --out "$out" $movie_args 2>&1 | tee "$out/movie_$preset.log"
