"""The package's structure: layers that only look down, no cycles, no private names
crossing modules, no function that shadows a module, small modules.

Read from the source with `ast` (imports inside functions count too), so nobody
has to remember the rule: a change that breaks it fails here.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "slimkit"

# Lowest first. A module may import from its own layer and the layers before it.
# The techniques share a layer but never import one another: what two of them share
# lives in core.
LAYERS = [
    ("core",),
    ("io",),
    ("quantization", "pruning", "distillation"),
    ("exporters",),
    ("measure",),
    ("report",),
    ("search",),
    ("cli",),
]
TECHNIQUES = set(LAYERS[2])
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every slimkit import of `module`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "slimkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                source = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "slimkit":
                found += [(source, a.name) for a in node.names]
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for source, name in _imports(module, path):
            target = f"{source}.{name}" if f"{source}.{name}" in MODULES else _resolve(source)
            if target and target not in (module, "slimkit"):  # the package's face (slimkit/__init__) is no layer
                edges[module].add(target)
    return edges


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # slimkit/__init__.py: the public face imports every layer
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def test_every_package_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in MODULES if "." in m} - {p for layer in LAYERS for p in layer})
    assert not unplaced, f"packages without a layer in LAYERS: {unplaced}"


def test_imports_only_look_down():
    upward = []
    for module, targets in _edges().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here is None or there is None:
                continue
            if there > here:
                upward.append(f"{module} -> {target}")
            elif there == here and module.split(".")[1] != target.split(".")[1] and module.split(".")[1] in TECHNIQUES:
                upward.append(f"{module} -> {target} (techniques never import one another)")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    crossing = []
    for module, path in MODULES.items():
        for source, name in _imports(module, path):
            full = f"{source}.{name}"
            if name.startswith("_") and not name.startswith("__") and full not in MODULES and _resolve(source) != module:
                crossing.append(f"{module} imports {full}")
    assert not crossing, "\n".join(crossing)


def test_no_function_or_class_shadows_a_module():
    """`import slimkit.x.y as m` always hands back the module: no package defines a name
    that is also one of its submodules."""
    shadowing = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names
                    if f"{n.module}.{a.name}" not in MODULES}  # a function imported into the package's face
        shadowing += [f"{module}.{name}" for name in sorted(defined) if f"{module}.{name}" in MODULES]
    assert not shadowing, f"names that are both a submodule and something else: {shadowing}"


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := p.read_text().count("\n")) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them where their concerns part): {long}"
