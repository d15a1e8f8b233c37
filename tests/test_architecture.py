"""The import rules of docs/architecture.md, checked on the source with ``ast`` (nothing is
imported): data flows one way, ops -> functional -> nn -> models/patch -> tools, and the oracle
(reference.py) stands apart. The checker is also run on fabricated bad graphs, so it can fail."""
import ast
import os
import sys
from typing import Dict, List, Optional, Set

import pytest

import tokred_ext

PACKAGE = "tokred_ext"
ROOT = os.path.dirname(os.path.abspath(tokred_ext.__file__))

# Each module's layer, by its dotted name (the longest matching prefix wins).
LAYERS = {
    "tokred_ext": "package", "tokred_ext.__main__": "cli", "tokred_ext._C": "kernels",
    "tokred_ext._build_info": "build", "tokred_ext._build_config": "build",
    "tokred_ext.ops": "ops", "tokred_ext.flop_formulas": "ops", "tokred_ext.onnx_legacy": "ops",
    "tokred_ext.rules": "rules",
    "tokred_ext.functional": "functional",
    "tokred_ext.reference": "reference", "tokred_ext.nn": "nn", "tokred_ext.models": "models",
    "tokred_ext.patch": "patch", "tokred_ext.bench": "bench", "tokred_ext.visualize": "visualize",
    "tokred_ext.flops": "flops", "tokred_ext.onnx": "export", "tokred_ext._batch_axis": "export",
    "tokred_ext.aoti": "aoti", "tokred_ext.cli": "cli",
}

_BELOW_NN = {"functional", "rules", "ops", "kernels", "package"}
# What each layer may import from tokred_ext. "package" is tokred_ext/__init__.py, which every
# submodule import runs anyway (it loads the kernels and registers autograd and FLOP formulas).
# The package re-exports flops(), so the flops tool may import only what lies below the package.
ALLOWED: Dict[str, Set[str]] = {
    "kernels": set(),
    "build": {"build", "kernels"},
    "package": {"kernels", "ops", "build", "flops", "aoti"},
    "flops": {"ops"},
    "export": {"rules", "export"},  # onnx names the ops through torch.ops.tokred
    # The AOTInductor loader: the package re-exports it, so it imports only the kernels (which
    # the packages call by name), the build info and the batch axis.
    "aoti": {"build", "export"},  # the package (imported first) loads the kernels
    "reference": set(),
    "rules": set(),
    "ops": {"kernels"},
    "functional": {"ops", "rules"},
    "nn": {"nn"} | _BELOW_NN,
    "models": {"models", "nn"} | _BELOW_NN,
    "patch": {"patch", "nn"} | _BELOW_NN,
    "visualize": {"models", "nn"} | _BELOW_NN,
    "bench": {"reference", "models", "nn"} | _BELOW_NN,  # it times tokred against the oracle
    "cli": {"cli", "bench", "visualize", "flops", "export", "aoti", "models", "nn",
            "build"} | _BELOW_NN,
}
# Third-party packages a layer may import besides the standard library (None: any).
THIRD_PARTY: Dict[str, Optional[Set[str]]] = {"reference": {"torch"}, "rules": set()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _modules(root: str) -> Dict[str, str]:
    """Dotted name -> path of every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([PACKAGE] + rel)] = os.path.join(folder, f)
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom, names: Set[str]) -> List[str]:
    """The modules a ``from`` statement in ``module`` names (relative ones resolved):
    ``from pkg import sub`` names ``pkg.sub`` where that is a module, else ``pkg``."""
    if node.level:
        base = module.split(".")
        if not is_pkg:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in names]
    return subs if len(subs) == len(node.names) else subs + [target]


def import_graph(root: str = ROOT) -> Dict[str, Dict[str, Set[str]]]:
    """For each module: ``{"internal": tokred_ext modules it imports, "external": top-level
    names of the other packages it imports}``, from every import statement in the file
    (function-level imports included)."""
    mods = _modules(root)
    names = set(mods) | {f"{PACKAGE}._C"}
    graph = {}
    for module, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        internal, external = set(), set()
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(module, is_pkg, node, names)
            else:
                continue
            for t in targets:
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    internal.add(t)
                else:
                    external.add(t.split(".")[0])
        internal.discard(module)
        graph[module] = {"internal": internal, "external": external}
    return graph


def violations(graph: Dict[str, Dict[str, Set[str]]]) -> List[str]:
    """Every import that breaks the layer rules, as 'a imports b (layer x -> y)'."""
    bad = []
    stdlib = set(sys.stdlib_module_names)
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        for dep in sorted(deps["internal"]):
            if layer_of(dep) not in ALLOWED[layer]:
                bad.append(f"{module} imports {dep} (layer {layer} -> {layer_of(dep)})")
        allowed_ext = THIRD_PARTY.get(layer)
        if allowed_ext is not None:
            for dep in sorted(deps["external"] - stdlib - allowed_ext):
                bad.append(f"{module} imports {dep} (layer {layer} takes only the standard library"
                           f"{' and ' + ', '.join(sorted(allowed_ext)) if allowed_ext else ''})")
    return bad


def find_cycle(graph: Dict[str, Dict[str, Set[str]]]) -> Optional[List[str]]:
    """One import cycle among the modules (a package's edge to its own submodules, which
    ``__init__`` re-exports, does not count), or None."""
    def edges(m):
        return [d for d in graph[m]["internal"] if d in graph and not d.startswith(m + ".")]

    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in edges(m):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


# --------------------------------------------------------------------------- the real package

GRAPH = import_graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_import_rules_hold():
    assert violations(GRAPH) == []


def test_no_import_cycles():
    assert find_cycle(GRAPH) is None


def test_the_oracle_stands_apart():
    assert GRAPH["tokred_ext.reference"]["internal"] == set()
    users = sorted(m for m, d in GRAPH.items() if "tokred_ext.reference" in d["internal"])
    assert users == ["tokred_ext.bench"]


def test_only_the_cli_imports_the_tools():
    for tool in ("tokred_ext.bench", "tokred_ext.visualize"):
        users = {m for m, d in GRAPH.items() if tool in d["internal"]}
        assert users <= {"tokred_ext.cli"}, (tool, users)


def test_functional_imports_only_ops_and_rules():
    assert GRAPH["tokred_ext.functional"]["internal"] == {"tokred_ext.ops", "tokred_ext.rules"}


# --------------------------------------------------------------------------- the checker can fail

def _fake():
    return {m: {"internal": set(), "external": set()} for m in LAYERS}


@pytest.mark.parametrize("module,dep", [
    ("tokred_ext.functional", "tokred_ext.reference"),   # production using the oracle
    ("tokred_ext.reference", "tokred_ext.rules"),        # the oracle using production
    ("tokred_ext.ops", "tokred_ext.functional"),         # a lower layer reaching up
    ("tokred_ext.nn.policies", "tokred_ext.models.vit"),
    ("tokred_ext.patch.timm", "tokred_ext.cli"),
    ("tokred_ext.visualize", "tokred_ext.bench"),
    ("tokred_ext.flops", "tokred_ext.models.vit"),      # the package's import would cycle
])
def test_a_bad_import_is_reported(module, dep):
    graph = _fake()
    graph[module] = {"internal": {dep}, "external": set()}
    assert violations(graph) == [f"{module} imports {dep} (layer {layer_of(module)} -> {layer_of(dep)})"]


def test_a_third_party_import_in_the_oracle_is_reported():
    graph = _fake()
    graph["tokred_ext.reference"]["external"] = {"torch", "math", "numpy"}
    assert violations(graph) == ["tokred_ext.reference imports numpy (layer reference takes only the "
                                 "standard library and torch)"]


def test_a_cycle_is_found():
    graph = _fake()
    graph["tokred_ext.nn.a"] = {"internal": {"tokred_ext.nn.b"}, "external": set()}
    graph["tokred_ext.nn.b"] = {"internal": {"tokred_ext.nn.c"}, "external": set()}
    graph["tokred_ext.nn.c"] = {"internal": {"tokred_ext.nn.a"}, "external": set()}
    assert violations(graph) == []
    assert find_cycle(graph) == ["tokred_ext.nn.a", "tokred_ext.nn.b", "tokred_ext.nn.c",
                                 "tokred_ext.nn.a"]


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import ops\n")
    (pkg / "ops.py").write_text("import torch\n")
    (pkg / "nn" / "__init__.py").write_text("from .x import f\n")
    (pkg / "nn" / "x.py").write_text("from .. import functional, ops\nfrom ..models import vit\n"
                                     "def g():\n    from ..reference import topk\n")
    graph = import_graph(str(pkg))
    assert graph["tokred_ext.nn.x"]["internal"] == {"tokred_ext", "tokred_ext.ops",
                                                    "tokred_ext.models", "tokred_ext.reference"}
    assert graph["tokred_ext.nn"]["internal"] == {"tokred_ext.nn.x"}
    assert graph["tokred_ext"]["internal"] == {"tokred_ext.ops"}
    assert graph["tokred_ext.ops"]["external"] == {"torch"}
