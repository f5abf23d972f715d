"""Option values and defaults that the `layerpack` command shows in --help and checks while parsing,
defined here rather than in the modules that use them (quantize.py, calibrate.py) because those
import torch: this module imports nothing, so --help, --version and argument errors answer in a
fraction of a second. quantize.py and calibrate.py take their names from here (one definition)."""

# Outlier selection rules (which k entries of a weight are kept exactly; see quantize.select_outliers_by):
OUTLIER_MAGNITUDE = "magnitude"    # the k largest |w| of the tensor
OUTLIER_ROW = "row"                # an equal share per output row: rows' largest |w| first, then their second, ...
OUTLIER_BLOCK_GAIN = "block-gain"  # greedy on the estimated error saved: shrinking a block's absmax
OUTLIER_RULES = (OUTLIER_MAGNITUDE, OUTLIER_ROW, OUTLIER_BLOCK_GAIN)

# calibration tokens: 512 since issue 25 (was 2048): on SmolLM2 nf4 --calibrate --outliers 0.005, KL 0.168 vs
# 0.159 at 2048 (plain nf4: 0.438) for a quarter of the forward (BENCHMARKS.md: calibration cost)
DEFAULT_CALIBRATION_TOKENS = 512
