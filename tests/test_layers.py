"""The packages import in one direction: protocol -> service, worker -> training -> dgserve (the entry layer).
The gateway tokenizes (transformers' tokenizers) but never loads torch or the engine.

Checked on the source (every import statement, module level or inside a function) and, for the gateway's promise
never to load torch, on a real import in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "service", "worker", "training", "dgserve")
# what each package may import of the others (anything else of ours is a layering error)
ALLOWED = {
    "protocol": set(),
    "service": {"protocol"},
    "worker": {"protocol"},
    "training": {"protocol", "worker"},
    "dgserve": {"protocol", "service", "worker", "training"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level modules each file of `package` imports: {file: {module, ...}}."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for package in PACKAGES:
        for path, names in imports_of(package).items():
            for name in (names & set(PACKAGES)) - {package} - ALLOWED[package]:
                wrong.append(f"{path} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_top_level_packages():
    graph = {p: set().union(*imports_of(p).values()) & set(PACKAGES) - {p} for p in PACKAGES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for p in PACKAGES:
        if p not in state:
            visit(p, [])


def test_the_gateway_never_loads_torch_or_the_worker():
    code = ("import sys, service.app, service.server, service.routes.ws, service.routes.openai; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'training')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_protocol_loads_nothing_of_ours():
    code = ("import sys, protocol.contract, protocol.sudoku, protocol.logs; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{tuple(p for p in PACKAGES if p != 'protocol')!r} + ('torch',)); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
