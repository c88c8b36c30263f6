#!/usr/bin/env bash
# Rehearse bench/gpu_check.sh here, on the CPU, with the device image's software, before a lent GPU's few minutes
# are spent on it. The device runs CPython 3.12 and torch 2.11 with CUDA, not this venv's Python 3.11 and torch 2.13
# CPU: an incompatibility with either would otherwise show first on the device. This builds a CPython 3.12 venv
# with torch==DEVICE_TORCH (the CUDA wheel of the package registry; it imports and runs on a machine without a GPU),
# installs .whl/ into a separate folder exactly as the GPU mode does (--no-deps --target), and runs every part of the
# check's CPU mode with that interpreter at the tiny size (the fake-CUDA tests, pretraining through the engine,
# bench/mfu.py, every decoding mode, the memory plan), then the memory plan at the GPU mode's own settings.
#
#   bench/gpu_rehearsal.sh [SUMMARY]      default .cache/gpu-rehearsal/gpu_summary.txt, part logs beside it
#
# Environment: PYTHON312 (default python3.12, else pyenv's newest 3.12), DEVICE_TORCH (default 2.11.0),
# TANDEM_PYTHON (the project's venv, to prepare the tiny data; default .venv/bin/python).
# Needs .whl/ and .gpu_data/base (bench/gpu_wheels.sh, as for the device) and ~5 GB of disk for the venv (torch's
# CUDA wheels), kept under .cache/ between runs. Exits 1 unless every part passed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=.cache/gpu-rehearsal
summary="${1:-$root/gpu_summary.txt}"
torch_version="${DEVICE_TORCH:-2.11.0}"
venv="$root/py312-torch$torch_version"

py312="${PYTHON312:-}"
if [[ -z "$py312" ]]; then
    if command -v python3.12 > /dev/null && python3.12 -c pass 2> /dev/null; then py312=python3.12
    else py312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python 2> /dev/null | sort -V | tail -1); fi
fi
if [[ -z "$py312" ]] || ! "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then
    echo "error: no CPython 3.12 found (set PYTHON312)" >&2; exit 1
fi
if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "error: .whl/ is empty: run bench/gpu_wheels.sh wheels first" >&2; exit 1
fi

if ! "$venv/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$torch_version'" 2> /dev/null; then
    echo "creating $venv: $("$py312" --version), torch==$torch_version (several GB, once)"
    rm -rf "$venv"
    "$py312" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==$torch_version"
fi

data="$root/data"
if [[ ! -d "$data/shards" ]]; then
    "${TANDEM_PYTHON:-.venv/bin/python}" -m data_pipeline prepare --config configs/data/tiny.yaml \
        data_root=../shared/data "work_dir=$data"
fi

mkdir -p "$(dirname "$summary")"
TANDEM_PYTHON="$venv/bin/python" bash bench/gpu_check.sh --cpu --site "$root/site" --data "$data" "$summary"

# The plan part once more at the GPU mode's own settings (base config, its batch and lengths, .gpu_data/base): it
# runs one fake step, so it needs no GPU. Its command is the one gpu_check.sh --dry-run prints for the device.
if [[ -d .gpu_data/base/shards ]]; then
    plan=$(bash bench/gpu_check.sh --dry-run --parts plan)
    log="$(dirname "$summary")/gpu_check_logs/plan_gpu_settings.log"
    if PYTHONPATH="$root/site:$PWD" bash -c "$venv/bin/python ${plan#plan: python3 }" > "$log" 2>&1; then
        echo "plan_gpu_settings: ok $(grep -E '^(memory plan|peak_bytes)' "$log" | tr '\n' ' ')" | tee -a "$summary"
    else
        echo "plan_gpu_settings: FAILED (see $log)" | tee -a "$summary"
    fi
else
    echo "plan_gpu_settings: skipped: no .gpu_data/base (bench/gpu_wheels.sh data)" | tee -a "$summary"
fi
if grep -qE 'FAILED|TIMED OUT|skipped|loss_falls=NO' "$summary"; then
    echo "rehearsal: a part did not pass on CPython 3.12 + torch $torch_version (see $summary and its logs)" >&2
    exit 1
fi
echo "rehearsal: every part passed on CPython 3.12 + torch $torch_version"
