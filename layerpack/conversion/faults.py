"""Where a conversion can be interrupted on purpose: the resume tests kill the converter at these
points (tests/support/convert_with_faults.py installs an object that does; the conversion itself never
reads a setting for it). The default does nothing."""
from __future__ import annotations


class ConvertFaults:
    """Called by the conversion as it goes; a test's subclass may raise, exit or kill the process."""

    def window_done(self) -> None:
        """After each window of source values is quantized and written (mid-unit)."""

    def unit_recorded(self, units_done: int) -> None:
        """After a unit's layer file and its resume record are written; units_done counts the units
        recorded so far, those of earlier runs included."""


NO_FAULTS = ConvertFaults()
