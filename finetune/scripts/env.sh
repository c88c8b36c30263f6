# Sourced by the scripts beside it: the interpreter and the environment every project command of theirs runs with.
# PYTHON: as set by the caller, else .venv/bin/python if present, else python. DeepSpeed's accelerator: as set by
# the caller, else the CPU one only where torch sees no GPU (a GPU node must never train on its CPU because of this).
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python )}"
export MLFLOW_DISABLE_TELEMETRY=true
if [[ -z "${DS_ACCELERATOR:-}" ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  export DS_ACCELERATOR=cpu
fi
