"""The package's layers: imports run one way, down (read from the source with ``ast``, nothing imported).

The library core (the package root, layout, validation, ops, backends, nn,
dst, flops, ensemble, models, distributed, _version) never imports the
application, ``freetickets_kernels.app``; within the core, ``nn`` never
imports ``dst`` (DST sits above the layers it edits).
"""

import ast
import os

import pytest

PACKAGE = "freetickets_kernels"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules():
    """``{dotted module name: path}`` of every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


def _imports(module: str, path: str):
    """Every module the file of ``module`` imports."""
    with open(path, encoding="utf-8") as f:
        return _imports_in(f.read(), module, os.path.basename(path) == "__init__.py")


def _imports_in(source: str, module: str, is_package: bool):
    """Every module ``source`` (the text of ``module``) imports, as absolute dotted names (relative
    imports resolved), anywhere in it: top level, inside functions, under ``if TYPE_CHECKING``."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            # ``from . import app`` / ``from freetickets_kernels import app`` name a module too
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = _modules()
APP = f"{PACKAGE}.app"
CORE = sorted(m for m in MODULES if not _within(m, APP))


def test_the_walk_sees_both_layers():
    # a walk that finds nothing would pass everything below
    for name in ("freetickets_kernels", "freetickets_kernels.ops", "freetickets_kernels.nn.sparsify",
                 "freetickets_kernels.dst.engine", "freetickets_kernels.ensemble.metrics"):
        assert name in CORE
    for name in ("freetickets_kernels.app.cli", "freetickets_kernels.app.training",
                 "freetickets_kernels.app.checkpoint", "freetickets_kernels.app.bench.kernels"):
        assert name in MODULES and name not in CORE


@pytest.mark.parametrize("source, module, is_package", [
    ("from ..app import checkpoint\n", "freetickets_kernels.nn.base", False),
    ("from ..app.checkpoint import save\n", "freetickets_kernels.ensemble.training", False),
    ("from . import app\n", "freetickets_kernels", True),
    ("from .. import app\n", "freetickets_kernels.dst", True),
    ("def f():\n    from freetickets_kernels.app import cli\n", "freetickets_kernels.ops", False),
    ("import freetickets_kernels.app.progress\n", "freetickets_kernels.flops", False),
    ("importlib.import_module('freetickets_kernels.app.cli')\n", "freetickets_kernels.ops", False),
])
def test_the_walk_sees_an_import_of_the_application(source, module, is_package):
    # the resolver itself, on imports written the ways the core could write them
    assert any(_within(name, APP) for name in _imports_in(source, module, is_package))


def test_the_walk_does_not_see_what_is_not_there():
    assert not any(_within(name, APP) for name in _imports_in(
        "from . import application_notes\nfrom .dst import app_state\n", "freetickets_kernels", True))
    assert _imports_in("from ..dst.engine import X\n", "freetickets_kernels.nn.sparsify", False) >= {
        "freetickets_kernels.dst.engine"}


@pytest.mark.parametrize("module", CORE)
def test_the_library_core_never_imports_the_application(module):
    bad = sorted(name for name in _imports(module, MODULES[module]) if _within(name, APP))
    assert not bad, f"{module} imports the application: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, f"{PACKAGE}.nn")))
def test_nn_never_imports_dst(module):
    bad = sorted(name for name in _imports(module, MODULES[module]) if _within(name, f"{PACKAGE}.dst"))
    assert not bad, f"{module} imports dst, which sits above nn: {bad}"


def test_machine_info_does_not_import_the_package_root():
    names = _imports(f"{APP}.machine", MODULES[f"{APP}.machine"])
    assert f"{PACKAGE}._version" in names
    assert PACKAGE not in names and f"{PACKAGE}.__version__" not in names


def test_importing_the_library_loads_no_application_module():
    # the same rule, at run time: what `import freetickets_kernels` (and the core's subpackages) pulls in
    import subprocess
    import sys

    script = ("import sys, freetickets_kernels, freetickets_kernels.ensemble, freetickets_kernels.models, "
              "freetickets_kernels.dst, freetickets_kernels.distributed; "
              "print(sorted(m for m in sys.modules if m == 'freetickets_kernels.app' "
              "or m.startswith('freetickets_kernels.app.')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
