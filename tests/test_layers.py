"""The package's import graph: no cycles between modules (imports inside functions count too,
imports for type checkers only do not), and the layers of DESIGN.md section 2 (runtime and
kernels never import export, train, benchmarks or scale)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "kernels", "export", "train", "benchmarks", "scale")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["cinemae", *parts])


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """cinemae module -> the cinemae modules it imports (anywhere in the file)."""
    files = {module_name(p): p for pkg in PACKAGES if (REPO / pkg).is_dir()
             for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If) and is_type_checking(top.test)
                       for stmt in top.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                names = [root] + [f"{root}.{a.name}" for a in node.names]
            for n in names:
                if n in files and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def package_reaches(mod: str, graph: dict[str, set[str]]) -> set[str]:
    """Every cinemae module reachable from ``mod`` (a module's package __init__ counts)."""
    seen: set[str] = set()
    todo = [mod]
    while todo:
        m = todo.pop()
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_find_cycle_finds_one() -> None:  # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "cinemae.runtime.scan.cli" in graph and "cinemae.runtime.cli" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_runtime_and_kernels_stay_below_export_train_and_bench() -> None:
    graph = import_graph()
    for mod in graph:
        if mod.startswith(("cinemae.runtime", "cinemae.kernels")):
            bad = {d for d in package_reaches(mod, graph)
                   if d.startswith(("cinemae.export", "cinemae.train", "cinemae.benchmarks", "cinemae.scale"))}
            assert not bad, f"{mod} reaches {sorted(bad)}"


def test_library_code_logs_and_commands_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Library modules say what they do through ``logging`` (no print, no stdout of their own);
    a command's configure_logging turns those records into plain lines on its stream."""
    import ast
    import logging

    from cinemae.runtime.commands import configure_logging

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for pkg in ("runtime", "kernels", "export", "train", "benchmarks"):
        for f in (repo / pkg).rglob("*.py"):
            rel = f.relative_to(repo)
            if f.name in ("cli.py", "commands.py", "__main__.py", "stream.py", "serve.py", "serve_load.py",
                          "build_default.py", "pretrain_mae.py", "photo_tiles.py", "gpu_check.py", "tensorrt_aot.py",
                          "reship_views.py", "device_pretrain.py", "merge_flips.py") \
                    or "serve" in rel.parts:
                continue  # commands print: the CLIs, the service and stream reader, the two training scripts,
                # the GPU check and the device pretraining (stdlib-only scripts for the lent GPU machine),
                # the ahead-of-time engine report, the re-shipping views report and the flip merge
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Name) and node.id == "print":
                    offenders.append(f"{f.relative_to(repo)}:{node.lineno}")
    assert not offenders, offenders
    configure_logging("stdout")
    logging.getLogger("cinemae.export.bundle").info("parity passed")
    logging.getLogger("cinemae.export.bundle").debug("not shown")
    configure_logging("stderr")  # replaces, does not add
    logging.getLogger("cinemae.train.head").info("epoch 1")
    got = capsys.readouterr()
    assert got.out == "parity passed\n" and got.err == "epoch 1\n"
