"""Finetuning on the pretraining engine: GLGE tasks and IWSLT14, objectives ar / nar / bang_mixed / janus, decoding
in every mode, GLGE-style evaluation, MLflow comparison.

    python -m finetune data     --config configs/finetune/<task>.yaml            task shards (pretraining tokenizer)
    python -m finetune          --config configs/finetune/<task>.yaml --init <pretraining checkpoint> [key=value ...]
    python -m finetune generate --model runs/finetune/<run> --mode nar --split test
    python -m finetune evaluate --generation runs/finetune/<run>/generate/test-nar
    python -m finetune compare  --experiment tandem-finetune
    finetune/scripts/<task>.sh  --init <checkpoint> --objective nar --mode nar   all of the above for one task

Files: config.py (typed config), run.py (validation before any process group, the run on pretrain.engine),
init_checkpoint.py (weights from DeepSpeed / full-state-dict checkpoints, shape checks), data.py (task data and
shards), objectives.py, decoding.py (modes and options from the config; timed batch decoding), generate.py,
evaluation.py (+ metrics/, glge_tasks.py), tracking.py (MLflow tags and runs), compare.py.
"""
