#!/usr/bin/env bash
# xsum: finetune -> generate -> evaluate. Usage: finetune/scripts/xsum.sh --init CKPT [--difficulty easy|medium|hard]
#   [--objective ar|nar|bang_mixed|janus] [--mode MODE] [--split test|valid] [--nproc N] [key=value ...]
# (see run_task.sh for the options; configs/finetune/xsum.yaml for the settings)
exec "$(dirname "$0")/run_task.sh" xsum "$@"
