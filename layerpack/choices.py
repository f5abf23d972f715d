"""Option values and defaults that the `layerpack` command shows in --help and checks while parsing,
defined here rather than in the modules that use them (quantize.py, calibrate.py) because those
import torch: this module imports nothing, so --help, --version and argument errors answer in a
fraction of a second. quantize.py and calibrate.py take their names from here (one definition)."""

# Outlier selection rules (which k entries of a weight are kept exactly; see quantize.select_outliers_by):
OUTLIER_MAGNITUDE = "magnitude"    # the k largest |w| of the tensor
OUTLIER_ROW = "row"                # an equal share per output row: rows' largest |w| first, then their second, ...
OUTLIER_BLOCK_GAIN = "block-gain"  # greedy on the estimated error saved: shrinking a block's absmax
OUTLIER_RULES = (OUTLIER_MAGNITUDE, OUTLIER_ROW, OUTLIER_BLOCK_GAIN)

DEFAULT_CALIBRATION_TOKENS = 2048  # calibration tokens (measured in BENCHMARKS.md: calibration section)
