#!/usr/bin/env bash
# squadqg: finetune -> generate -> evaluate. Usage: finetune/scripts/squadqg.sh --init CKPT [--difficulty easy|medium|hard]
#   [--objective ar|nar|bang_mixed|janus] [--mode MODE] [--split test|valid] [--nproc N] [key=value ...]
# (see run_task.sh for the options; configs/finetune/squadqg.yaml for the settings)
exec "$(dirname "$0")/run_task.sh" squadqg "$@"
