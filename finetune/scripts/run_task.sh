#!/usr/bin/env bash
# finetune -> generate -> evaluate for one task (the per-task scripts beside this one call it).
#
#   finetune/scripts/<task>.sh --init CKPT [--difficulty easy|medium|medium+|hard] [--objective ar|nar|bang_mixed|janus]
#                              [--mode ar_beam|ar_greedy|nar|semi_nar|mask_predict|early_exit] [--split test|valid]
#                              [--nproc N] [--out DIR] [key=value ...]
#
# CKPT: a pretraining checkpoint (runs/pretrain/tiny, a step_* folder or a full state dict .pt).
# key=value overrides go to the finetune config (e.g. train.steps=300 optim.lr=1e-3, or for the official GLGE
# layout "data.overrides=['data_root=/data/glge','tasks.root=.']").
# --split: the split to decode and score. GLGE's test split gives the submission file {task}.{difficulty}.test;
#   several of the samples in ../shared/data have no test split: use --split valid there.
# --nproc N > 1 trains with torchrun on N processes (add parallel.tensor_parallel=2 for tensor parallelism).
# Run from the repository root. Environment: PYTHON (default .venv/bin/python if present, else python).
set -euo pipefail

task="$1"; shift
init="" difficulty="easy" objective="" mode="" split="test" nproc=1 out=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --init) init="$2"; shift 2 ;;
    --difficulty) difficulty="$2"; shift 2 ;;
    --objective) objective="$2"; shift 2 ;;
    --mode) mode="$2"; shift 2 ;;
    --split) split="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$init" ]]; then echo "--init <pretraining checkpoint> is required" >&2; exit 2; fi

source "$(dirname "$0")/env.sh"
config="configs/finetune/${task}.yaml"
[[ -f "$config" ]] || { echo "no config $config (run from the repository root)" >&2; exit 2; }

run_overrides=("task.difficulty=${difficulty}")
[[ -n "$objective" ]] && run_overrides+=("objective.name=${objective}")
[[ -n "$mode" ]] && run_overrides+=("decode.mode=${mode}")
name="${task}-${difficulty}-${objective:-default}"
out="${out:-runs/finetune/${name}}"
run_overrides+=("output_dir=${out}" ${overrides[@]+"${overrides[@]}"})

echo "== ${task} (${difficulty}): check that the ${split} split can be read (before any training)"
"$PYTHON" -m finetune generate --check --config "$config" --split "$split" ${run_overrides[@]+"${run_overrides[@]}"}

echo "== ${task} (${difficulty}): task shards"
"$PYTHON" -m finetune data --config "$config" ${run_overrides[@]+"${run_overrides[@]}"}

echo "== ${task} (${difficulty}): finetune from ${init}"
if [[ "$nproc" -gt 1 ]]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m finetune \
    --config "$config" --init "$init" "${run_overrides[@]}"
else
  "$PYTHON" -m finetune --config "$config" --init "$init" "${run_overrides[@]}"
fi

echo "== ${task} (${difficulty}): generate ${split} (${mode:-default mode of the objective})"
gen_dir="${out}/generate/${split}-${mode:-default}"
gen_args=(--model "$out" --split "$split" --out "$gen_dir")
[[ -n "$mode" ]] && gen_args+=(--mode "$mode")
"$PYTHON" -m finetune generate "${gen_args[@]}"

echo "== ${task} (${difficulty}): evaluate"
"$PYTHON" -m finetune evaluate --generation "$gen_dir"
