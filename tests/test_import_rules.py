"""The layering of docs/architecture.md, checked on the source (static imports, no import side effects).

0. Every module of msdiff belongs to a layer: the core (plumbing and the plain-PyTorch modules) or
   the application (Lightning, files, the entry points' helpers). A new module must be placed here.
1. The core is plain PyTorch: no core module imports Lightning, directly or through another msdiff
   module (imports inside functions count too).
2. Imports go downward: no core module imports the application layer or an entry point, and no
   msdiff module imports an entry point (train.py, sample.py).
3. msdiff's modules import each other without a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msdiff"

LAYERS = {  # docs/architecture.md, "Layers": a module may import only its own layer and the ones below
    0: ("msdiff", "msdiff.utils", "msdiff.images", "msdiff.atomic_io", "msdiff.checkpoint_file", "msdiff.run_lock",
        "msdiff.signals", "msdiff.malloc", "msdiff.user_paths"),                                                       # plumbing
    1: ("msdiff.sde", "msdiff.tasks", "msdiff.gaussian", "msdiff.nn", "msdiff.datasets", "msdiff.cut.networks"),
    2: ("msdiff.estimators", "msdiff.samplers", "msdiff.guidance", "msdiff.metrics", "msdiff.metric_networks",
        "msdiff.metric_weights", "msdiff.cut.losses"),                                                                      # algorithms
    3: ("msdiff.data", "msdiff.systems", "msdiff.callbacks", "msdiff.train_feedback", "msdiff.resume_config",
        "msdiff.config_file", "msdiff.cli", "msdiff.sampling", "msdiff.cut", "msdiff.unpaired", "msdiff.run"),           # application
}
CORE = LAYERS[0] + LAYERS[1] + LAYERS[2]
APPLICATION = LAYERS[3]
ENTRY_POINTS = ("train", "sample")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    """The most specific prefix wins: msdiff.cut.networks is core, msdiff.cut.system application.
    "msdiff" names the package's __init__ only (not every module below it)."""
    best = max((p for p in CORE + APPLICATION if module == p or (p != "msdiff" and module.startswith(p + "."))),
               key=len, default=None)
    return "none" if best is None else ("core" if best in CORE else "application")


def _imports(module: str) -> set[str]:
    """Every module `module` imports (module level and inside functions; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(MODULES[module].read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return found


GRAPH = {m: {i for i in _imports(m) if i in MODULES} for m in MODULES}


def _level(module: str) -> int:
    """The layer number (0-3) of a module: its most specific prefix in LAYERS."""
    best = max((p for layer in LAYERS.values() for p in layer if module == p or (p != "msdiff" and module.startswith(p + "."))),
               key=len)
    return next(n for n, layer in LAYERS.items() if best in layer)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) == "none"] == []


def test_every_layer_imports_only_its_own_and_lower_layers():
    """Also inside the core: plumbing (0) imports no model (1) or algorithm (2), models no algorithm."""
    bad = sorted(f"{m} (layer {_level(m)}) imports {i} (layer {_level(i)})"
                 for m in MODULES for i in GRAPH[m] if _level(i) > _level(m))
    assert bad == []


def test_the_core_imports_no_lightning():
    core = [m for m in MODULES if _layer(m) == "core"]
    assert core, "no core module found"
    for module in core:
        seen, todo = set(), [module]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            bad = sorted(i for i in _imports(m) if i.split(".")[0] in ("lightning", "pytorch_lightning"))
            assert not bad, f"{module} imports Lightning through {m} ({bad[0]})"
            todo.extend(GRAPH[m])


def test_imports_go_downward():
    for module in MODULES:
        imported = _imports(module)
        entry = sorted(i for i in imported if i in ENTRY_POINTS)
        assert not entry, f"{module} imports an entry point: {entry}"
        if _layer(module) == "core":
            up = sorted(i for i in imported if i in MODULES and _layer(i) == "application")
            assert not up, f"{module} (core) imports the application layer: {up}"


def test_no_import_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
