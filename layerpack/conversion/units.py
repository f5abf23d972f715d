"""The conversion's main loop: every unit, tensor by tensor, quantized into its layer file and
recorded for a resume, while the next tensor is read and finished source files are hashed.

Memory: the source tensor being quantized, the next one being read ahead, and the stored tensors
of the current unit (which are never larger than its source) - bounded by one layer unit, not by
the model; a tensor larger than one window is read window by window (quantizer/windows.py)."""
from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

from layerpack_runtime.format import DTYPE_NAMES, unit_file
from layerpack_runtime.manifest import FileEntry, LayerEntry, TensorEntry

from ..progress import progress_bar
from ..quantizer import OUTLIER_ROW, quantize_stream
from ..source import file_digest, provenance_files
from ..writer import UnitWriter
from .calibration import calibrated_for
from .faults import ConvertFaults
from .job import Job, open_tensor, source_nbytes, tensor_plan
from .resume import Partial
from .unit_plan import UnitPlan


def convert_units(job: Job, todo: list[UnitPlan], out: str, partial: Partial,
                  results: dict[str, tuple[LayerEntry, FileEntry]], quiet: bool, hasher: ThreadPoolExecutor,
                  faults: ConvertFaults) -> list[Future]:
    """Quantize and write each unit of `todo`, tensor by tensor, recording each finished unit.
    Source files are hashed (provenance) on `hasher` right after the converter's last read from
    each, while their pages are still cached: hashing ahead would read a model larger than RAM
    twice from disk. Returns the digest futures, in provenance_files order."""
    q = job.quant
    dtype = DTYPE_NAMES[q.dtype]
    jobs = [(u, c) for u in todo for c in sorted(u.tensors)]
    last_read = {job.index.file_of(u.tensors[c]): j for j, (u, c) in enumerate(jobs)}
    digests: dict[str, Future] = {}
    for rel in provenance_files(job.source):
        if rel not in last_read:  # config, tokenizer, shards no remaining unit reads
            digests[rel] = hasher.submit(file_digest, job.source, rel)
    total = sum(source_nbytes(job.index, u, c) for u, c in jobs)
    with progress_bar(total, "convert", quiet) as bar, ThreadPoolExecutor(1) as reader:
        # Read tensor i+1 (disk) while tensor i is quantized (CPU): both overlap on 2 cores. A tensor
        # larger than one window is not read here but window by window as it is quantized.
        ahead = reader.submit(open_tensor, job.index, *jobs[0]) if jobs else None

        def on_window(nbytes: int) -> None:
            bar.update(nbytes)
            faults.window_done()

        j = 0
        for u in todo:
            names = sorted(u.tensors)
            plans = {c: tensor_plan(job, u, c) for c in names}
            specs = {n: spec for c in names for n, spec in plans[c][2].items()}
            rel = unit_file(u.name)
            entries: list[TensorEntry] = []
            params = 0
            bar.set_description(u.name)
            with UnitWriter(os.path.join(out, rel), u.name, specs, q.zstd_level) as writer:
                for canonical in names:
                    src = ahead.result()
                    ahead = reader.submit(open_tensor, job.index, *jobs[j + 1]) if j + 1 < len(jobs) else None
                    scheme, fraction, _ = plans[canonical]
                    entries.append(quantize_stream(canonical, src, scheme, dtype, q.block_size, fraction,
                                                   q.outlier_rule or OUTLIER_ROW, writer, on_window,
                                                   calibrated_for(job, u.name, canonical, scheme)))
                    params += math.prod(src.shape)
                    del src
                    for f_rel, last in last_read.items():
                        if last == j:
                            digests[f_rel] = hasher.submit(file_digest, job.source, f_rel)
                    j += 1
                size, sha = writer.finish()
            layer, f = LayerEntry(u.name, u.kind, rel, params, entries, u.index), FileEntry(rel, size, sha)
            partial.save(u.name, layer, f)
            results[u.name] = (layer, f)
            faults.unit_recorded(len(results))
    return [digests[rel] for rel in provenance_files(job.source)]
