"""Finetuning on the training core (pretrain.core): GLGE tasks and IWSLT14, objectives ar / nar / bang_mixed /
janus, decoding in every mode, GLGE-style evaluation, MLflow comparison.

    python -m finetune data     --config configs/finetune/<task>.yaml            task shards (pretraining tokenizer)
    python -m finetune          --config configs/finetune/<task>.yaml --init <pretraining checkpoint> [key=value ...]
    python -m finetune generate --model runs/finetune/<run> --mode nar --split test
    python -m finetune evaluate --generation runs/finetune/<run>/generate/test-nar
    python -m finetune compare  --experiment tandem-finetune
    python -m finetune export   --model runs/finetune/<run> --out <folder>      a Hugging Face model folder
    finetune/scripts/<task>.sh  --init <checkpoint> --objective nar --mode nar   all of the above for one task

Files: config.py (typed config), resolve.py (task, data config, model config, decoding options: what every command
resolves from a config), run.py (validation before any process group, the run on the training core's engine, the
stage's facts for the launcher), init_checkpoint.py (finetuned model folders and where weights come from; reading
checkpoints is pretrain.core's), data.py (task data and shards), objectives.py, decoding.py (modes and options from
the config; timed batch decoding), generate.py, evaluation.py (+ metrics/, glge_tasks.py), tracking.py (MLflow tags
and runs), compare.py, export.py (Hugging Face folders; the writing itself is pretrain.core's). Of pretrain/,
finetuning uses only the training core's public API (pretrain.core).
"""
