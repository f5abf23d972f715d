"""Converting a Hugging Face checkpoint into a pack (the library behind `layerpack convert`, which
adds --eval on top: layerpack/convert.py).

Modules, lowest first (each imports only those above it):
    options.py    ConvertOptions (built by keyword) and their checks
    unit_plan.py  source tensor -> (unit, canonical name); the scheme each tensor is stored in
    resume.py     the partial folder: per-unit records, the job fingerprint, start / resume / refuse
    job.py        everything decided before a byte is written (Job), and reading a source tensor
    calibration.py  convert --calibrate's statistics for the job, and each weight's Calibrated
    faults.py     the interruption points the resume tests use (ConvertFaults; the default does nothing)
    units.py      the main loop: every unit, tensor by tensor, into its layer file
    finish.py     sidecars, stale layer files, the manifest
    build.py      build_pack: all of the above, in order
"""
