#!/usr/bin/env bash
# iwslt14: finetune -> generate -> evaluate. Usage: finetune/scripts/iwslt14.sh --init CKPT [--difficulty easy|medium|hard]
#   [--objective ar|nar|bang_mixed|janus] [--mode MODE] [--split test|valid] [--nproc N] [key=value ...]
# (see run_task.sh for the options; configs/finetune/iwslt14.yaml for the settings)
exec "$(dirname "$0")/run_task.sh" iwslt14 "$@"
