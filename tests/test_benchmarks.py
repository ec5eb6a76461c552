"""The benchmark scripts stay runnable: nothing in CI times them, but every performance claim rests on them."""

import ast
import importlib
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
SCRIPTS = [path for path in BENCHMARKS if path.name != "machine.py"]  # machine.py is their shared helper


def _library_imports(script: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from monai_effq... import name`` in a script, at any depth."""
    found = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "monai_effq":
            found += [(node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_each_benchmark_script_parses_its_options(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_every_library_name_a_benchmark_imports_exists(script):
    # most imports sit inside the functions that run the measurements, where --help never reaches
    missing = []
    for module_name, name in _library_imports(script):
        module = importlib.import_module(module_name)
        submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{module_name}.{name}") is not None
        if not hasattr(module, name) and not submodule:
            missing.append(f"{module_name}.{name}")
    assert not missing, f"{script.name} imports names the library no longer has: {missing}"


def test_the_library_import_check_would_see_a_removed_name(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("def run():\n    from monai_effq.solver import layer_view, no_such_solver\n")
    assert _library_imports(script) == [("monai_effq.solver", "layer_view"), ("monai_effq.solver", "no_such_solver")]
    assert not hasattr(importlib.import_module("monai_effq.solver"), "no_such_solver")


def test_the_kernel_summary_names_each_heavy_layer_type_with_its_compiled_kernel(monkeypatch):
    ov = pytest.importorskip("openvino")
    import numpy as np
    from openvino import opset13 as ops

    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    from machine import openvino_kernels

    x = ops.parameter([1, 16, 8, 8, 8], np.float32)
    conv = ops.convolution(x, ops.constant(np.ones((16, 16, 3, 3, 3), np.float32)), [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    mean = ops.reduce_mean(conv, ops.constant(np.array([2, 3, 4])), True)
    compiled = ov.Core().compile_model(ov.Model([ops.subtract(conv, mean)], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    summary = openvino_kernels(compiled)
    assert summary.startswith("Convolution: ") and "Reduce: " in summary
    assert all(part.rsplit(" x", 1)[1].isdigit() for part in summary.split(", "))
