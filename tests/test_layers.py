"""The architecture, enforced by the imports: each module of hf_vram imports only its own layer or the layers below.

Layers, bottom up (README, "Architecture"):

0. foundation: ``config``, ``presets``, ``data``, ``assets``, ``_lazy``
1. ``kernels``
2. techniques: ``quant``, ``fusion``, ``pruning``, ``kvcache``; a technique imports no other technique
3. ``memory``
4. ``planner``, ``recovery``
5. ``pipeline``
6. ``hf`` (the Transformers door)
7. ``interop`` (formats other tools read)
8. ``api``, ``evaluation``, ``serving``, ``cli``, and the package root

Imports of hf_vram's own modules sit at the top of each module: none inside a function, except where the imported
module itself imports an optional third-party package (the Triton kernels) and where Transformers' registry must
not import hf_vram's model stack before Transformers has loaded it (``hf.registration.build_quantizer``, which goes
through ``importlib`` on purpose).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_vram"

LAYERS = {
    "config": 0,
    "presets": 0,
    "data": 0,
    "assets": 0,
    "_lazy": 0,
    "kernels": 1,
    "quant": 2,
    "fusion": 2,
    "pruning": 2,
    "kvcache": 2,
    "memory": 3,
    "planner": 4,
    "recovery": 4,
    "pipeline": 5,
    "hf": 6,
    "interop": 7,
    "api": 8,
    "evaluation": 8,
    "serving": 8,
    "cli": 8,
    "__init__": 8,
}
TECHNIQUES = {"quant", "fusion", "pruning", "kvcache"}
# in-function imports allowed: modules whose import pulls in an optional third-party package
OPTIONAL = {"hf_vram.kernels.triton_matmul"}


def _room(module: str) -> str:
    """``hf_vram.quant.linear`` -> ``quant``; ``hf_vram`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported hf_vram module, line, inside a function)`` for every import of hf_vram in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "hf_vram" or child.module.startswith("hf_vram."):
                    for alias in child.names:
                        # `from hf_vram import pipeline` names a module; `from hf_vram.x import y` a name in x
                        target = f"{child.module}.{alias.name}" if child.module == "hf_vram" else child.module
                        found.append((target, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "hf_vram" or alias.name.startswith("hf_vram."):
                        found.append((alias.name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _violations(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        source = _module_name(path, package)
        room = _room(source)
        assert room in LAYERS, f"{path}: room {room!r} has no layer in tests/test_layers.py; add it (and to the README)"
        for target, line, in_function in _imports(path):
            where = f"{path.relative_to(package.parent)}:{line} imports {target}"
            target_room = _room(target)
            if in_function and target not in OPTIONAL:
                problems.append(f"{where} inside a function")
            if LAYERS[target_room] > LAYERS[room]:
                problems.append(f"{where}: layer {LAYERS[room]} ({room}) imports upward (layer {LAYERS[target_room]})")
            if room in TECHNIQUES and target_room in TECHNIQUES and target_room != room:
                problems.append(f"{where}: technique {room} imports another technique ({target_room})")
    return problems


def test_imports_follow_the_layers():
    assert _violations() == []


def test_the_checker_catches_a_violation(tmp_path):
    """The checker itself: an upward import, an in-function import and a cross-technique import are reported."""
    fake = tmp_path / "hf_vram"
    (fake / "quant").mkdir(parents=True)
    (fake / "quant" / "bad.py").write_text(
        "from hf_vram.pipeline import apply\nfrom hf_vram.fusion import fuse_model\n\n"
        "def f():\n    from hf_vram.kernels import ops\n"
    )
    problems = _violations(fake)
    assert any("technique quant imports another technique (fusion)" in p for p in problems)
    assert any("imports upward" in p and "hf_vram.pipeline" in p for p in problems)
    assert any("inside a function" in p and "hf_vram.kernels" in p for p in problems)


def test_no_import_cycle_between_rooms():
    """Rooms form a directed acyclic graph (a cycle would make the layer order meaningless)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        room = _room(_module_name(path))
        for target, _, _ in _imports(path):
            if _room(target) != room:
                edges.setdefault(room, set()).add(_room(target))
    state: dict[str, int] = {}

    def visit(room: str, trail: list[str]) -> None:
        if state.get(room) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, room]))
        if state.get(room) == 2:
            return
        state[room] = 1
        for nxt in sorted(edges.get(room, ())):
            visit(nxt, [*trail, room])
        state[room] = 2

    for room in sorted(edges):
        visit(room, [])
