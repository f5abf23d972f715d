"""The code's structure, measured by scripts/import_graph.py (the same command the README points
to): no import cycles, nothing private used across modules in the toolkit, the runtime never
importing the toolkit, and no LAYERPACK_* variable read by the toolkit outside environment.py."""
from __future__ import annotations

import ast
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("import_graph", os.path.join(REPO, "scripts", "import_graph.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    r = mod.analyze(REPO)
    assert "layerpack.convert" in r.modules and "layerpack_runtime.quant" in r.modules  # it found the project
    return r


def test_no_import_cycles(report):
    assert report.cycles(lazy=False) == []
    assert report.cycles(lazy=True) == []  # not even through function-level imports


def test_no_module_uses_private_names_of_another(report):
    assert report.private == []


# Modules that drive a model, and the names they call it by.
_DRIVERS = {"engine.py": ("self.model", "model", "m"), "request_sampling.py": ("model",), "generate.py": ("model",),
            "speculative.py": ("model", "target", "draft")}


def test_model_drivers_use_only_the_runner_interface():
    """Engine, sampling, the generation loop and speculation reach a model only through
    runner.RUNNER_NAMES: no private calls across modules (the contract that stages.Pipeline and
    loader.LayeredModel both keep)."""
    from layerpack_runtime.runner import RUNNER_NAMES

    used = {}
    for name, handles in _DRIVERS.items():
        path = os.path.join(REPO, "runtime", "layerpack_runtime", name)
        if not os.path.exists(path):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in handles:
                used.setdefault(node.attr, set()).add(name)
            elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr") and len(node.args) >= 2
                  and ast.unparse(node.args[0]) in handles and isinstance(node.args[1], ast.Constant)):
                used.setdefault(node.args[1].value, set()).add(name)
    assert "forward" in used and "new_cache" in used  # the check sees the drivers
    assert {a: sorted(f) for a, f in used.items() if a not in RUNNER_NAMES} == {}


def test_layered_model_and_pipeline_are_runners():
    from layerpack_runtime.loader import LayeredModel
    from layerpack_runtime.runner import RUNNER_NAMES
    from layerpack_runtime.stages import Pipeline

    for cls in (LayeredModel, Pipeline):
        missing = [n for n in RUNNER_NAMES if not hasattr(cls, n) and n not in ("args", "device", "dtype", "plan", "workload", "max_memory")]  # instance attributes
        assert missing == [], (cls.__name__, missing)


def test_runtime_never_imports_the_toolkit(report):
    assert report.upward() == []


def test_toolkit_modules_are_small(report):
    # no exception left: families.py shrank when each family's contract moved into the runtime (issue 20)
    big = {n: report.lines[n] for n in report.modules if n.startswith("layerpack.") and report.lines[n] > 400}
    assert not big, big


def test_layerpack_environment_is_read_in_one_module():
    """A LAYERPACK_* name passed to a call (os.environ.get, os.getenv, click's envvar=) or used as a
    subscript (os.environ[...]) only in layerpack/environment.py."""
    found = []
    for dirpath, _, files in os.walk(os.path.join(REPO, "layerpack")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Call):
                    args = node.args[:1] + [k.value for k in node.keywords]
                else:
                    args = [node.slice] if isinstance(node, ast.Subscript) else []
                if any(isinstance(a, ast.Constant) and str(a.value).startswith("LAYERPACK_") for a in args):
                    found.append(os.path.relpath(path, REPO))
    assert set(found) <= {os.path.join("layerpack", "environment.py")}, found
