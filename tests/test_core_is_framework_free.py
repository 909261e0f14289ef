"""The core imports without TVM, its FFI, ONNX or onnxruntime (DESIGN.md: the core is
numpy/scipy only), and no module of the project imports itself back through a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = [
    "analysis",
    "calibration_data",
    "compare",
    "compensation",
    "criteria",
    "errors",
    "graph",
    "metrics",
    "operators",
    "options",
    "plan",
    "reconstruction",
    "report",
    "selection",
    "spectral",
]
PACKAGES = {
    "tvm_qmfrg": ROOT / "tvm_qmfrg",
    "tvm_qmfrg.passes": ROOT / "passes",
    "tvm_qmfrg.targets": ROOT / "targets",
}


def test_the_core_modules_import_with_tvm_and_onnx_blocked():
    code = (
        "import sys\n"
        "for m in ('tvm', 'tvm_ffi', 'onnx', 'onnxruntime'):\n"
        "    sys.modules[m] = None\n"
        "import importlib\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('tvm_qmfrg.' + name)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]
    assert proc.stdout.strip() == "ok"


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (function-level included)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & set(mods)
            out |= subs if len(subs) == len(node.names) else ({target} & set(mods)) | subs
    return out - {name}


def test_no_module_imports_itself_back_through_a_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles[0]
