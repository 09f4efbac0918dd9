"""The layers the folders name are the layers the imports follow.

Every import in the pack's source (module level and inside functions) is read with ``ast`` and resolved to a module
of the pack. Arrows point down: core < weights < distributed < families < pipeline < nodes; no layer below the
families imports a family, and only ``nodes/`` talks to ComfyUI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from comfy_executor import REPO_ROOT

LAYERS = ("offload.core", "offload.weights", "offload.distributed", "offload.families", "offload.pipeline", "nodes")
"""Bottom to top. ``offload.config``, ``offload.errors`` and ``offload.dtypes`` are leaves every layer may use."""
LEAVES = ("offload.config", "offload.errors", "offload.dtypes")
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "execution",
                   "nodes", "node_helpers", "latent_preview")


def pack_modules() -> dict[str, Path]:
    modules = {}
    for path in REPO_ROOT.rglob("*.py"):
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0] not in ("offload", "nodes"):
            continue
        name = ".".join(relative.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, relative) for every import in the file; relative imports resolved inside the pack."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
                found += [(f"{target}.{alias.name}", True) for alias in node.names] if not node.module else [(target, True)]
            else:
                found.append((node.module or "", False))
    return found


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return index
    return None


MODULES = pack_modules()


def test_the_layout_is_the_one_described():
    assert {m.split(".")[1] for m in MODULES if m.startswith("offload.") and m.count(".") >= 1} >= {
        "core", "weights", "distributed", "families", "pipeline", "config", "errors", "dtypes"}
    assert "offload.families.wan" in MODULES and "offload.families.wan.spec" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_and_only_nodes_talk_to_comfyui(name):
    path = MODULES[name]
    own = layer_of(name)
    for target, relative in imports_of(name, path):
        top = target.split(".")[0]
        if not relative:
            assert top not in COMFYUI_MODULES or name.startswith("nodes"), f"{name} imports ComfyUI's {target}"
            continue
        if target.startswith(LEAVES) or own is None:
            continue
        other = layer_of(target)
        assert other is not None and other <= own, f"{name} (layer {LAYERS[own]}) imports {target} from above it"
        if own < LAYERS.index("offload.families"):
            assert not target.startswith("offload.families"), f"{name} imports the model family module {target}"


def test_the_leaves_import_no_layer():
    for name in LEAVES:
        for target, relative in imports_of(name, MODULES[name]):
            assert not relative or target.startswith(LEAVES), f"{name} imports {target}"
