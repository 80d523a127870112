"""The import graph of src/rwkv_sft: layers point down only, and no module imports itself back.

Every import counts, including those inside functions (they hide arrows, not remove them). A
package's `__init__` is the module `rwkv_sft.pkg`; a submodule that imports its own package's
`__init__` (or the reverse) closes a circle like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "rwkv_sft"

# Lowest first. A module may import its own package and any package of a lower layer. Packages of
# one layer do not import each other (model and data know nothing of one another), except in the
# first layer (small helpers) and the last (entry points).
LAYERS = [
    {"errors", "utils", "env", "settings", "precision", "step_checkpoint"},  # helpers every layer may use
    {"tokenizer", "ops"},
    {"model", "data"},
    {"adapters", "cli_args"},  # cli_args: the flags the commands share (argparse, no torch)
    {"weights"},
    {"infer"},
    {"eval"},
    {"train"},
    {"demo", "inspect_data", "cli", "__main__", "__init__"},
]
# The public contract's `RWKV7.load` / `model.save` (the names outside code relies on) are doors from the model class into the
# file layer, imported when called; nothing else may point up, and no code of the package calls them.
# And `rwkv-sft eval` on a pairs file scores them with the preference objective's own module
# (train/preference.py), which loads none of the loop, optimizer or parallel code
# (tests/test_evaluate.py runs the command and checks).
DOORS = {("rwkv_sft.model.rwkv7", "rwkv_sft.weights"),
         ("rwkv_sft.eval.cli", "rwkv_sft.train"), ("rwkv_sft.eval.cli", "rwkv_sft.train.preference")}
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, src: Path) -> bool:
    p = src / name.replace(".", "/")
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the rwkv_sft modules it imports (a `from pkg import sub` names the submodule)."""
    graph = {}
    for path in sorted((src / "rwkv_sft").rglob("*.py")):
        name = _module_name(path, src)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "rwkv_sft"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != "rwkv_sft":
                    continue
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if _is_module(sub, src) else module)
        # importing a.b.c runs a/__init__ and a/b/__init__ first (the importer's own packages
        # excepted: they are already running when a submodule imports a sibling)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        closed = set(targets)
        for t in targets:
            parts = t.split(".")
            closed |= {".".join(parts[:i]) for i in range(2, len(parts))} - own
        graph[name] = closed - {name}
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    missing = {_top(m) for m in import_graph()} - set(LAYER_OF)
    assert not missing, f"give these a layer in LAYERS: {sorted(missing)}"


def test_imports_point_down():
    wrong = []
    for module, targets in import_graph().items():
        src = _top(module)
        for target in targets:
            dst = _top(target)
            if dst == src or target == "rwkv_sft" or (module, target) in DOORS:
                continue
            below, same = LAYER_OF[dst] < LAYER_OF[src], LAYER_OF[dst] == LAYER_OF[src]
            if not below and not (same and LAYER_OF[src] in (0, len(LAYERS) - 1)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    graph = {m: {t for t in targets if (m, t) not in DOORS} for m, targets in import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(graph, expected):
    assert _cycles(graph) == expected


def test_graph_sees_hidden_arrows(tmp_path):
    # the checks are only as good as the parser: imports inside functions, relative imports of a
    # package's submodule, and the package __init__ that every submodule import runs
    pkg = tmp_path / "rwkv_sft"
    (pkg / "model").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("from .rwkv7 import RWKV7\n")
    (pkg / "model" / "rwkv7.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("import rwkv_sft.model.rwkv7\n")
    graph = import_graph(tmp_path)
    assert graph["rwkv_sft.model.rwkv7"] == {"rwkv_sft.train", "rwkv_sft.train.loop"}
    assert graph["rwkv_sft.train.loop"] == {"rwkv_sft.model", "rwkv_sft.model.rwkv7"}
    assert graph["rwkv_sft.model"] == {"rwkv_sft.model.rwkv7"}
    assert _cycles(graph) == [["rwkv_sft.model", "rwkv_sft.model.rwkv7", "rwkv_sft.train.loop"]]


def test_the_doors_are_only_doors():
    # the contract's file methods stay thin, and the package itself goes through rwkv_sft.weights
    import re
    calls = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"RWKV7\.load\(|\bmodel\.save\(", line)]
    assert not calls, f"use rwkv_sft.weights.load_model/save_model instead: {calls}"
