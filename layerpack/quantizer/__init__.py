"""The converter's quantizer: weights -> int8 / NF4 codes, block scales and exact outlier entries,
the inverse of layerpack_runtime.quant (the format's dequantization, which it builds on).

Modules, lowest first (each imports only those above it):
    nf4.py               the exact NF4 nearest-code search (bitsandbytes' choice, by table lookup)
    parallel.py          chunk size and the thread pools (created on first use)
    windows.py           a tensor read window by window (TensorSource, InMemory)
    ranking.py           the one order outlier candidates are ranked in; row and block-gain candidates
    outliers.py          the outlier rules (OUTLIER_RULES), in memory and window by window
    activation_aware.py  convert --calibrate's uses of activation statistics (Calibrated)
    blocks.py            block quantization of one chunk (codes, scales, error sums)
    stream.py            one tensor into a sink, window by window (quantize_stream, quantize_tensor)
    activation_stats.py  collecting the activation statistics (runs the source model unit by unit)
"""
from .activation_aware import METHODS as CALIBRATE_METHODS, Calibrated, parse_methods
from .outliers import (BLOCK_GAIN_DEPTH, OUTLIER_BLOCK_GAIN, OUTLIER_MAGNITUDE, OUTLIER_ROW, OUTLIER_RULES,
                       select_outliers, select_outliers_by, select_outliers_stream)
from .stream import DictSink, Sink, outlier_count, quantize_stream, quantize_tensor, stored_specs
from .windows import InMemory, TensorSource

__all__ = ["BLOCK_GAIN_DEPTH", "CALIBRATE_METHODS", "Calibrated", "DictSink", "InMemory", "OUTLIER_BLOCK_GAIN",
           "OUTLIER_MAGNITUDE", "OUTLIER_ROW", "OUTLIER_RULES", "Sink", "TensorSource", "outlier_count", "parse_methods",
           "quantize_stream", "quantize_tensor", "select_outliers", "select_outliers_by", "select_outliers_stream",
           "stored_specs"]
