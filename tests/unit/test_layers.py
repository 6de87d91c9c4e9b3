"""Layers import only downward: config schema · models, losses, data, datasets, distributed · components ·
checkpoint · eval · train, report (after-the-run tools) · cluster (SLURM jobs) · cli and commands (and the config registry). Function-level imports count too."""

import ast
from pathlib import Path

import pytest
import vlmtrain.configs

import vlmtrain

LAYERS = [
    (
        "vlmtrain.schema",
        "vlmtrain.extras",
        "vlmtrain.build",
        "vlmtrain.atomic",
        "vlmtrain.config_tree",
        "vlmtrain.dotted",
    ),
    ("vlmtrain.models", "vlmtrain.losses", "vlmtrain.data", "vlmtrain.datasets", "vlmtrain.distributed"),
    ("vlmtrain.components",),  # the classes a config may build, from the layer above
    ("vlmtrain.checkpoint",),
    ("vlmtrain.eval",),
    ("vlmtrain.train", "vlmtrain.report"),
    ("vlmtrain.cluster",),
    ("vlmtrain.cli", "vlmtrain.commands", "vlmtrain.configs"),
]


def layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer")


def modules() -> dict[str, Path]:
    found = {}
    for root, package in (
        (Path(vlmtrain.__file__).parent, "vlmtrain"),
        (Path(vlmtrain.configs.__file__).parent, "vlmtrain.configs"),
    ):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if name != "vlmtrain":  # the package's lazy public facade (load_pretrained)
                found[name] = path
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("vlmtrain.")}


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_only_go_downward(module):
    path = modules()[module]
    upward = sorted(name for name in imported(path) if layer(name) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports {upward}"
