"""Pretraining: `python -m pretrain --config configs/pretrain/<name>.yaml [--resume] [key=value ...]`;
`--validate-only [--world-size N] [--json]` checks the job without starting it (`config ok: ...`, exit 0;
`error: ...`, 2; --json: the stage's facts for the launcher).

core/               the training core, shared with finetuning (its `__init__` is the API finetune uses): engine,
                    job set-up, process groups, checkpoints and exported weights, MLflow tracking, schedule,
                    EngineConfig and the command line, the objective interface and registry
pretrain_config.py  the pretraining config: the engine's sections plus model, data and objective
run.py              validate the job (data, shards, model shape, parallel layout), build model/objective/loaders
objectives/         bang, elmer, mix, registered into the core's registry
"""
