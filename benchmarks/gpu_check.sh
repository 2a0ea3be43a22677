#!/usr/bin/env bash
# One prepared GPU check: correctness on CUDA, the kernel sweep, one training-step loop -- in < 8 min.
#
#   bash benchmarks/gpu_check.sh                 # on one H100/H200 (run from anywhere)
#   GPU_CHECK_BUDGET_S=300 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run       # print the plan and the environment; run nothing
#
# Order: setup, a, c, b (the single training number must not be lost to a long sweep), then tests_more.
# Stages (each under `timeout`, all under one global budget, GPU_CHECK_BUDGET_S, default 450 s, so the
# whole script ends before 8 minutes even if a stage hangs; a stage that would start with less than
# its minimum left is skipped and recorded as such):
#   0 setup     install the carried wheels (no package index needed) and this repo; record versions
#   a tests     pytest tests/test_gpu_check.py tests/test_lightning_triton.py on CUDA tensors:
#               flash (Triton, every wrapper path), lightning (Triton), the strategies at P=1
#               (NCCL world of one), the torch-flash SoftmaxKernel, against fp64 references
#               (+ tests/test_sdpa_kernel.py; and last, if time is left, "tests_more": the existing
#               tests/test_flash_attn.py and tests/test_lightning_attn.py with Triton on CUDA)
#   b kernels   python -m benchmarks.kernels --preset gpu_check: flash fwd/bwd/fwd+bwd, causal and
#               full, D 64/128, 2K-32K vs torch SDPA (flash, cuDNN, efficient backends), the flash-attn
#               package if importable; lightning 2K-64K vs fla's chunk_simple_gla; packed documents
#               and windows (8K/16K: ours, torch's op through ours, SDPA with the boolean mask,
#               FlexAttention; TFLOP/s on visible pairs); highest priority first, so a budget cut
#               loses the least important points. Also writes sdpa_select_<gpu>.json, the measured
#               table softmax_kernel("auto") reads (ours vs torch's flash op per case)
#   c train     the ~1B hybrid (configs/model/1b.yaml) at 8K tokens on one GPU, default engine
#               (DeepSpeed ZeRO-1 bf16): tokens/s and MFU, median over the measured steps
# Everything lands in benchmarks/results/gpu_check_* and sdpa_select_<gpu>.json (versions of device,
# driver, CUDA, torch, Triton in gpu_check_env.json); when $OUT is set (the device machine's return
# folder) the results are also copied there as one tarball plus the summary and the select table.
#
# Packages needed beyond torch and Triton (the GPU image has the rest): hydra-core, omegaconf,
# antlr4-python3-runtime, deepspeed, hjson, pydantic, pydantic-core, annotated-types, typing-inspection,
# typing-extensions; fla-core (baseline only). `bash benchmarks/gpu_wheels.sh` builds them into wheels/
# on a machine with a package index; carry wheels/ beside the checkout (GPU_CHECK_WHEELS=dir to move it).
#
# Exit codes: 0 every stage ran and passed; 1 some stage failed or timed out (see the summary);
#             0 with "SKIPPED: no CUDA GPU" when there is no GPU (2 instead if GPU_CHECK_REQUIRE_GPU=1).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/wheels}
RES=$REPO/benchmarks/results
START=$(date +%s)
DEADLINE=$((START + BUDGET))
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # the real compiler, never the interpreter

left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# --- is there a GPU? (before touching anything) ------------------------------------------------------
GPU_INFO=$("$PY" - <<'EOF' 2>&1
try:
    import torch
    if torch.cuda.is_available():
        print("GPU", torch.cuda.get_device_name(0))
    else:
        print("NOGPU torch", torch.__version__, "sees no CUDA device")
except Exception as exc:  # no torch at all
    print("NOGPU", type(exc).__name__, exc)
EOF
)
if [ "${GPU_INFO%% *}" != "GPU" ]; then
    echo "gpu_check: SKIPPED: no CUDA GPU on this machine ($(echo "$GPU_INFO" | tail -1))."
    echo "gpu_check: nothing was run or installed; run this script on one H100/H200 (see its header)."
    [ "${GPU_CHECK_REQUIRE_GPU:-0}" = "1" ] && exit 2
    exit 0
fi
log "found ${GPU_INFO#GPU }; budget ${BUDGET}s"
if [ "$DRY" = 1 ]; then
    log "dry run: would install $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS, then stages a, b, c"
    exit 0
fi
mkdir -p "$RES"
SUMMARY=$RES/gpu_check_summary.md
echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$SUMMARY"
STATUS=0

# run_stage NAME MIN_S CAP_S CMD...: run under min(CAP_S, time left); log to results/gpu_check_NAME.log
run_stage() {
    local name=$1 min=$2 cap=$3; shift 3
    local t; t=$(left)
    if [ "$t" -lt "$min" ]; then
        log "stage $name SKIPPED: ${t}s left < ${min}s needed"
        echo "- $name: SKIPPED (${t}s left of the budget)" >> "$SUMMARY"; STATUS=1; return
    fi
    [ "$t" -gt "$cap" ] && t=$cap
    log "stage $name (limit ${t}s): $*"
    local s0; s0=$(date +%s)
    timeout --kill-after=10 "$t" "$@" > "$RES/gpu_check_$name.log" 2>&1
    local rc=$?
    tail -n 25 "$RES/gpu_check_$name.log"
    local verdict="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after ${t}s"
    [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
    [ $rc -ne 0 ] && STATUS=1
    log "stage $name: $verdict in $(($(date +%s) - s0))s"
    echo "- $name: $verdict, $(($(date +%s) - s0))s, log gpu_check_$name.log" >> "$SUMMARY"
}

# --- 0 setup: wheels (no index), then this repo (editable: dist_attn.kernels maps to kernels/) -------
# If the editable install fails (an old setuptools), a folder of links gives the same import root.
log "stage setup"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        "$WHEELS"/*.whl > "$RES/gpu_check_setup.log" 2>&1 || { log "wheel install FAILED"; STATUS=1; }
else
    log "no wheels in $WHEELS: relying on what the image has (bash benchmarks/gpu_wheels.sh makes them)"
fi
if ! timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check \
        -e "$REPO" >> "$RES/gpu_check_setup.log" 2>&1; then
    FARM=$(mktemp -d)/src && mkdir -p "$FARM/dist_attn"
    for f in "$REPO"/dist_attn/*; do ln -s "$f" "$FARM/dist_attn/"; done
    ln -s "$REPO/kernels" "$FARM/dist_attn/kernels"; ln -s "$REPO/parallel" "$FARM/dist_attn/parallel"
    ln -s "$REPO/configs" "$FARM/dist_attn/configs"
    export PYTHONPATH="$FARM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    log "editable install failed (see gpu_check_setup.log): using the link folder $FARM"
fi
if "$PY" -c "import dist_attn.kernels.flash_attn, dist_attn.kernels.lightning_attn" >> "$RES/gpu_check_setup.log" 2>&1; then
    echo "- setup: ok" >> "$SUMMARY"
else
    log "dist_attn NOT importable: see gpu_check_setup.log"; echo "- setup: FAILED" >> "$SUMMARY"; STATUS=1
fi

"$PY" - "$RES/gpu_check_env.json" <<'EOF'
import json, platform, subprocess, sys
import torch
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(), device=torch.cuda.get_device_name(0),
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
            capability=".".join(map(str, torch.cuda.get_device_capability(0))))
try:
    import triton; info["triton"] = triton.__version__
except Exception as exc: info["triton"] = f"missing ({exc})"
for mod in ("deepspeed", "fla", "flash_attn", "hydra"):
    try: info[mod] = __import__(mod).__version__
    except Exception as exc: info[mod] = f"not importable ({type(exc).__name__})"
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc: info["driver"] = f"unknown ({exc})"
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception: pass
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF
cat "$RES/gpu_check_env.json" >> "$SUMMARY"; echo >> "$SUMMARY"

# --- a: correctness on CUDA --------------------------------------------------------------------------
run_stage tests 30 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --timeout=110 \
    tests/test_gpu_check.py tests/test_lightning_triton.py tests/test_sdpa_kernel.py

# --- c before b: the training loop is one number that must not be lost to a long sweep -------------
TRAIN_DIR=$(mktemp -d)
run_stage train 90 170 "$PY" -m launchers.train model=1b backend=zero1_bf16 data.seq_len=8192 \
    data.vocab_size=64 data.num_kv_pairs=64 trainer.micro_batch=1 trainer.steps=10 trainer.warmup_steps=3 \
    trainer.ckpt_every=0 trainer.log_every=1 trainer.tensorboard=false trainer.progress=false \
    trainer.out_dir="$TRAIN_DIR"
"$PY" - "$TRAIN_DIR" "$RES" <<'EOF' >> "$SUMMARY" 2>&1
import glob, json, os, statistics, sys
files = glob.glob(os.path.join(sys.argv[1], "**", "metrics.jsonl"), recursive=True)
rows = [json.loads(l) for f in files for l in open(f)] if files else []
meas = rows[3:]  # after the warm-up steps
if not meas:
    print("- train: no metrics.jsonl rows"); sys.exit(0)
keys = ("step_time_s", "tokens_per_s", "mfu", "mem_peak_gb")
med = {k: statistics.median(r[k] for r in meas if k in r) for k in keys if any(k in r for r in meas)}
res = dict(model="1b hybrid (LLLF, 16 layers)", seq_len=8192, engine="deepspeed zero1 bf16", steps=len(meas),
           **med, flops="ModelConfig.flops_per_token: 6N + attention (causal halving), bwd = 2x fwd")
json.dump(res, open(os.path.join(sys.argv[2], "gpu_check_train.json"), "w"), indent=1)
print(f"- train result: {json.dumps(res)}")
EOF

# --- b: the kernel sweep (stops itself before its limit and writes what it measured) ----------------
KT=$(( $(left) - 25 )); [ "$KT" -lt 30 ] && KT=30
run_stage kernels 40 300 "$PY" -m benchmarks.kernels --preset gpu_check --budget-s "$KT" --warmup 10 --rep 40 \
    --name gpu_check_kernels --out-dir "$RES"

# --- a, second part: the existing kernel test files on CUDA, if time is left ------------------------
run_stage tests_more 40 100 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --timeout=90 \
    tests/test_flash_attn.py tests/test_lightning_attn.py -k "not compile"

log "done: status $STATUS, $(($(date +%s) - START))s"
echo "- total: $(($(date +%s) - START))s, status $STATUS" >> "$SUMMARY"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    tar czf "$OUT/gpu_check_results.tar.gz" -C "$RES" $(cd "$RES" && ls gpu_check_* sdpa_select_*.json 2>/dev/null)
    cp "$SUMMARY" "$OUT/"
    cp "$RES"/sdpa_select_*.json "$OUT/" 2>/dev/null
    cp "$RES"/gpu_check_kernels.md "$OUT/" 2>/dev/null
fi
cat "$SUMMARY"
exit $STATUS
