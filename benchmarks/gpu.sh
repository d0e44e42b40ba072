#!/usr/bin/env bash
# One device run (about 7 minutes on an H200): CUDA correctness (incl. CUDA-graph decode and 7B bf16 vs fp32),
# speed against the hardware limits (limits_7b.json), kernel variants (gpu_kernels_7b), 7b first token against
# both token-concatenation baselines, and the 2-hour 720p film to first token.
# Usage (device machine, repo root; .whl carries PyAV, as its wheel or as an installed site folder packed into
# .whl/*.tar.xz (10 MB smaller); FILM_DIR a film made by benchmarks/movie.py):
#   bash benchmarks/gpu.sh [OUT_DIR]
# Packing PyAV (here, once): pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --platform manylinux_2_28_x86_64 -d /tmp/w av==18.1.0 && pip install --no-deps --target /tmp/avsite /tmp/w/av-*.whl \
#   && tar cJf .whl/av-site.tar.xz -C /tmp/avsite .     (with the film, the repository stays under 64 MiB)
# Dry run on a CPU machine: DRY=1 bash benchmarks/gpu.sh /tmp/out   (tiny presets, no CUDA)
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if ! $py -c "import av" 2>/dev/null; then
  mkdir -p /tmp/site
  for f in .whl/*.tar.xz; do [ -e "$f" ] && { tar xJf "$f" -C /tmp/site || exit 1; }; done
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
film_dir=${FILM_DIR:-$HOME/.cache/hyperowl/films}
# STAGES picks a subset (a rerun of what changed): cuda_check gpu_speed gpu_kernels first_token movie serve_load
# first_token_compiled (first token against both baselines up to 400 frames, every vision tower compiled; not in
# the default run either).
# serve_load (GPU serving, 32 clients with 8 images each against one request at a time; about 4 minutes) is
# not in the default run, which fits in 8 minutes: run it as STAGES="gpu_speed serve_load" (it writes
# serve_speedup_<N>_clients into limits_7b.json).
stages=" ${STAGES:-cuda_check gpu_speed gpu_kernels first_token movie} "
want() { [[ "$stages" == *" $1 "* ]]; }
if [ "${DRY:-0}" = 1 ]; then
  preset=tiny
  speed_args="--frames 8 --tokens 8 --rounds 1 --chunks 4 8 --no-compile"
  kernel_args="--frames 8 --vision-frames 4 --rounds 1 --no-compile"
  movie_args="--seconds 600 --frames 50 --film-dir /tmp/hyperowl_dry_films"
  serve_args="--device cpu --random-preset cpu-small --clients 1 4 --requests 1 --rounds 1 --request-images 2 --max-tokens 8 --batch-size 4"
else
  preset=7b
  speed_args=""
  kernel_args=""
  movie_args="--film-dir $film_dir"
  serve_args="--device cuda --random-preset 7b --dtype bfloat16 --clients 1 32 --requests 2 --rounds 1 --request-images 8 --max-tokens 64 --batch-size 32"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  want cuda_check && timeout 150 $py -m benchmarks.cuda_check 2>&1 | tee "$out/cuda_check.txt"
fi
want gpu_speed && timeout 140 $py -m benchmarks.gpu_speed --preset $preset --out "$out" $speed_args 2>&1 | tee "$out/gpu_speed_$preset.log"
want gpu_kernels && timeout 180 $py -m benchmarks.gpu_kernels --preset $preset --out "$out" $kernel_args 2>&1 | tee "$out/gpu_kernels_$preset.log"
want first_token && timeout 150 $py -m benchmarks.first_token --preset $preset --out "$out" 2>&1 | tee "$out/first_token_$preset.log"
want first_token_compiled && timeout 150 $py -m benchmarks.first_token --preset $preset --out "$out" --compile-vision --max-frames 400 2>&1 | tee "$out/first_token_${preset}_compiled-vision.log"
# The 2-hour 720p film is made once (about 20 min on 2 cores) and reused from --film-dir: carry it in FILM_DIR.
want movie && timeout 170 $py -m benchmarks.movie --preset $preset --out "$out" $movie_args 2>&1 | tee "$out/movie_$preset.log"
want serve_load && timeout 330 $py benchmarks/serve_load.py $serve_args --out "$out/serve_load_$preset.md" --limits "$out/limits_$preset.json" 2>&1 | tee "$out/serve_load_$preset.log"
exit 0
