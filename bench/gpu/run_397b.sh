#!/usr/bin/env bash
# Qwen3.5-397B's shape on the lent GPU (issue 13), in steps that one or two device calls can hold.
#
# Usage, from the repository root:  STEPS="install selfcheck build exact repro bench long longruns" \
#     bash bench/gpu/run_397b.sh WHEEL_DIR [WHEEL_DIR...]
#   WHEEL_DIRs as for bench/gpu/run_h200.sh (*.whl and NAME.whl.part-aa, -ab, ...; mlx-cuda-13 is
#   larger than one call may carry: see /work/shared/notes/gpu-notes.md). Without "install" in
#   STEPS, /tmp/site from an earlier call on the same warm machine is used.
# Steps, run in this order (each writes under $OUT; a step that runs out of TIME_LIMIT is stopped,
# the rest go on):
#   selfcheck  moebar-engine selfcheck on the GPU (exactness in fp32 and bf16, slot reuse, rows,
#              one 2 GiB stacked slot array)
#   build      the qwen3.5-397b-shape model with LAYERS layers (4: 14.5 GB of experts), packed
#   exact      bench/gpu/check_long_prefill.py: greedy tokens after a 2,100-token prompt equal
#              mlx-lm's (three tiny families fp32+bf16; the built model in its bf16 with no cache
#              and with every expert cached, pools split under engine.model.array_limits; with
#              --prefill-matmul auto and on)
#   coldprobe  bench/gpu/cold_compute_probe.py: a cold token's expert compute on host-resident slots,
#              on a compact copy gathered first, in GPU memory (managed and plain), and again with the
#              token's slots spread over a 1,024-slot pool (no model needed: a minute or two)
#   readab     bench/staging_copy_ab.py --slots pool: cold reads straight into the slot pool's pages
#              (O_DIRECT) against the staging copy (no model needed)
#   coldprofile bench/gpu/profile_decode.py --cold: cold engines side by side, interleaved (per-token
#              split, same tokens, a cProfile): COLD_VARIANTS (on,on-staged: O_DIRECT straight into
#              the slots against through the staging buffer; off,on: gather_slots)
#   repro      bench/gpu/large_array_repro.py: gather_qmm on stacked arrays of 2 and 5 GiB, 2-, 4- and 8-bit, plain MLX
#              and the engine's slot-pool path (REPRO_SIZES, REPRO_BITS, REPRO_PATHS) (the cause of the wrong logits with a 4 GiB pool)
#   bench      moebar-engine bench at that shape: warm decode against mlx-lm, cold decode against
#              the serial bound, measured side by side
#   long       moebar-engine bench --long-prompt LONG_PROMPT (4096): cold TTFT at cache 0 in one
#              pass and in passes of 512 tokens, against the one-pass bound
#   longruns   the same with --prefill-matmul on: each expert's routed rows in one quantized matmul
#              (MLX's CUDA gather_qmm reads an expert once per routed pair)
# Environment: OUT, LAYERS (4), LONG_PROMPT (4096), LONG_REPEATS (1 or 2: the bench takes at most 2),
#   EXACT_ARGS (more check_long_prefill.py options), GATHER_SLOTS (the bench's --gather-slots, auto), IO_THREADS (8), DECODE_TOKENS (24), REPEATS (3),
#   TIME_LIMIT (s for the whole script, 0: none), PTX_CACHE (a tarred MLX_PTX_CACHE_DIR to reuse).
set -uo pipefail

OUT=${OUT:-/tmp/moebar-gpu-out}
STEPS=${STEPS:-"install selfcheck build exact repro bench long longruns"}
LAYERS=${LAYERS:-4}
LONG_PROMPT=${LONG_PROMPT:-4096}
IO_THREADS=${IO_THREADS:-8}
DECODE_TOKENS=${DECODE_TOKENS:-24}
REPEATS=${REPEATS:-3}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-gpu}  # cpu: a smoke run of the same steps off the GPU (with PYTHON=.venv/bin/python)
SITE=/tmp/site
WORK=/tmp/bench397
PRESET=qwen3.5-397b-shape
MODEL="$WORK/$PRESET-L$LAYERS"
mkdir -p "$OUT" "$WORK"
export MLX_PTX_CACHE_DIR=/tmp/mlx-ptx PYTHONUNBUFFERED=1
mkdir -p "$MLX_PTX_CACHE_DIR"
if [ -n "${PTX_CACHE:-}" ] && [ -f "$PTX_CACHE" ]; then tar -xzf "$PTX_CACHE" -C "$MLX_PTX_CACHE_DIR"; fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run_397b.log"; }
START=$(date +%s)
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# run NAME CMD...: CMD under what is left of TIME_LIMIT (keeping 20 s to save the PTX cache)
run() {
    local name=$1
    shift
    if [ "${TIME_LIMIT:-0}" -le 0 ]; then "$@"; return; fi
    local left=$((START + TIME_LIMIT - 20 - $(date +%s)))
    if [ "$left" -le 5 ]; then log "no time left for $name"; return 124; fi
    timeout --signal=INT --kill-after=5 "$left" "$@"
}
drop_caches() { sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || log "could not drop the page cache"; }

if has install && [ "$#" -gt 0 ]; then
    rm -rf /tmp/wheels && mkdir -p /tmp/wheels
    for d in "$@"; do cp "$d"/*.whl /tmp/wheels/ 2>/dev/null || true; done
    for d in "$@"; do ls "$d"/*.whl.part-* 2>/dev/null; done | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2 |
        while read -r part; do name=$(basename "$part"); cat "$part" >>"/tmp/wheels/${name%.part-*}"; done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" /tmp/wheels/*.whl ||
        { log "pip install failed"; exit 2; }
fi
export PYTHONPATH="$SITE:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/run_397b.log"
"$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, 'cuda', mx.cuda.is_available())" | tee -a "$OUT/run_397b.log"
rc=0

if has selfcheck; then
    log "selfcheck"
    run selfcheck "$PY" -m engine.cli selfcheck --device "$DEVICE" --skip disk >"$OUT/selfcheck.log" 2>&1 || rc=1
    tail -n 20 "$OUT/selfcheck.log"
fi
if has build && [ ! -f "$MODEL/moebar-packed/index.json" ]; then
    log "building $PRESET with $LAYERS layers"
    if run build "$PY" -c "from engine.demo.demo_model import build_random_moe_model as b; \
b('$MODEL', 'qwen3_5_moe', 4, preset='$PRESET', num_layers=$LAYERS, overwrite=True)" && \
        run pack "$PY" -m engine.cli pack --quiet "$MODEL"; then
        log "built: $(du -sh "$MODEL" | cut -f1)"
    else  # the steps that need no model still run; the ones that do are skipped below
        log "build failed"; rm -rf "$MODEL"; rc=4
    fi
fi
built() { [ -f "$MODEL/moebar-packed/index.json" ] || { log "no built model: $1 skipped"; rc=4; return 1; }; }
if has exact; then
    log "check_long_prefill"
    extra=""
    [ -f "$MODEL/moebar-packed/index.json" ] && extra="--model $MODEL"
    # shellcheck disable=SC2086  # extra and EXACT_ARGS are word lists
    run exact "$PY" bench/gpu/check_long_prefill.py --device "$DEVICE" $extra ${EXACT_ARGS:-} --json "$OUT/long_exact.json" \
        >"$OUT/long_exact.log" 2>&1 || rc=1
    cat "$OUT/long_exact.log"
fi
if has coldprobe; then
    log "cold_compute_probe"
    run coldprobe "$PY" bench/gpu/cold_compute_probe.py --layers "$LAYERS" --out "$OUT" >"$OUT/cold_compute_probe.log" 2>&1
    log "cold_compute_probe rc=$?"; cat "$OUT/cold_compute_probe.log"
    # the token's slots spread over a pool the size of the warm bench's (1,024 slots, 7.2 GB)
    run coldprobe "$PY" bench/gpu/cold_compute_probe.py --layers "$LAYERS" --pool-slots 1024 --rewrite-rounds 0 \
        --out "$OUT/coldprobe_1024" >"$OUT/cold_compute_probe_1024.log" 2>&1
    log "cold_compute_probe --pool-slots 1024 rc=$?"; cat "$OUT/cold_compute_probe_1024.log"
fi
if has readab; then
    log "staging_copy_ab --slots pool (O_DIRECT into the slots against the staging copy)"
    run readab "$PY" bench/staging_copy_ab.py --slots pool --experts 120 --rounds 3 --dir "$WORK" \
        >"$OUT/read_ab.log" 2>&1
    log "staging_copy_ab rc=$?"; cat "$OUT/read_ab.log"
fi
if has coldprofile && built coldprofile; then
    drop_caches
    log "profile_decode --cold (${COLD_VARIANTS:-on,on-staged}, interleaved)"
    run coldprofile "$PY" bench/gpu/profile_decode.py --cold --model "$MODEL" --device "$DEVICE" --tokens "$DECODE_TOKENS" \
        --io-threads "$IO_THREADS" --gather-slots "${COLD_VARIANTS:-on,on-staged}" --out "$OUT/profile_cold" >"$OUT/profile_cold.log" 2>&1 || rc=1
    head -n 60 "$OUT/profile_cold.log"
fi
if has repro; then
    log "large_array_repro"
    run repro "$PY" bench/gpu/large_array_repro.py --device "$DEVICE" --sizes "${REPRO_SIZES:-2,5}" --bits "${REPRO_BITS:-2,4,8}" --paths "${REPRO_PATHS:-plain,slot_pool}" --json "$OUT/large_array.json" \
        >"$OUT/large_array.log" 2>&1
    log "large_array_repro rc=$?"; cat "$OUT/large_array.log"
fi
if has bench && built bench; then
    drop_caches
    log "bench (decode side by side)"
    run bench "$PY" -m engine.cli bench --preset "$PRESET" --layers "$LAYERS" --device "$DEVICE" --work-dir "$WORK" \
        --io-threads "$IO_THREADS" --decode-tokens "$DECODE_TOKENS" --prompt-tokens 24 --prefill-chunk 16 \
        --repeats "$REPEATS" --disk-bytes $((2 << 30)) --gather-slots "${GATHER_SLOTS:-auto}" --json "$OUT/bench_397b.json" >"$OUT/bench_397b.log" 2>&1 || rc=1
    tail -n 25 "$OUT/bench_397b.log"
fi
if has long && built long; then
    drop_caches
    log "bench --long-prompt $LONG_PROMPT"
    run long "$PY" -m engine.cli bench --preset "$PRESET" --layers "$LAYERS" --device "$DEVICE" --work-dir "$WORK" \
        --io-threads "$IO_THREADS" --long-prompt "$LONG_PROMPT" --prefill-chunk 512 --repeats "${LONG_REPEATS:-2}" --disk-bytes $((2 << 30)) \
        --json "$OUT/long_prompt_397b.json" >"$OUT/long_prompt_397b.log" 2>&1 || rc=1
    tail -n 12 "$OUT/long_prompt_397b.log"
fi
if has longruns && built longruns; then
    drop_caches
    log "bench --long-prompt $LONG_PROMPT --prefill-matmul on (each expert's rows in one quantized matmul)"
    run longruns "$PY" -m engine.cli bench --preset "$PRESET" --layers "$LAYERS" --device "$DEVICE" --work-dir "$WORK" \
        --io-threads "$IO_THREADS" --long-prompt "$LONG_PROMPT" --prefill-chunk 512 --repeats "${LONG_REPEATS:-2}" \
        --prefill-matmul on --disk-bytes $((2 << 30)) --json "$OUT/long_prompt_397b_runs.json" \
        >"$OUT/long_prompt_397b_runs.log" 2>&1 || rc=1
    tail -n 12 "$OUT/long_prompt_397b_runs.log"
fi
tar -czf "$OUT/mlx_ptx.tgz" -C "$MLX_PTX_CACHE_DIR" . 2>/dev/null
exit $rc
