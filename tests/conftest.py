"""Shared test fixtures: where the real data lives, and a quiet, CPU-only environment."""
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """../shared/data beside the repository (TANDEM_DATA_ROOT overrides)."""
    return Path(os.environ.get("TANDEM_DATA_ROOT", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        raise FileNotFoundError(f"shared data not found at {root}; set TANDEM_DATA_ROOT")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny(shared_data, tmp_path_factory):
    """configs/data/tiny.yaml prepared once per session (extract -> tokenizer -> shards) on ../shared/data."""
    from data_pipeline.config import load_config
    from data_pipeline.prepare import prepare

    cfg = load_config(REPO_ROOT / "configs" / "data" / "tiny.yaml",
                      [f"data_root={shared_data}", f"work_dir={tmp_path_factory.getbasetemp() / 'tandem-data'}"])
    prepare(cfg)
    return cfg


@pytest.fixture(scope="session")
def small(tiny):
    """Uneven shards (1000, 1000, ~700 samples) of the WikiText documents, in <work_dir>/small_shards; the
    config returned reads them (loader.shard_dir)."""
    import shutil

    from data_pipeline.config import load_config
    from data_pipeline.shards import run_shard

    docs = tiny.in_work("small_docs")
    docs.mkdir(exist_ok=True)
    for f in tiny.in_work("docs").glob("wikitext-*.jsonl.gz"):
        shutil.copy(f, docs / f.name)
    cfg = load_config(REPO_ROOT / "configs" / "data" / "tiny.yaml",
                      [f"data_root={tiny.data_root}", f"work_dir={tiny.work_dir}", "extract.out_dir=small_docs",
                       "shard.out_dir=small_shards", "shard.samples_per_shard=1000", "loader.shard_dir=small_shards"])
    run_shard(cfg)
    return cfg
