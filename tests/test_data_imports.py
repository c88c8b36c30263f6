"""data_pipeline's stages share their artifact formats through data_pipeline/artifacts.py instead of importing one
another: no import circle inside the package (counting imports inside functions, which hide circles from a plain
import), no private name imported across modules, and extract, shards and tokenizer each import alone."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.config import REPO_ROOT

PACKAGE = REPO_ROOT / "data_pipeline"


def project_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(data_pipeline module imported, names taken from it) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("data_pipeline."):
            out.append((node.module.split(".")[1], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("data_pipeline.")]
    return out


def import_graph() -> dict[str, set[str]]:
    return {p.stem: {m for m, _ in project_imports(p)} for p in PACKAGE.glob("*.py")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, path = [], []

    def visit(node, on_path):
        if node in on_path:
            found.append(path[path.index(node):] + [node])
            return
        on_path.add(node)
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, on_path)
        path.pop()
        on_path.discard(node)

    for start in sorted(graph):
        visit(start, set())
    return found


def test_no_import_circle_and_no_private_imports():
    graph = import_graph()
    assert {"extract", "shards", "tokenizer", "artifacts"} <= graph.keys()
    assert cycles(graph) == []
    stages = {"extract", "shards", "tokenizer"}
    assert all("artifacts" in graph[s] for s in stages)
    assert {(a, b) for a in stages for b in graph[a] & stages} == {("shards", "tokenizer")}  # shards tokenizes
    private = [(p.name, m, n) for p in PACKAGE.glob("*.py") for m, names in project_imports(p) for n in names
               if n.startswith("_")]
    assert private == []


def test_cycle_finder_finds_a_hidden_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                            ["c", "a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["extract", "shards", "tokenizer"])
def test_each_stage_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import data_pipeline.{module}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
