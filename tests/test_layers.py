"""The code's layers point one way: route -> service -> engine client -> engine -> registry ->
batcher -> runner, with the shared types below them all. Read from the source with ast:
every import counts, also those inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# Lowest first: a module imports from its own layer and the layers below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "shared types",
        ("app.errors", "app.payloads", "app.tasks", "app.config", "app.catalog", "app.heap", "app.tracing"),
    ),
    ("runners", ("app.runners",)),
    ("batching", ("app.batching",)),
    ("registry", ("app.registry", "app.metrics")),
    ("engine", ("app.engine",)),
    ("service", ("app.service",)),
    ("api", ("app.api",)),
    ("entry points", ("app.main", "app.serving", "app.logs", "app.cluster", "app.ray_serve", "app.relay")),
    ("command line", ("app.__main__",)),
]
# What the service and the routes must not reach: the engine's insides, below its clients.
ENGINE_INSIDES = (
    "app.engine.core",
    "app.engine.server",
    "app.engine.startup",
    "app.registry.registry",
    "app.batching",
    "app.runners",
)


def modules() -> dict[str, Path]:
    found = {}
    for path in APP.rglob("*.py"):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str, *, top_level_only: bool = False) -> set[str]:
    """The app modules ``path`` imports (``from app.x import y`` counts as app.x.y where that
    is a module, else app.x)."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)  # the module (or package) named in ``from``: imported, and read
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in known:
                    found.add(candidate)
    return {m for m in found if m == "app" or m.startswith("app.")} - {name}


def layer_of(module: str) -> int:
    best = -1, ""
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = rank, prefix
    assert best[0] >= 0, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return best[0]


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for name, path in modules().items():
        if name == "app":
            continue
        for target in imports(path, name):
            if target != "app" and layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_routes_and_the_service_reach_the_models_only_through_the_engine_client() -> None:
    reaching = []
    for name, path in modules().items():
        if name.startswith(("app.api", "app.service")):
            for target in imports(path, name):
                if target.startswith(ENGINE_INSIDES):
                    reaching.append(f"{name} imports {target}")
    assert not reaching, "\n".join(sorted(reaching))


def test_no_runner_imports_the_service_the_registry_or_the_engine() -> None:
    for name, path in modules().items():
        if name.startswith("app.runners"):
            above = {t for t in imports(path, name) if t.startswith(("app.service", "app.registry", "app.engine"))}
            assert not above, f"{name} imports {above}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_between_modules() -> None:
    graph = {name: imports(path, name, top_level_only=True) for name, path in modules().items()}
    assert not import_cycles(graph), f"import cycles: {import_cycles(graph)}"


def test_the_checks_see_an_upward_import(tmp_path: Path) -> None:
    """The reader itself: an upward import written into a runner is found."""
    runner = tmp_path / "runner.py"
    runner.write_text("from app.service.service import InferenceService\nimport app.registry.registry\n")
    found = imports(runner, "app.runners.runner")
    assert {"app.service.service", "app.registry.registry"} <= found
    assert layer_of("app.service.service") > layer_of("app.runners.runner")
    # The cycle the runners once had: the package's __init__, base, forward, and back.
    package = tmp_path / "__init__.py"
    package.write_text("from app.runners.base import Runner\n")
    forward = tmp_path / "forward.py"
    forward.write_text("from app.runners import onnx_runtime as onnx\n")
    graph = {
        "app.runners": imports(package, "app.runners", top_level_only=True),
        "app.runners.base": {"app.runners.forward"},
        "app.runners.forward": imports(forward, "app.runners.forward", top_level_only=True),
    }
    assert import_cycles(graph) == [["app.runners", "app.runners.base", "app.runners.forward"]]
