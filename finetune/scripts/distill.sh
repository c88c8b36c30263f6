#!/usr/bin/env bash
# Sequence-level knowledge distillation, the BANG-style path: AR teacher -> distill the training split -> NAR (or
# JANUS) student on the teacher's outputs -> NAR / semi-NAR / early-exit decoding -> evaluate -> compare, beside the
# same student trained on the gold targets (--gold).
#
#   finetune/scripts/distill.sh --task TASK --init CKPT [--teacher DIR] [--student nar|janus] [--gold]
#       [--modes "nar semi_nar early_exit"] [--teacher-modes ar_beam] [--split valid|test] [--difficulty D]
#       [--limit N] [--nproc N]
#       [--out DIR] [--experiment E] [--tracking-uri URI]
#       [--teacher-set k=v]... [--student-set k=v]... [--distill-arg ARG]... [key=value ...]
#
# CKPT: the pretraining checkpoint the teacher and the students start from (or `scratch`).
# --teacher DIR: an AR finetune output folder to distill instead of training one.
# --gold: also train the student on the gold targets; `compare` then shows both (its `targets` column).
# --modes / --teacher-modes: the decoding modes of the students / of the teacher (its AR beam search is what
#   `compare` measures the students' speedup against; "" skips).
# --split / --limit: decode and score that split (the first N examples).
# key=value: every finetune (teacher and students); --teacher-set / --student-set: only the teacher's / students'.
# --distill-arg: one argument for `python -m finetune distill` (e.g. --distill-arg --limit --distill-arg 2000, or
#   --distill-arg decode.beam_size=5).
# --nproc N > 1: training and distillation run on N processes with torchrun (distillation: each decodes a share).
# Writes <out>/teacher, <out>/distilled, <out>/student-distilled (and <out>/student-gold), each student's
# generate/<split>-<mode>/ and <out>/compare/. Every step is a plain project command; rerunning skips nothing but
# the distillation, which resumes (or finds its set complete). Environment: PYTHON (default .venv/bin/python).
set -euo pipefail

task="" init="" teacher="" student="nar" gold=0 modes="nar semi_nar early_exit" teacher_modes="ar_beam"
split="valid" difficulty="easy"
limit=0 nproc=1 out="" experiment="" tracking_uri=""
common=() teacher_set=() student_set=() distill_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --task) task="$2"; shift 2 ;;
    --init) init="$2"; shift 2 ;;
    --teacher) teacher="$2"; shift 2 ;;
    --student) student="$2"; shift 2 ;;
    --gold) gold=1; shift ;;
    --modes) modes="$2"; shift 2 ;;
    --teacher-modes) teacher_modes="$2"; shift 2 ;;
    --split) split="$2"; shift 2 ;;
    --difficulty) difficulty="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --experiment) experiment="$2"; shift 2 ;;
    --tracking-uri) tracking_uri="$2"; shift 2 ;;
    --teacher-set) teacher_set+=("$2"); shift 2 ;;
    --student-set) student_set+=("$2"); shift 2 ;;
    --distill-arg) distill_args+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *=*) common+=("$1"); shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$task" ]] || { echo "--task is required (a GLGE task or iwslt14)" >&2; exit 2; }
[[ -n "$init" ]] || { echo "--init <pretraining checkpoint> is required (or --init scratch)" >&2; exit 2; }
[[ "$student" == nar || "$student" == janus ]] || { echo "--student must be nar or janus" >&2; exit 2; }

source "$(dirname "$0")/env.sh"
config="configs/finetune/${task}.yaml"
[[ -f "$config" ]] || { echo "no config $config (run from the repository root)" >&2; exit 2; }
out="${out:-runs/finetune/${task}-${difficulty}-distill}"
common=("task.difficulty=${difficulty}" ${common[@]+"${common[@]}"})
[[ -n "$experiment" ]] && common+=("tracking.experiment=${experiment}")
[[ -n "$tracking_uri" ]] && common+=("tracking.uri=${tracking_uri}")

on_ranks() {  # python -m finetune <args> on --nproc processes
  if [[ "$nproc" -gt 1 ]]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m finetune "$@"
  else
    "$PYTHON" -m finetune "$@"
  fi
}

echo "== ${task} (${difficulty}): check the ${split} split, build the task shards"
"$PYTHON" -m finetune generate --check --config "$config" --split "$split" "${common[@]}"
"$PYTHON" -m finetune data --config "$config" "${common[@]}"

if [[ -z "$teacher" ]]; then
  teacher="${out}/teacher"
  echo "== AR teacher from ${init}"
  on_ranks --config "$config" --init "$init" objective.name=ar "output_dir=${teacher}" "${common[@]}" \
    ${teacher_set[@]+"${teacher_set[@]}"}
fi

echo "== distill the training split with the teacher's beam search"
on_ranks distill --teacher "$teacher" --split train --out "${out}/distilled" ${distill_args[@]+"${distill_args[@]}"}

decode_and_score() {  # <model dir> <modes>: generate each mode on --split, evaluate them in one call
  local generations=()
  for mode in $2; do
    "$PYTHON" -m finetune generate --model "$1" --split "$split" --mode "$mode" --out "$1/generate/${split}-${mode}" \
      --limit "$limit"
    generations+=("$1/generate/${split}-${mode}")
  done
  [[ ${#generations[@]} -eq 0 ]] || "$PYTHON" -m finetune evaluate --generation "${generations[@]}"
}

echo "== the teacher decodes ${split}: ${teacher_modes:-skipped}"
decode_and_score "$teacher" "$teacher_modes"

students=(distilled)
[[ "$gold" == 1 ]] && students+=(gold)
for targets in "${students[@]}"; do
  dir="${out}/student-${targets}"
  extra=()
  [[ "$targets" == distilled ]] && extra+=("data.distilled=${out}/distilled")
  echo "== ${student} student on ${targets} targets"
  on_ranks --config "$config" --init "$init" "objective.name=${student}" "output_dir=${dir}" "${common[@]}" \
    ${extra[@]+"${extra[@]}"} ${student_set[@]+"${student_set[@]}"}
  decode_and_score "$dir" "$modes"
done

echo "== compare"
compare=(--task "$task" --out "${out}/compare")
[[ -n "$experiment" ]] && compare+=(--experiment "$experiment")
[[ -n "$tracking_uri" ]] && compare+=(--tracking-uri "$tracking_uri")
"$PYTHON" -m finetune compare "${compare[@]}"
