"""python -m pretrain --config configs/pretrain/<name>.yaml [--resume] [key=value ...]
python -m pretrain --validate-only [--world-size N] --config ... [key=value ...]   check only: `config ok: ...`
python -m pretrain --plan [--world-size N] --config ... [key=value ...]            the peak GPU memory per rank, planned

Exit codes: 0 done; 2 a bad config (`error: ...` names the field or file); 128 + signal number when stopped by
SIGTERM / SIGINT (the MLflow run is then KILLED).

Started by the deepspeed launcher (`deepspeed --num_gpus 2 --module pretrain ...`), by torchrun, or plainly for one
process. See pretrain/run.py for what it builds.
"""
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main(argv: list[str] | None = None) -> int:
    """`python -m pretrain` and the `tandem-pretrain` console script (argv: sys.argv[1:] when None)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pretrain.run import main as run

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
