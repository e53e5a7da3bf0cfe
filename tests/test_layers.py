"""The layers import one way (docs/architecture.md §1): apps -> ports -> models -> core -> pallas_kernels,
with ``chipmunk_jax.validation`` a leaf every layer may use. ``chipmunk_jax.pipelines`` (the diffusers-style
pipelines) and ``chipmunk_jax.nnx`` (the Flax NNX modules, whose ``from_pretrained`` loads through the ports) belong
to the apps layer: on top of models, ports and the core, imported by nothing below. Reads every
module's imports (function-local ones included) from the source, so a back-edge fails CI before anything runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> package it installs as (pyproject.toml's package-dir)
FOLDERS = {"chipmunk_jax": "chipmunk_jax", "pallas_kernels": "chipmunk_jax.pallas_kernels",
           "models": "chipmunk_jax.models", "ports": "chipmunk_jax.ports"}
# what each layer may import from the package, besides itself
ALLOWED = {
    "validation": set(),
    "pallas_kernels": {"validation"},
    "core": {"validation", "pallas_kernels"},
    "models": {"validation", "pallas_kernels", "core"},
    "ports": {"validation", "pallas_kernels", "core", "models"},
    "apps": {"validation", "pallas_kernels", "core", "models", "ports"},
}


def layer_of(module: str) -> str:
    """The layer of a ``chipmunk_jax...`` module name."""
    parts = module.split(".")
    if parts[0] != "chipmunk_jax":
        raise ValueError(f"not a chipmunk_jax module: {module}")
    if len(parts) == 1:
        return "core"  # the package __init__
    if parts[1] in ("pipelines", "nnx"):
        return "apps"
    if parts[1] in ("pallas_kernels", "models", "ports", "apps", "validation"):
        return parts[1]
    return "core"


def package_modules(root: Path = ROOT) -> dict[str, str]:
    """{module name: source} of every module of the package, from the source folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path.read_text()
    return modules


def imported_modules(name: str, source: str) -> set[str]:
    """The chipmunk_jax modules (or packages) ``source`` imports, anywhere in the file."""
    package = name.rsplit(".", 1)[0]  # relative imports resolve against the module's package
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from chipmunk_jax import models`` imports the subpackage chipmunk_jax.models
            found.update(f"{base}.{alias.name}" if base == "chipmunk_jax" else base for alias in node.names)
    return {m for m in found if m == "chipmunk_jax" or m.startswith("chipmunk_jax.")}


def back_edges(modules: dict[str, str]) -> list[str]:
    """Every import that goes against the layers, as 'importer (layer) -> imported (layer)'."""
    problems = []
    for name, source in modules.items():
        layer = layer_of(name)
        for target in sorted(imported_modules(name, source)):
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in ALLOWED[layer]:
                problems.append(f"{name} ({layer}) -> {target} ({target_layer})")
    return problems


def test_the_package_imports_one_way():
    modules = package_modules()
    assert {"chipmunk_jax.sampling", "chipmunk_jax.models.flux", "chipmunk_jax.ports.wan",
            "chipmunk_jax.pallas_kernels.attention", "chipmunk_jax.apps.cli", "chipmunk_jax.pipelines.flux",
            "chipmunk_jax.pipelines.common", "chipmunk_jax.nnx.modules"} <= set(modules)
    assert layer_of("chipmunk_jax.pipelines.wan") == "apps"
    assert layer_of("chipmunk_jax.nnx") == layer_of("chipmunk_jax.nnx.transformer") == "apps"
    assert back_edges(modules) == []


@pytest.mark.parametrize("importer, statement", [
    ("chipmunk_jax.sampling", "from chipmunk_jax.models import flux"),
    ("chipmunk_jax.sampling", "from chipmunk_jax import models"),
    ("chipmunk_jax.attention", "def f():\n    import chipmunk_jax.models.wan\n"),
    ("chipmunk_jax.pallas_kernels.mlp", "from chipmunk_jax import selection"),
    ("chipmunk_jax.pallas_kernels.mlp", "from .. import cache"),
    ("chipmunk_jax.models.flux", "from chipmunk_jax.ports import flux"),
    ("chipmunk_jax.models.flux", "from chipmunk_jax.apps.tiny import tiny_config"),
    ("chipmunk_jax.ports.wan", "from chipmunk_jax.pipelines import WanPipeline"),
    ("chipmunk_jax.sampling", "def f():\n    from chipmunk_jax.pipelines.common import load_transformer\n"),
    ("chipmunk_jax.models.flux", "from chipmunk_jax.nnx import FluxTransformer2DModel"),
    ("chipmunk_jax.ports.wan", "def f():\n    import chipmunk_jax.nnx.modules\n"),
    ("chipmunk_jax.validation", "from chipmunk_jax.config import ChipmunkConfig"),
])
def test_a_back_edge_fails(importer, statement):
    """The check fails when a lower layer imports a higher one (the real tree plus one added import)."""
    modules = package_modules()
    modules[importer] = modules[importer] + "\n" + statement + "\n"
    edges = back_edges(modules)
    assert len(edges) == 1 and edges[0].startswith(importer), edges
