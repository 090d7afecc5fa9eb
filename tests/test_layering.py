"""Dependencies inside the graphsync package point one way: down the layers below, never up.

Each module of ``daemon/graphsync`` is parsed with ``ast`` (nothing is imported), mapped to a layer by the first
component of its name after ``graphsync.`` (so ``graphsync.config.models`` is ``config``), and every
``graphsync`` import in it, wherever it stands, is checked: a module may import its own layer and the ones below.

Imports under ``if TYPE_CHECKING:`` are held to the same rule. An annotation that names an upper layer's class is
still a dependency on it; the way out is a small Protocol or callable type in the lower module (as
``scheduler.Daemon`` takes a ``health`` factory). Imports of ``config`` pass anyway: it is a leaf.

A module that is not in the map fails the test until it is added, so the map stays the whole truth.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = "graphsync"
PACKAGE_DIR = REPO_ROOT / "daemon" / PACKAGE
ROOT = "__init__"  # `from graphsync import __version__`: the package itself, a leaf

# Highest first. A module may import modules of its own layer and of any layer below it.
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("command line and reports", frozenset({"cli", "__main__", "console", "preflight", "status"})),
    ("scheduler", frozenset({"scheduler", "pool", "affinity", "notify"})),
    ("jobs", frozenset({"jobs", "upkeep"})),
    ("rounds", frozenset({"rounds", "publication", "coldstore", "reconcile", "logrounds"})),
    ("outputs and working stores", frozenset({"sinks", "snapshot", "workstore", "tables"})),
    ("Graph and tokens", frozenset({"graph", "tokencache", "identity", "cache_envelope"})),
    ("storage", frozenset({"storage"})),
    # Usable by all. health and systemd are here, not at the top: they import nothing of graphsync, and the
    # scheduler drives them (it starts the health server and notifies systemd).
    (
        "leaves",
        frozenset(
            {
                ROOT,
                "config",
                "schedule",
                "chunking",
                "chunkindex",
                "limits",
                "logs",
                "metrics",
                "redaction",
                "text",
                "timestamps",
                "health",
                "systemd",
                "jsoncodec",
                "prefetch",
            }
        ),
    ),
]
RANK = {component: len(LAYERS) - index for index, (_, members) in enumerate(LAYERS) for component in members}
LAYER_NAME = {component: name for name, members in LAYERS for component in members}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """``graphsync.config.models`` → ``config``; ``graphsync`` → the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def is_submodule(name: str) -> bool:
    return (PACKAGE_DIR / f"{name}.py").is_file() or (PACKAGE_DIR / name / "__init__.py").is_file()


def graphsync_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every graphsync module ``source`` imports, as a full dotted name, relative imports resolved."""
    here = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == PACKAGE:  # `from graphsync import redaction` names a module; `__version__` does not
                found |= {f"{PACKAGE}.{a.name}" if is_submodule(a.name) else PACKAGE for a in node.names}
            else:
                found.add(base)
    return {name for name in found if name == PACKAGE or name.startswith(f"{PACKAGE}.")}


def layering_problems(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """One line per module missing from the map and per import that reaches up: ``module → import``."""
    problems: list[str] = []
    for module, (source, is_package) in sorted(modules.items()):
        own = component(module)
        if own not in RANK:
            problems.append(f"{module}: not in the layer map: add it to the layer map in {Path(__file__).name}")
            continue
        for target in sorted(graphsync_imports(source, module, is_package)):
            theirs = component(target)
            if theirs not in RANK:
                problems.append(f"{module} → {target}: not in the layer map: add it to the layer map")
            elif RANK[theirs] > RANK[own]:
                problems.append(
                    f"{module} → {target}: layer '{LAYER_NAME[own]}' imports the higher layer '{LAYER_NAME[theirs]}'"
                )
    return problems


def package_modules() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path): (path.read_text(), path.name == "__init__.py") for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


def test_no_module_imports_a_higher_layer_and_every_module_has_one() -> None:
    modules = package_modules()
    assert len(modules) > 10, f"found only {sorted(modules)} under {PACKAGE_DIR}"
    problems = layering_problems(modules)
    assert not problems, "imports that break the layering (see CONTRIBUTING.md):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("graphsync.storage", "from graphsync.jobs import JobRunner", "graphsync.storage → graphsync.jobs: layer"),
        ("graphsync.config.loader", "from ..scheduler import Daemon", "graphsync.config.loader → graphsync.scheduler"),
        ("graphsync.jobs", "if TYPE_CHECKING:\n    import graphsync.cli", "graphsync.jobs → graphsync.cli"),
        ("graphsync.storage", "def f():\n    from graphsync import sinks", "graphsync.storage → graphsync.sinks"),
        ("graphsync.newthing", "", "graphsync.newthing: not in the layer map: add it to the layer map"),
    ],
)
def test_the_check_names_upward_and_unmapped_imports(module: str, source: str, expected: str) -> None:
    [problem] = layering_problems({module: (source, False)})
    assert problem.startswith(expected), problem


def test_the_check_allows_imports_of_the_same_layer_and_below() -> None:
    source = (
        "from graphsync import __version__, redaction\nfrom . import identity\nfrom graphsync.config.models import X"
    )
    assert layering_problems({"graphsync.tokencache.cache": (source, False)}) == []
