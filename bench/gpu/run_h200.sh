#!/usr/bin/env bash
# MoeBar on the lent H200 in one call: install the carried MLX (CUDA) wheels, check the engine on
# CUDA (bench/gpu/check_cuda.py), build the qwen3-30b-shape synthetic model, sweep the disk's
# parallel read speed, and run `moebar-engine bench` on the GPU. Everything lands under $OUT.
#
# Usage, from the repository root:  bash bench/gpu/run_h200.sh WHEEL_DIR [WHEEL_DIR...]
#   WHEEL_DIRs hold *.whl files and wheels split in parts named NAME.whl.part-aa, -ab, ...
#   (mlx-cuda-13 is larger than one call may carry; see /work/shared/notes/gpu-notes.md).
#   With no WHEEL_DIR nothing is installed (MLX must already be importable).
# Environment: OUT (results), LAYERS (48), IO_THREADS (8), DECODE_TOKENS (12), PROMPT_TOKENS (24),
#   PREFILL_CHUNK (128), REPEATS (3), SKIP_BENCH=1 / SKIP_CHECK=1 / SKIP_SWEEP=1 (leave a step out),
#   PROFILE=1 (bench/gpu/profile_decode.py: warm decode against mlx-lm, host time per token;
#   PROFILE_TOKENS, 64), CHECK_ARGS (e.g. --exactness-only), TIME_LIMIT
#   (seconds for the whole script: steps are stopped so that it ends in time), CHECK_S (seconds
#   kept back for the benchmark while checking, default 240); DEVICE=cpu and
#   PYTHON=.venv/bin/python make a smoke run of the same steps off the GPU.
# MLX JIT-compiles its CUDA kernels on first use (minutes on a fresh machine); the compiled PTX
# is kept in $OUT/mlx_ptx.tgz and reused when that file is given as PTX_CACHE.
set -uo pipefail

OUT=${OUT:-/tmp/moebar-gpu-out}
LAYERS=${LAYERS:-48}
IO_THREADS=${IO_THREADS:-8}
DECODE_TOKENS=${DECODE_TOKENS:-12}
PROMPT_TOKENS=${PROMPT_TOKENS:-24}
REPEATS=${REPEATS:-3}
DEVICE=${DEVICE:-gpu}
PY=${PYTHON:-python3}
SITE=/tmp/site
WHEELS=/tmp/wheels
WORK=/tmp/bench
PRESET=qwen3-30b-shape
CHECK_S=${CHECK_S:-240}
mkdir -p "$OUT" "$WORK"
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx
mkdir -p "$MLX_PTX_CACHE_DIR"
if [ -n "${PTX_CACHE:-}" ] && [ -f "$PTX_CACHE" ]; then tar -xzf "$PTX_CACHE" -C "$MLX_PTX_CACHE_DIR"; fi
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_run.log"; }
START=$(date +%s)
# left_for NAME RESERVE CMD...: run CMD, stopped RESERVE s before TIME_LIMIT (s since start; 0: none)
left_for() {
    local name=$1 reserve=$2
    shift 2
    if [ "${TIME_LIMIT:-0}" -le 0 ]; then "$@"; return; fi
    local left=$((START + TIME_LIMIT - reserve - $(date +%s)))
    if [ "$left" -le 5 ]; then log "no time left for $name"; return 124; fi
    timeout --signal=INT --kill-after=5 "$left" "$@"
}

# 1. wheels: whole ones as they are, split ones joined in part order
if [ "$#" -gt 0 ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    for d in "$@"; do
        cp "$d"/*.whl "$WHEELS"/ 2>/dev/null || true
    done
    for d in "$@"; do ls "$d"/*.whl.part-* 2>/dev/null; done | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 |
        while read -r part; do
            name=$(basename "$part")
            cat "$part" >>"$WHEELS/${name%.part-*}"
        done
    for w in "$WHEELS"/*.whl; do
        "$PY" -c "import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)" "$w" ||
            { log "corrupt wheel $w (a part missing?)"; exit 2; }
    done
    log "installing: $(cd "$WHEELS" && echo *.whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl ||
        { log "pip install failed"; exit 2; }
    export PYTHONPATH="$SITE:$PWD"
else
    export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu_run.log"
"$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, 'cuda', mx.cuda.is_available(), mx.default_device())" |
    tee -a "$OUT/gpu_run.log"

# 2. the model: as many layers as the disk holds twice (safetensors + packed), plus room
per_layer=$((360 * 1024 * 1024))
free_bytes=$(df -B1 --output=avail "$WORK" | tail -n 1)
fit=$(((free_bytes - 4 * 1024 * 1024 * 1024) / (2 * per_layer)))
if [ "$fit" -lt "$LAYERS" ]; then LAYERS=$fit; fi
MODEL="$WORK/$PRESET-L$LAYERS"
log "building $PRESET with $LAYERS layers in $MODEL (free: $((free_bytes / 1024 / 1024 / 1024)) GiB)"
t0=$(date +%s)
"$PY" -c "from engine.demo.demo_model import build_random_moe_model as b; \
b('$MODEL', 'qwen3_moe', 4, preset='$PRESET', num_layers=$LAYERS, overwrite=True)" || { log "build failed"; exit 4; }
t1=$(date +%s)
"$PY" -m engine.cli pack --quiet "$MODEL" || { log "pack failed"; exit 4; }
t2=$(date +%s)
log "built in $((t1 - t0)) s, packed in $((t2 - t1)) s; $(du -sh "$MODEL" | cut -f1)"

# 3. correctness on this model (and micro-timings of slot pools) on CUDA
if [ "${SKIP_CHECK:-0}" = 1 ]; then check_rc=0; else
log "check_cuda"
left_for check_cuda "$CHECK_S" "$PY" bench/gpu/check_cuda.py --device "$DEVICE" --model "$MODEL" ${CHECK_ARGS:-} --json "$OUT/gpu_check.json" >"$OUT/gpu_check.log" 2>&1
check_rc=$?
log "check_cuda rc=$check_rc"
tail -n 40 "$OUT/gpu_check.log"
[ -s "$OUT/gpu_check.json" ] || log "the checks did not complete (see gpu_check.log); benchmarking anyway"
fi

# 4. the disk alone: cold parallel reads of expert-sized blocks at several thread counts
sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || log "could not drop the page cache"
[ "${SKIP_SWEEP:-0}" = 1 ] || "$PY" - "$MODEL" "$OUT/gpu_disk.json" <<'EOF' 2>&1 | tee -a "$OUT/gpu_run.log"
import json, sys
from pathlib import Path
from engine.model.loader import inspect_experts
from engine.platform_info import measure_cold_read_speed
model = Path(sys.argv[1])
block = inspect_experts(model).layers[0].expert_bytes
sweep = {t: measure_cold_read_speed(model / "moebar-packed", block_bytes=block, threads=t, total_bytes=512 << 20)
         for t in (1, 4, 8, 16)}
for t, bps in sweep.items():
    print(f"raw cold parallel read, {t:2d} threads: {bps / 1e9:.2f} GB/s")
Path(sys.argv[2]).write_text(json.dumps({"block_bytes": block, "bytes_per_s_by_threads": sweep}, indent=2))
EOF

save_ptx() { tar -czf "$OUT/mlx_ptx.tgz" -C "$MLX_PTX_CACHE_DIR" . 2>/dev/null; }

# 4b. where a warm decode token's time goes, engine against mlx-lm (PROFILE=1)
if [ "${PROFILE:-0}" = 1 ]; then
    log "profile_decode"
    left_for profile_decode 20 "$PY" bench/gpu/profile_decode.py --model "$MODEL" --device "$DEVICE" \
        --tokens "${PROFILE_TOKENS:-64}" --out "$OUT" >"$OUT/profile_decode.log" 2>&1
    log "profile_decode rc=$?"
    head -n 30 "$OUT/profile_decode.log"
fi
if [ "${SKIP_BENCH:-0}" = 1 ]; then save_ptx; exit "$check_rc"; fi

# 5. the benchmark, page cache dropped first (the engine's cold reads bypass it anyway)
sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || log "could not drop the page cache"
log "bench: layers=$LAYERS io_threads=$IO_THREADS decode_tokens=$DECODE_TOKENS prompt_tokens=$PROMPT_TOKENS repeats=$REPEATS"
left_for bench 30 "$PY" -m engine.cli bench --preset "$PRESET" --layers "$LAYERS" --device "$DEVICE" --work-dir "$WORK" \
    --io-threads "$IO_THREADS" --decode-tokens "$DECODE_TOKENS" --prompt-tokens "$PROMPT_TOKENS" --prefill-chunk "${PREFILL_CHUNK:-128}" \
    --repeats "$REPEATS" --disk-bytes $((2 * 1024 * 1024 * 1024)) --json "$OUT/gpu_bench.json" 2>&1 |
    tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
log "bench rc=$bench_rc"
save_ptx
exit $((bench_rc != 0 ? bench_rc : check_rc))
