#!/usr/bin/env bash
# One prepared check of the GPU path on a single H100 / H200, done in under 8 minutes (issue 10), writing one
# summary file. The device machine has Python 3.12 and torch 2.11 with CUDA and nothing of ours but the
# repository tree; everything else travels inside it, in two git-ignored folders filled beforehand by
# bench/gpu_wheels.sh on a machine with the project's venv (see there for how each wheel is fetched or built):
#   .whl/                        wheels for CPython 3.12 (deepspeed built with DS_BUILD_OPS=0, megatron-core 0.16.1,
#                                webdataset, sentencepiece, omegaconf, transformers, pytest and their dependencies)
#   .gpu_data/base/{shards,tokenizer}   base data config's shards (32k tokenizer, 511-token samples) of ../shared/data
# Give both to the device run as carried paths (64 MiB in all; about 55 MiB), e.g.
#   carry: [".whl", ".gpu_data/base/shards", ".gpu_data/base/tokenizer"]   command: bench/gpu_check.sh
#
#   bench/gpu_check.sh [SUMMARY]          GPU: install the wheels into /tmp/site, run every part
#   bench/gpu_check.sh --cpu [SUMMARY]    the same parts on the CPU at a tiny size, with the project's venv
#   bench/gpu_check.sh --dry-run          print each part's command and exit
#   options: --data WORK_DIR (default .gpu_data/base), --parts p1,p2 (default all), --site DIR (install .whl/
#            there and import from it, as the GPU mode does into /tmp/site; bench/gpu_rehearsal.sh uses it with
#            --cpu), SUMMARY default $OUT/gpu_summary.txt (or ./gpu_summary.txt without $OUT); part logs go beside
#            it in gpu_check_logs/
#
# Parts, each time-boxed (a failing or timed-out part is recorded and the next one runs; the budget of all of
# them together is 450 s after the wheels are installed):
#   fake_cuda  tests/test_fake_cuda.py for real on CUDA (when present; TANDEM_TEST_DEVICE=cuda is exported)
#   pretrain   30 steps of configs/pretrain/base.yaml through the real engine on one GPU: bf16, ZeRO-1, BANG + ELMER
#              mix, FlexAttention (attention dropout 0, backend flex); loss falling, tokens/s, peak GPU memory
#              (torch.cuda.max_memory_allocated at exit)
#   mfu        bench/mfu.py at the base shape (batch 32 x 511 tokens, bf16)
#   decode     bench/decode_latency.py on the GPU: every decoding mode at batch 1 and 32
#   plan       python -m pretrain --plan with the pretrain part's settings, against that peak (when the command
#              exists; it prints peak_bytes=N)
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu dry_run=0 data=.gpu_data/base parts=fake_cuda,pretrain,mfu,decode,plan summary="" site=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) mode=cpu; shift ;;
        --dry-run) dry_run=1; shift ;;
        --data) data="$2"; shift 2 ;;
        --parts) parts="$2"; shift 2 ;;
        --site) site="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) summary="$1"; shift ;;
    esac
done
summary="${summary:-${OUT:-.}/gpu_summary.txt}"
logs="$(dirname "$summary")/gpu_check_logs"
work="${TMPDIR:-/tmp}/tandem-gpu-check"
BUDGET_S=450

export MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [[ "$mode" == gpu ]]; then
    PY=python3
    export DS_ACCELERATOR=cuda CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=4
else
    PY="${TANDEM_PYTHON:-.venv/bin/python}"
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi

# --- the parts' commands ------------------------------------------------------------------------------------------
# The pretraining settings, shared by the pretrain and plan parts.
if [[ "$mode" == gpu ]]; then
    PRETRAIN_ARGS=(--config configs/pretrain/base.yaml train.steps=30 train.grad_accum=1 train.log_every=5
        schedule.warmup_steps=5 "data.overrides=[work_dir=$data]" data.num_workers=2 model.overrides.attention_dropout=0.0 model.overrides.attention_backend=flex)
    MFU_ARGS=(--steps 8 --warmup 3)
    DECODE_ARGS=(--device cuda --rounds 3 --repeats 2 --batches 1,32)
else
    PRETRAIN_ARGS=(--config configs/pretrain/tiny.yaml train.steps=8 train.log_every=2 schedule.warmup_steps=2
        optim.lr=3e-3 "data.overrides=[work_dir=$data]")
    MFU_ARGS=(--preset tiny --steps 1 --warmup 1 --batch 2 --seq-len 24 --threads 1)
    DECODE_ARGS=(--preset tiny --rounds 1 --warmup 0 --repeats 1 --batches 1 --src-len 16 --tgt-len 6 --threads 1)
fi
# No evaluation (each of its decoder layouts would compile FlexAttention anew; the fake-CUDA tests cover it) and
# no checkpoint: the part's time goes to the training steps.
PRETRAIN_ARGS+=(output_dir="$work/pretrain" train.progress_bar=false "data.eval_overrides=[]" eval.at_end=false
    eval.every_steps=0 checkpoint.every_steps=0 checkpoint.save_at_end=false checkpoint.export_final=false tracking.mlflow=false)
# The peak of GPU memory is read when the process ends, whichever way it ends.
PEAK='import atexit, runpy, sys, torch
atexit.register(lambda: print("max_memory_allocated_bytes=%d" % (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0), flush=True))
sys.argv = ["pretrain", *sys.argv[1:]]
runpy.run_module("pretrain", run_name="__main__")'

declare -A COMMAND=(
    [fake_cuda]="$PY -m pytest tests/test_fake_cuda.py -q -x -p no:cacheprovider"
    [pretrain]="$PY -c '$PEAK' $(printf '%q ' "${PRETRAIN_ARGS[@]}")"
    [mfu]="$PY bench/mfu.py $(printf '%q ' "${MFU_ARGS[@]}")"
    [decode]="$PY bench/decode_latency.py $(printf '%q ' "${DECODE_ARGS[@]}")"
    [plan]="$PY -m pretrain --plan $(printf '%q ' "${PRETRAIN_ARGS[@]}")"
)
declare -A TIMEOUT=([fake_cuda]=75 [pretrain]=170 [mfu]=100 [decode]=60 [plan]=45)
[[ "$mode" == cpu ]] && TIMEOUT=([fake_cuda]=300 [pretrain]=240 [mfu]=240 [decode]=120 [plan]=120) && BUDGET_S=1200

if [[ "$dry_run" == 1 ]]; then
    for part in ${parts//,/ }; do echo "$part: ${COMMAND[$part]}"; done
    exit 0
fi

# --- running --------------------------------------------------------------------------------------------------------
mkdir -p "$logs" "$work"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

[[ "$mode" == gpu ]] && site="${site:-/tmp/site}"
if [[ -n "$site" ]]; then
    start=$SECONDS
    if ls .whl/*.whl > /dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --upgrade --target "$site" .whl/*.whl \
            > "$logs/setup.log" 2>&1; then
        note "setup: ok ($((SECONDS - start)) s, $(ls .whl/*.whl | wc -l) wheels into $site)"
    else
        note "setup: FAILED: no .whl/ or pip could not install it (see gpu_check_logs/setup.log; bench/gpu_wheels.sh fills .whl/)"
    fi
    export PYTHONPATH="$site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
note "# Tandem GPU check ($mode): $(date -u +%FT%TZ), $($PY -c 'import torch; print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"))' 2>&1 | tail -1)"

deadline=$((SECONDS + BUDGET_S))

# run PART: time-boxed, output to its log; prints "ok"/"FAILED (rc N)"/"TIMED OUT" with the seconds it took
run() {
    local part="$1" left=$((deadline - SECONDS)) limit start rc
    limit=${TIMEOUT[$part]}
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "skipped: out of time"; return 1; fi
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "${COMMAND[$part]}" > "$logs/$part.log" 2>&1
    rc=$?
    if (( rc == 0 )); then echo "ok ($((SECONDS - start)) s)"
    elif (( rc == 124 || rc == 137 )); then echo "TIMED OUT after ${limit} s"; return 1
    else echo "FAILED (rc $rc, $((SECONDS - start)) s; see gpu_check_logs/$part.log)"; return 1; fi
}

lines() { grep -E "$1" "$logs/$2.log" | tr '\n' ' '; }

for part in ${parts//,/ }; do
    case "$part" in
        fake_cuda)
            if [[ ! -f tests/test_fake_cuda.py ]]; then note "fake_cuda: skipped: tests/test_fake_cuda.py not present"
            else note "fake_cuda: $(TANDEM_TEST_DEVICE=cuda run fake_cuda) $(tail -1 "$logs/fake_cuda.log")"; fi ;;
        pretrain)
            status=$(run pretrain)
            figures=$($PY - "$work/pretrain/metrics.jsonl" <<'EOF' 2>/dev/null
import json, sys
train = [e for e in map(json.loads, open(sys.argv[1])) if e.get("kind") == "train"]
first, last = train[0], train[-1]
rate = [e[k] for e in train[1:] for k in e if k.endswith("tokens_per_s")]
print(f"steps={last['step']} loss_first_window={first['loss']:.4f} loss_last_window={last['loss']:.4f} "
      f"loss_falls={'yes' if last['loss'] < first['loss'] - 0.1 else 'NO'}"
      + (f" tokens_per_s={sum(rate) / len(rate):.0f}" if rate else ""))
EOF
)
            note "pretrain: $status ${figures:-no training records} $(lines '^max_memory_allocated_bytes=' pretrain)" ;;
        mfu)
            note "mfu: $(run mfu) $(lines '^(mfu|mfu_hf|mfu_ratio_vs_hf|mfu_vs_measured_gemm)=' mfu)"
            grep -E '^# peak' "$logs/mfu.log" >> "$summary" ;;
        decode)
            note "decode: $(run decode)"
            grep -E '^(mode|ar_|nar|semi_|mask_|early_)' "$logs/decode.log" >> "$summary" ;;
        plan)
            if ! $PY -m pretrain --help 2>/dev/null | grep -q -- '--plan'; then
                note "plan: skipped: not available (python -m pretrain --plan is not written yet)"
                continue
            fi
            status=$(run plan)
            planned=$(grep -Eo '^peak_bytes=[0-9]+' "$logs/plan.log" | tail -1 | cut -d= -f2)
            measured=$(grep -Eo '^max_memory_allocated_bytes=[0-9]+' "$logs/pretrain.log" 2>/dev/null | tail -1 | cut -d= -f2)
            if [[ -n "$planned" && -n "$measured" && "$measured" != 0 ]]; then
                note "plan: $status peak_bytes=$planned measured=$measured plan/measured=$($PY -c "print(f'{$planned / $measured:.3f}')")"
            else
                note "plan: $status $(tail -3 "$logs/plan.log" | tr '\n' ' ')"
            fi ;;
        *) note "$part: unknown part (parts: fake_cuda, pretrain, mfu, decode, plan)" ;;
    esac
done
note "total: $SECONDS s"
