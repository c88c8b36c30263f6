"""Installed commands that work from any folder, on outputs that can be moved, with real processes and real data:

  * `make venv` (`pip install -e`) puts the console scripts tandem-data, tandem-pretrain, tandem-finetune and
    tandem-launch beside the Python that runs the tests; they run from a folder outside the repository;
  * pretraining, run from a temporary folder with the repository's relative config paths (--config, data.config,
    deepspeed.config), names the missing held-out shards with one command; that command, run as printed, builds
    them (showing one progress line per file off a terminal) and the same check then passes;
  * a finetuning output folder holds its tokenizer: moved elsewhere, with the data's tokenizer folder out of
    reach, `generate --model <moved folder>` still decodes, shows its progress (10 lines off a terminal for 10
    batches) and none of megatron-core's import warnings.
"""
from __future__ import annotations

import configparser
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.config import load_config
from data_pipeline.errors import ConfigError
from data_pipeline.prepare import prepare
from finetune_helpers import ENV, GIGAWORD, as_list_override, build_test_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("tandem-data", "tandem-pretrain", "tandem-finetune", "tandem-launch")
PACKAGES = ("configs", "model", "data_pipeline", "pretrain", "finetune", "launch")  # setup.cfg's packages


def run_in(folder: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=folder, env=ENV, capture_output=True, text=True, timeout=timeout)


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: {command: "package.module:function"}."""
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_console_scripts_of_an_installed_copy_run_from_anywhere(tmp_path):
    """pip installs the project (not editable, no dependencies, nothing downloaded) into a folder of its own; its
    scripts run from another folder with only that copy on the path, and find the configs the copy carries."""
    assert set(console_scripts()) == set(SCRIPTS)
    source, installed, cwd = tmp_path / "source", tmp_path / "installed", tmp_path / "cwd"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = run_in(tmp_path, [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(installed), str(source)], timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert sorted(path.name for path in (installed / "bin").iterdir()) == sorted(SCRIPTS)
    cwd.mkdir()
    env = dict(ENV, PYTHONPATH=str(installed))  # the installed copy, not the repository

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(installed / "bin" / name), *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)

    for name, word in (("tandem-data", "prepare"), ("tandem-launch", "--dry-run")):
        shown = script(name, "--help")
        assert shown.returncode == 0 and "usage:" in shown.stdout and word in shown.stdout, shown.stderr[-2000:]
    # configs/data/tiny.yaml read from the copy's package data; its work_dir, relative to the copy, has no shards
    inspected = script("tandem-data", "inspect", "--config", "configs/data/tiny.yaml")
    assert inspected.returncode == 2, inspected.stderr[-2000:]
    assert f"{installed / 'runs' / 'data' / 'tiny' / 'shards' / 'manifest.json'}: manifest not found" \
        in inspected.stderr
    # pretraining's config, and the data and DeepSpeed configs it names, all found; the shards are what it lacks
    validated = script("tandem-pretrain", "--validate-only", "--config", "configs/pretrain/tiny.yaml",
                       "tracking.mlflow=false", f"output_dir={tmp_path / 'out'}")
    assert validated.returncode == 2, validated.stdout[-2000:] + validated.stderr[-2000:]
    assert "data.config: no shards at" in validated.stderr and "file not found" not in validated.stderr


def test_heldout_hint_is_the_command_that_builds_them(shared_data, tmp_path):
    work, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = [f"work_dir={work}", f"data_root={shared_data}", "sources.wikipedia=[]", "sources.books=[]",
            "shard.samples_per_shard=1000"]  # WikiText only: the training shards build in seconds
    proc = run_in(elsewhere, [sys.executable, "-m", "data_pipeline", "prepare", "--config", "configs/data/tiny.yaml",
                              *data], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    validate = [sys.executable, "-m", "pretrain", "--validate-only", "--config", "configs/pretrain/tiny.yaml",
                as_list_override("data.overrides", data), f"output_dir={tmp_path / 'out'}", "tracking.mlflow=false"]

    refused = run_in(elsewhere, validate)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert f"data.eval_overrides: no shards at {work / 'heldout' / 'shards'}" in refused.stderr
    hint = refused.stderr.split("build them with `")[1].split("`")[0]
    assert hint == shlex.join(["python", "-m", "data_pipeline", "prepare", "--heldout", "--config",
                               "configs/data/tiny.yaml", *data])

    built = run_in(elsewhere, [sys.executable, *shlex.split(hint)[1:]], timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((work / "heldout" / "shards" / "manifest.json").read_text())
    training = json.loads((work / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] > 100 and manifest["tokenizer"]["checksum"] == training["tokenizer"]["checksum"]
    assert manifest["config"]["config_file"] == str(REPO_ROOT / "configs" / "data" / "tiny.yaml")
    # off a terminal, one line per tenth: the held-out text is one file (the training steps were up to date)
    progress = [line for line in built.stderr.splitlines() if line.startswith(("[extract]", "[shard]"))]
    assert [line.split(",")[0] for line in progress] == ["[extract] 1/1 file (100%)", "[shard] 1/1 file (100%)"]

    accepted = run_in(elsewhere, validate)
    assert accepted.returncode == 0 and accepted.stdout.startswith("config ok: pretrain tiny"), accepted.stderr


def test_a_heldout_build_that_cannot_work_is_refused_before_any_work(tmp_path):
    tiny = REPO_ROOT / "configs" / "data" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"tiny.yaml: heldout\.sources: empty"):
        prepare(load_config(tiny, [f"work_dir={tmp_path}", "heldout.sources.books=[]"]), with_heldout=True)
    with pytest.raises(ConfigError, match=r"tiny.yaml: heldout\.shard_dir: is the training folder 'shards'"):
        prepare(load_config(tiny, [f"work_dir={tmp_path}", "heldout.shard_dir=shards"]), with_heldout=True)
    assert list(tmp_path.iterdir()) == []  # nothing was built
    # the older recipe (extract and shard with their out_dir aimed at heldout/, as launch/demo.py does) still loads
    assert load_config(tiny, ["extract.out_dir=heldout/docs", "shard.out_dir=heldout/shards"]).shard.out_dir == \
        "heldout/shards"


@pytest.fixture(scope="module")
def data(shared_data) -> list[str]:
    return build_test_data(shared_data)


def test_a_moved_finetune_output_still_generates(data, shared_data, tmp_path):
    out = tmp_path / "ft"
    train = run_in(REPO_ROOT, [sys.executable, "-m", "finetune", "--config", GIGAWORD, "--init", "scratch",
                               as_list_override("data.overrides", data), "task.epochs=0", "train.steps=2", "schedule.warmup_steps=1",
                               "data.batch_size=8", "data.max_source_len=32", "eval.batches=0",
                               "valid_generation.samples=0", "checkpoint.save_at_end=false", "tracking.mlflow=false",
                               "deepspeed.precision=fp32", f"output_dir={out}"], timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    meta = json.loads((out / "finetune_meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer/tokenizer.model"  # relative to the folder: its own copy
    moved = tmp_path / "moved" / "model"
    moved.parent.mkdir()
    shutil.move(out, moved)

    # the data's tokenizer out of reach: a data work_dir without one (the task text still comes from data_root)
    nowhere = tmp_path / "no-data-work-dir"
    args = [sys.executable, "-m", "finetune", "generate", "--model", "model", "--split", "valid", "--limit", "20",
            "--batch-size", "2", "--mode", "ar_greedy", "--out", "gen", "decode.max_len=8",
            f"data.overrides=['work_dir={nowhere}','data_root={shared_data}']"]
    gen = run_in(moved.parent, args, timeout=600)
    assert gen.returncode == 0, gen.stdout[-2000:] + gen.stderr[-3000:]
    assert len((moved.parent / "gen" / "gigaword.easy.valid").read_text().splitlines()) == 20
    lines = [line for line in gen.stderr.splitlines() if line.startswith("[generate ar_greedy] ")]
    assert [line.split(" (")[0] for line in lines] == [f"[generate ar_greedy] {n}/20 ex" for n in range(2, 21, 2)]
    assert "Transformer Engine and Apex are not installed" not in gen.stdout + gen.stderr
