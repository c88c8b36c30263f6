"""python -m finetune --config configs/finetune/<task>.yaml --init <pretraining checkpoint> [key=value ...]
python -m finetune --validate-only [--world-size N] --config ... --init ...            check only: `config ok: ...`
python -m finetune data      --config configs/finetune/<task>.yaml [key=value ...]   build the task shards
python -m finetune generate  --model <finetune output dir> [--mode M] [--split S]    decode a split
python -m finetune evaluate  --generation <generate output dir> [...]                GLGE metrics + MLflow run
python -m finetune compare   [--experiment E]                                         quality vs latency table, PNGs
python -m finetune showcase  --generation <generate output dir> [...] [--show N]       scores + examples side by side
python -m finetune distill   --teacher <AR finetune output dir> [--split train]       an AR teacher's outputs as
                                                                                      training targets (resumable)
python -m finetune export    --model <finetune or pretraining output> --out <folder>  a Hugging Face model folder

Training runs on the pretraining engine: start it like pretraining (plainly for one process, torchrun or the
deepspeed launcher for several); so does `distill`, each process decoding its share.
"""
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SUBCOMMANDS = ("data", "generate", "evaluate", "compare", "showcase", "distill", "export")


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune` and the `tandem-finetune` console script (argv: sys.argv[1:] when None)."""
    import torch

    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "data":
            from finetune.prepare_data import main as run
        elif command == "generate":
            from finetune.generate import main as run
        elif command == "evaluate":
            from finetune.evaluation import main as run
        elif command == "distill":
            from finetune.distill import main as run
        elif command == "export":
            from finetune.export import main as run
        elif command == "compare":
            from finetune.compare import main as run
        else:
            from finetune.showcase import main as run
        return run(rest)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
    from finetune.run import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
