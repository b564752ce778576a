"""Imports flow one way (docs: the data flow of DESIGN.md): config → data → model → freeze →
optimizer → train → ablate, scripts on top. Every import statement counts, those inside
functions too, so that no cycle hides behind a function-local import."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "research", "scripts", "configs")

# Lowest first: a module may import its own layer or a lower one, never a higher one.
# ``package.*`` names the package and every module under it.
LAYERS = (
    ("models.*",),
    ("research", "research.errors", "research.tree", "research.checksums"),
    ("research.config",),
    ("research.pipeline",),
    ("research.data",),
    ("research.preprocess", "research.checkpoints", "research.pretrained", "research.convert.*"),
    ("research.freeze",),
    ("research.optim",),
    ("research.sharding", "research.guard"),
    ("research.prefix_cache",),
    ("research.phases",),
    ("research.train",),
    ("research.summary",),
    ("research.ablate", "research.publish", "research.export"),
    ("scripts.*", "configs.*"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES
            for p in sorted((ROOT / package).rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` runs (a submodule, else its package)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file; ``from package import x``
    counts as importing the submodule ``x`` where there is one, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {resolve(f"{base}.{alias.name}", known) for alias in node.names}
    return found - {None, name}


def in_layer(name: str, entry: str) -> bool:
    package = entry.removesuffix(".*")
    return name == package or (entry.endswith(".*") and name.startswith(package + "."))


def layer(name: str) -> int:
    for rank, entries in enumerate(LAYERS):
        if any(in_layer(name, entry) for entry in entries):
            return rank
    raise AssertionError(f"{name} is in no layer of LAYERS: place it in the data flow.")


KNOWN = modules()
GRAPH = {name: imports(name, path, KNOWN) for name, path in KNOWN.items()}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_module_imports_no_higher_layer(name):
    upward = sorted(m for m in GRAPH[name] if layer(m) > layer(name))
    assert not upward, f"{name} (layer {LAYERS[layer(name)]}) imports higher layers: {upward}"


def test_no_import_cycle():
    cycles, state = [], {}

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_resolver_sees_function_local_and_submodule_imports():
    assert "research.train" in GRAPH["research.ablate"]
    assert {"research.data", "research.sharding"} <= GRAPH["research.prefix_cache"]
    assert "research.train" not in GRAPH["research.prefix_cache"]


ARCHITECTURES = sorted(n for n in KNOWN if n.startswith("models.") and not n.startswith(
    "models.cpu") and n not in ("models.layers", "models.registry"))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architectures_reach_the_cpu_layer_only_through_layers(name):
    kernels = sorted(m for m in GRAPH[name] if m == "models.cpu" or m.startswith("models.cpu."))
    assert not kernels, f"{name} imports {kernels}: use the modules of models/layers.py"
    assert "models.layers" in GRAPH[name]


def test_layers_is_the_seam():
    assert "models.cpu" in GRAPH["models.layers"]
    assert not {m for m in GRAPH["models.layers"] if m.startswith("models.cpu.")}
