#!/usr/bin/env bash
# Fill .whl/ and .gpu_data/ for bench/gpu_check.sh, here, on a machine with the project's venv and the registry.
#
#   bench/gpu_wheels.sh            # both
#   bench/gpu_wheels.sh wheels     # only .whl/
#   bench/gpu_wheels.sh data       # only .gpu_data/
#
# .whl/: the wheels of everything the GPU check imports besides torch (whose image brings torch 2.11 and CUDA),
# for CPython 3.12 on manylinux x86_64: the dependency closure of deepspeed, megatron-core, webdataset,
# sentencepiece, omegaconf, pyyaml, tqdm, numpy, transformers (bench/mfu.py's peer) and pytest, at the versions
# installed in this venv (constraints.txt), minus torch's own closure (typing-extensions kept: pydantic needs a
# recent one) and hf-xet (only for downloads). Each is fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl NAME==VERSION
# DeepSpeed publishes only a source archive: it is built here as a pure-Python wheel (DS_BUILD_OPS=0: no op is
# compiled; the GPU check never needs one, see optim.impl in pretrain/core/config.py).
# .gpu_data/: the base data config's pipeline (Wikipedia excerpt + books from ../shared/data, 32k unigram
# tokenizer, 511-token samples) into .gpu_data/base: the device machine receives only the repository tree, so the
# data travels inside it, in this ignored folder. Both folders go to the device with `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TANDEM_PYTHON:-.venv/bin/python}"
what="${1:-all}"

wheels() {
    mkdir -p .whl
    local pins
    pins=$("$PY" - <<'EOF'
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ["deepspeed", "megatron-core", "webdataset", "sentencepiece", "omegaconf", "pyyaml", "tqdm", "numpy",
         "transformers", "pytest", "pytest-timeout", "typing-extensions"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "os_name": "posix",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}


def closure(names):
    seen, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen[name] = metadata.version(name)
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(TARGET):
                todo.append(req.name)
    return seen


image = set(closure(["torch"])) - {"typing-extensions"}
# hf-xet: huggingface_hub's transfer backend, imported only to download (4 MB of the 64 MiB carried).
unused = {"hf-xet"}
print("\n".join(f"{n}=={v}" for n, v in sorted(closure(ROOTS).items()) if n not in image | unused))
EOF
)
    for pin in $pins; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$pin" 2>/dev/null && continue
        # No wheel published (deepspeed, antlr4-python3-runtime): build one from the source archive; only a
        # pure-Python one (py3-none-any) can serve another Python version.
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$pin"
        local name="${pin%%==*}"
        if ! ls .whl | grep -i "^${name//-/_}-${pin##*==}-py[23.]*-none-any.whl$" > /dev/null; then
            echo "error: $pin has no wheel for CPython 3.12 and does not build as a pure-Python one" >&2
            exit 1
        fi
    done
    echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1))"
}

data() {
    "$PY" -m data_pipeline prepare --config configs/data/base.yaml data_root=../shared/data work_dir=.gpu_data/base \
        extract.num_workers=2 shard.num_workers=2 tokenizer.num_threads=2 tokenizer.sample_chars=20000000 \
        shard.samples_per_shard=1000
    echo ".gpu_data: $(du -sh .gpu_data | cut -f1)"
}

case "$what" in
    all) wheels; data ;;
    wheels) wheels ;;
    data) data ;;
    *) echo "usage: bench/gpu_wheels.sh [all|wheels|data]" >&2; exit 2 ;;
esac
