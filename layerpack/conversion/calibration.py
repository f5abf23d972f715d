"""convert --calibrate inside a conversion: the activation statistics of the job (computed once,
saved in the partial folder for a resume) and each weight's Calibrated for the quantizer."""
from __future__ import annotations

import os

from layerpack_runtime.format import SCHEME_NONE

from ..progress import progress_bar
from ..quantizer import Calibrated, activation_stats
from .job import Job, read_whole
from .resume import Partial


def calibration_stats(job: Job, partial: Partial, quiet: bool) -> dict:
    """The activation statistics of every linear: saved by an earlier run of this job (resume), or
    computed now by running the source unit by unit (activation_stats.collect) and saved for a resume."""
    path = os.path.join(partial.dir, activation_stats.STATS_FILE)
    fingerprint = partial.fingerprint() or ""
    stats = activation_stats.load(path, fingerprint)
    if stats is None:
        with progress_bar(len(job.units), "calibrate", quiet, unit="unit") as bar:
            stats = activation_stats.collect(job.arch, job.units, lambda u: {c: read_whole(job.index, u, c) for c in u.tensors},
                                             job.calibration_ids, job.arch["tie_word_embeddings"], lambda u: bar.update(1))
        activation_stats.save(path, stats, fingerprint)
    return stats


def calibrated_for(job: Job, unit: str, canonical: str, scheme: str) -> Calibrated | None:
    """The calibration of one weight for the quantizer (None: not calibrated, or not a quantized linear)."""
    st = job.stats.get(activation_stats.key(unit, canonical)) if job.stats is not None and scheme != SCHEME_NONE else None
    if st is None:
        return None
    return Calibrated(st.sq_mean, st.abs_max, tuple(job.quant.calibration["methods"]))
