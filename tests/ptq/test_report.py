import math

import pytest
import torch
import torch.nn as nn

from monai_effq.ptq.modules import QuantizedConv
from monai_effq.ptq.report import LayerReport, QuantizationReport
from monai_effq.ptq.result import finish_report
from monai_effq.quant import UniformGrid


def _layer(name: str, mse: float, mse_rtn: float) -> LayerReport:
    return LayerReport(name=name, kind="QuantizedConv", weight_bits=4, act_bits=8, act_grid="unsigned", params=8, mse_fp=0.0, mse_rtn=mse_rtn, mse=mse)


def test_the_summary_averages_the_error_ratio_over_the_layers_that_have_one():
    # a layer with no round-to-nearest error (or one restored without figures) has no ratio to average
    layers = [_layer("a", 0.5, 1.0), _layer("b", 2.0, 2.0), _layer("c", 0.0, 0.0), _layer("d", math.nan, math.nan)]
    assert "mean layer error vs RTN 0.750" in QuantizationReport(layers=layers).summary()
    assert "mean layer error vs RTN n/a" in QuantizationReport(layers=layers[2:]).summary()


def test_a_finished_report_holds_the_packed_sizes_time_and_memory_of_the_network():
    conv = nn.Conv3d(2, 4, 3)
    codes = torch.randint(0, 16, conv.weight.shape, generator=torch.Generator().manual_seed(0))
    layer = QuantizedConv(conv, codes, torch.tensor(0.1), torch.tensor(8.0), UniformGrid(4, "signed"), conv.bias)
    network = nn.Sequential(layer, nn.GroupNorm(2, 4))
    report = finish_report(QuantizationReport(layers=[_layer("0", 1.0, 2.0)]), network, fp_bytes=1234, wall_seconds=2.5)
    weights = 4 * 2 * 27
    # codes at 4 bits, then scale and zero point, bias and the norm's weight and bias at 32 bits
    assert report.quantized_bytes == weights // 2 + 4 + 4 + 4 * 4 + 2 * 4 * 4
    assert (report.weight_fp_bytes, report.weight_packed_bytes) == (weights * 4, weights // 2)
    assert (report.fp_bytes, report.wall_seconds) == (1234, 2.5)
    assert report.peak_memory_mib > 0 or math.isnan(report.peak_memory_mib)
    assert math.isnan(report.peak_gpu_memory_mib) == (not torch.cuda.is_initialized())
    assert report.compression == pytest.approx(1234 / report.quantized_bytes)


def test_the_summary_names_gpu_memory_only_for_a_run_that_used_a_gpu():
    report = QuantizationReport(layers=[_layer("0", 1.0, 2.0)], wall_seconds=3.0, peak_memory_mib=900.0)
    assert "peak memory 900 MiB;" in report.summary()
    report.peak_gpu_memory_mib = 2048.0
    assert "peak memory 900 MiB (GPU 2048 MiB);" in report.summary()
    assert "peak_gpu_memory_mib" not in report.to_dict(measurements=False)
    assert QuantizationReport.from_dict(report.to_dict()).peak_gpu_memory_mib == 2048.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_quantization_on_the_gpu_reports_the_gpu_memory_it_took():
    from monai_effq import EfficientQConfig, quantize

    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).cuda()
    result = quantize(network, torch.rand(1, 1, 16, 16, 16, device="cuda"), EfficientQConfig(device="cuda"), progress=False)
    assert result.report.peak_gpu_memory_mib > 0
