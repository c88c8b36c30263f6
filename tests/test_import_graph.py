"""The allowed arrows between the project's packages (docs/architecture.md), read from the source: every import
statement of every file, at module level or inside a function, found with ast (nothing is imported or run).

    configs          the config leaf (load_typed, config_path, ConfigError; progress): imports no project package
    model            imports configs at most: no data_pipeline, no training package, no launch
    data_pipeline    imports configs at most: no model, no training package, no launch
    pretrain.core    the training core: configs, model, data_pipeline; never a recipe (pretrain.*, finetune)
    pretrain         the pretraining recipe: the core and the packages below it; never finetune
    finetune         the finetuning recipe: of pretrain only the core's public API (`pretrain.core`), never a
                     module inside it or the pretraining recipe
    launch           configs only, and no torch / DeepSpeed / megatron-core: it asks the stages in a subprocess

and no import circle among the project's modules; megatron-core is imported only inside model/ (whose __init__
filters its import warnings). An import `from a.b import c` points at module a.b.c when that
is a module of the project, else at a.b; a package's own `__init__` running first is not counted as an arrow.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "model", "data_pipeline", "pretrain", "finetune", "launch")
TRAINING_STACK = ("torch", "deepspeed", "megatron")


def project_modules() -> dict[str, Path]:
    """module name -> file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module name the file's import statements point at (relative imports made absolute). For
    `from a import b`: a.b when that is a module of the project, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> outside top-level packages it imports).
    A name that is not a module (`import pretrain.core.nothing`) points at its longest module prefix."""
    modules = project_modules()
    edges, outside = {}, {}
    for name, path in modules.items():
        names = imported_names(name, path, modules)
        targets = set()
        for imported in names:
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                targets.add(".".join(parts))
        edges[name] = targets - {name}
        outside[name] = {n.split(".")[0] for n in names if n.split(".")[0] not in PACKAGES}
    return edges, outside


def layer(module: str) -> str:
    if module == "pretrain.core" or module.startswith("pretrain.core."):
        return "pretrain.core"
    return module.split(".")[0]


ALLOWED = {
    "configs": {"configs"},
    "model": {"configs", "model"},
    "data_pipeline": {"configs", "data_pipeline"},
    "pretrain.core": {"configs", "model", "data_pipeline", "pretrain.core"},
    "pretrain": {"configs", "model", "data_pipeline", "pretrain.core", "pretrain"},
    "finetune": {"configs", "model", "data_pipeline", "pretrain.core", "finetune"},
    "launch": {"configs", "launch"},
}


def test_every_arrow_points_down():
    edges, _ = graph()
    wrong = sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                   if layer(target) not in ALLOWED[layer(source)])
    assert wrong == []


def test_finetune_uses_only_the_public_api_of_the_training_core():
    edges, _ = graph()
    inside = sorted(f"{source} -> {target}" for source, targets in edges.items() if layer(source) == "finetune"
                    for target in targets if target.startswith("pretrain.core."))
    assert inside == []


def test_launch_imports_no_training_stack():
    _, outside = graph()
    heavy = sorted(f"{source} imports {package}" for source, packages in outside.items() if layer(source) == "launch"
                   for package in packages if package in TRAINING_STACK)
    assert heavy == []


def test_megatron_core_is_imported_only_inside_model():
    """model/__init__.py filters megatron-core's import-time warnings: that works only if every import of
    megatron-core goes through the model package, so its __init__ runs first."""
    _, outside = graph()
    elsewhere = sorted(source for source, packages in outside.items() if "megatron" in packages
                       and layer(source) != "model")
    assert elsewhere == []
    assert "megatron" in outside["model.parallel"]  # the check sees megatron-core where it is imported


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_circle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_the_checks_see_the_arrows_they_guard():
    """The graph reader itself: relative imports, imports inside functions, `from package import module`."""
    edges, outside = graph()
    assert "pretrain.core" in edges["finetune.run"]  # `from pretrain import core` names the package module
    assert {"launch.config", "launch.nodes"} <= edges["launch.preflight"]
    assert "torch" in outside["pretrain.core.engine"] and "omegaconf" in outside["configs"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
