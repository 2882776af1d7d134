"""The package's imports go downward only, and none of them forms a cycle.

The layers, from the bottom (docs/extending.md explains them): a module may import its own layer and
those below it, at module level or inside a function alike.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "unlearnlm"

LAYERS = [
    # foundations: no torch models, no config (hub resolves model ids and paths; modelcard writes and publishes cards)
    {"unlearnlm", "errors", "paths", "distributed", "settings", "hub", "modelcard", "kernels"},
    {"bench.sizes"},  # the benchmark's size table: plain numbers that data.sets and the CLI read
    {"data"},
    {"evaluation.metrics"},  # the metric table, which the config checks validation.metric against
    {"methods"},
    {"config", "tracking"},  # tracking reads the config's tracking settings
    {"model"},
    {"evaluation"},  # scores a model: may read data and load models, never trains one
    {"runstate", "reference"},  # reference: the original model's values, kept instead of a second model
    {"engine"},  # the training loop
    {"recipe"},  # unlearn(): setup, train, record, save, cleanup
    {"auto"},  # --config auto: calibration and the held-out check around the recipe
    # api: the Python API (unlearn, evaluate) that the CLI calls
    {"audit", "bench.fitting", "bench.base", "bench.calibration", "bench.target", "bench.report", "api"},
    {"bench", "demo", "ledger"},  # ledger: requests over time, on the API and the audit
    {"cli", "__main__", "boundary"},  # boundary: the error boundary every command runs inside
]

# The package's ``__init__`` hands out the Python API on first use (``unlearnlm.unlearn``, a lazy import
# inside its module ``__getattr__``): a front door, not something the foundations depend on, so that edge is
# left out of the graph (the package itself is imported from below only for ``__version__``).
FRONT_DOOR = {("unlearnlm", "unlearnlm.api")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if isinstance(node, ast.ImportFrom):  # ``from package import submodule`` imports the submodule
                names += [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules]
            targets.update(name for name in names if name.split(".")[0] == "unlearnlm")
        graph[module_name(path)] = {target for target in targets if (module_name(path), target) not in FRONT_DOOR}
    return graph


def layer(module: str) -> int:
    """The layer of the module itself when one is named, else its top-level package's."""
    inner = module.removeprefix("unlearnlm.")
    top = inner.split(".")[0]
    [rank] = [rank for rank, members in enumerate(LAYERS) if inner in members] or \
             [rank for rank, members in enumerate(LAYERS) if top in members]
    return rank


def test_every_module_has_a_layer():
    for module in imports():
        layer(module)


def test_imports_go_down_only():
    upward = sorted(f"{module} imports {target}" for module, targets in imports().items()
                    for target in targets if layer(target) > layer(module))
    assert not upward


def test_no_import_cycle():
    """A package's ``__init__`` importing its own submodules (``from unlearnlm.methods import gd``) is
    an edge to each submodule, not to itself."""
    graph = imports()
    edges = {module: {target for target in targets if target in graph and target != module}
             for module, targets in graph.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(stack[stack.index(target):] + [target])
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
