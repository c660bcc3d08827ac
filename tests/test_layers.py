"""The architecture drawing in the README, kept true: imports only point down the floors, no
two files import each other (directly or round a loop), and imports of our own modules sit at
the top of a file unless the module says why not (LAZY below)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ms_ray"

# unit (a top-level module or package of ms_ray) -> floor; a file may import from a lower floor,
# from its own unit, or, on the shared and the top floor only, from a neighbour on its floor.
FLOORS = {
    "core": 0,  # the rule, the model, decoding, the export format: torch + transformers, no Ray
    "config": 1, "manifest": 1, "tools": 1, "tracking": 1, "ray_env": 1,  # shared: every floor may use them
    "data": 2,
    "evaluation": 3,  # one evaluation: `ms-ray eval` and the training loop both call it
    "train": 4, "serving": 4,
    "experiments": 5, "submit": 5, "preflight": 5, "cli": 5,
}
SHARED_FLOORS = {1, 5}
# Imports of our modules inside functions, each with its reason (anything else goes at the top).
LAZY = {
    "ms_ray.cli": "Ray reads its environment once, at import: a command's module is imported only "
                  "after ray_env.set_environment",
    "ms_ray.config.jobs": "the torch-free ingress validates its config: core.decode imports torch",
    "ms_ray.config.model": "the torch-free ingress validates its config: core.decode imports torch",
    "ms_ray.serving.stream_actors": "the torch-free ingress validates its config, which imports the actor "
                                    "classes: core.loading imports torch (only the recorder needs it)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[str, bool]]:
    """(module imported, inside a function?) for every import of an ms_ray module in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if node.level and not node.module:  # `from . import x`
                targets = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, id(node) in inner) for t in targets if t == "ms_ray" or t.startswith("ms_ray.")]
    return found


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imported(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_floor():
    units = {unit(m) for m in graph()} - {""}
    missing = sorted(units - set(FLOORS))
    assert not missing, f"give these a floor in FLOORS (and the README's drawing): {missing}"


def test_imports_point_down():
    upward = []
    for module, targets in graph().items():
        if not unit(module):
            continue
        here = FLOORS[unit(module)]
        for target, _ in targets:
            there = FLOORS.get(unit(target))
            if unit(target) == unit(module) or there is None:
                continue
            if there > here or (there == here and here not in SHARED_FLOORS):
                upward.append(f"{module} imports {target} (floor {here} -> {there})")
    assert not upward, "imports against the floors:\n" + "\n".join(upward)


def test_no_import_cycles_between_files():
    modules = graph()
    edges = {m: {t for t, _ in ts if t in modules and t != m} for m, ts in modules.items()}
    # a package's __init__ re-exporting its modules is not a loop back from those modules
    for m in edges:
        edges[m] = {t for t in edges[m] if not m.startswith(t + ".")}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_our_imports_are_at_the_top_unless_a_reason_is_given():
    hidden = [f"{m} imports {t} inside a function" for m, ts in graph().items() if m not in LAZY
              for t, inner in ts if inner]
    assert not hidden, ("move these to the top of the file, or state the reason in LAZY:\n" + "\n".join(hidden))


@pytest.mark.parametrize("package", ["core"])
def test_core_knows_nothing_of_ray_or_the_floors_above(package):
    for path in (PACKAGE / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {n.split(".")[0] for n in names} & {"ray", "deepspeed", "wandb", "fastapi", "httpx"}, path
