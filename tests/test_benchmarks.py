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


def test_the_counters_sum_each_executed_node_into_its_kind(monkeypatch):
    ov = pytest.importorskip("openvino")
    import numpy as np
    from openvino import opset13 as ops

    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    from machine import COUNTER_KINDS, openvino_counters

    x = ops.parameter([1, 8, 16, 16, 16], np.float32)

    def int8(node, levels=256):  # the FakeQuantize pairs OpenVINO turns into int8 kernels
        low, high = ops.constant(np.float32(-1)), ops.constant(np.float32(1))
        return ops.fake_quantize(node, low, high, low, high, levels)

    weight = int8(ops.constant(np.random.default_rng(0).uniform(-1, 1, (8, 8, 3, 3, 3)).astype(np.float32)), 255)
    int8_conv = ops.convolution(int8(x), weight, [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    float_conv = ops.convolution(int8_conv, ops.constant(np.ones((8, 8, 1, 1, 1), np.float32)), [1] * 3, [0] * 3, [0] * 3, [1] * 3)
    mean = ops.reduce_mean(float_conv, ops.constant(np.array([2, 3, 4])), True)
    model = ov.Model([ops.subtract(float_conv, mean)], [x])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    kinds, wall = openvino_counters(compiled, {0: np.random.default_rng(1).uniform(-1, 1, (1, 8, 16, 16, 16)).astype(np.float32)})
    assert tuple(kinds) == COUNTER_KINDS and wall > 0
    assert kinds["int8 conv"] > 0 and kinds["float conv"] > 0 and kinds["norm statistics"] > 0
    assert sum(kinds.values()) > kinds["int8 conv"] + kinds["float conv"]


def test_convolution_macs_count_each_output_of_a_convolution_and_each_input_of_a_transposed_one(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    from deploy import convolution_macs

    net = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1),  # 8^3 outputs x 4 channels x (2 x 27) MACs
        torch.nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=2),  # 4^3 x 4 x (2 x 27)
        torch.nn.ConvTranspose3d(4, 2, 2, stride=2),  # 4^3 inputs x 4 channels x (2 x 8)
    )
    assert convolution_macs(net, torch.zeros(1, 2, 8, 8, 8)) == 512 * 4 * 54 + 64 * 4 * 54 + 64 * 4 * 16
