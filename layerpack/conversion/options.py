"""The options of one conversion (`layerpack convert`), built by keyword and checked before any work."""
from __future__ import annotations

from dataclasses import dataclass

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import DTYPE_NAMES, SCHEME_NONE, SCHEMES

from ..quantizer import OUTLIER_ROW, OUTLIER_RULES, parse_methods
from ..quantizer.activation_stats import DEFAULT_TOKENS as DEFAULT_CALIBRATION_TOKENS, MAX_TOKENS as MAX_CALIBRATION_TOKENS

DEFAULT_ZSTD_LEVEL = 3


@dataclass(kw_only=True)
class ConvertOptions:
    quant: str = SCHEME_NONE
    dtype: str | None = None           # None: the source's dtype
    outliers: float = 0.0
    block_size: int | None = None      # None: the scheme's default
    compress: str = "none"
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    revision: str | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    quiet: bool = False
    evaluate: bool = False             # --eval: measure quality and store it in the manifest
    eval_text: str | None = None       # None: the default text (layerpack_runtime.evaluate.default_text)
    outlier_rule: str = OUTLIER_ROW    # which entries --outliers keeps (quantizer.OUTLIER_RULES; chosen by scripts/sweep_outliers.py)
    head_outliers: float | None = None  # the output head's fraction (a tied embedding is the head); None: `outliers`
    calibrate: bool = False            # --calibrate: activation-aware outliers and scales (quantizer/activation_stats.py, activation_aware.py)
    calibration_text: str | None = None  # None: the text that ships with layerpack (activation_stats.default_text)
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    calibrate_methods: str | None = None  # comma-separated subset of quantizer.CALIBRATE_METHODS; None: all

    def check(self) -> None:
        if self.quant not in SCHEMES:
            raise LayerpackError(f"--quant must be one of {', '.join(SCHEMES)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise LayerpackError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
        if not 0.0 <= self.outliers < 0.5:
            raise LayerpackError("--outliers is a fraction of each weight's entries, in [0, 0.5)")
        if self.outliers and self.quant == SCHEME_NONE:
            raise LayerpackError("--outliers needs a quantized scheme (--quant int8 or nf4)")
        if self.head_outliers is not None and not 0.0 <= self.head_outliers < 0.5:
            raise LayerpackError("--head-outliers is a fraction of the head's entries, in [0, 0.5)")
        if self.head_outliers and self.quant == SCHEME_NONE:
            raise LayerpackError("--head-outliers needs a quantized scheme (--quant int8 or nf4)")
        if self.block_size is not None and self.quant == SCHEME_NONE:
            raise LayerpackError("--block-size needs a quantized scheme (--quant int8 or nf4)")
        if self.outlier_rule not in OUTLIER_RULES:
            raise LayerpackError(f"outlier rule must be one of {', '.join(OUTLIER_RULES)}")
        if self.block_size is not None and (self.block_size < 16 or self.block_size % 2):
            raise LayerpackError(f"--block-size must be an even number >= 16, not {self.block_size}")
        if self.calibrate and self.quant == SCHEME_NONE:
            raise LayerpackError("--calibrate needs a quantized scheme (--quant int8 or nf4)")
        if not self.calibrate and (self.calibration_text is not None or self.calibrate_methods is not None):
            raise LayerpackError("--calibration-text / --calibrate-methods need --calibrate")
        if not 1 <= self.calibration_tokens <= MAX_CALIBRATION_TOKENS:
            raise LayerpackError(f"--calibration-tokens must be in 1..{MAX_CALIBRATION_TOKENS}")
        if self.calibrate:
            parse_methods(self.calibrate_methods)
