"""Pretraining: `python -m pretrain --config configs/pretrain/<name>.yaml [--resume] [key=value ...]`;
`--validate-only [--world-size N]` checks the job without starting it (`config ok: ...`, exit 0; `error: ...`, 2).

config.py       typed config sections, YAML + overrides, validation before any process group
run.py          validate the job (data, shards, model shape, parallel layout), build model/objective/loaders
job.py          the command line and the set-up around the engine shared with finetuning (process groups,
                seeds, SIGTERM/SIGINT -> Stopped, exit codes)
distributed.py  torch.distributed via DeepSpeed, megatron-core groups, DeepSpeed's mpu adapter
engine.py       the training engine (also used by finetuning): DeepSpeed ZeRO, loop, eval, logging
checkpoint.py   DeepSpeed checkpoints + per-rank state, the atomic `latest` pointer
tracking.py     MLflow from rank 0 with a JSONL fallback
schedule.py     warmup + decay learning-rate factor
objectives/     bang, elmer, mix behind one interface and registry (finetune adds its own)
"""
