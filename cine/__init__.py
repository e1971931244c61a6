"""The cardiac-MRI domain in numpy/nibabel: NIfTI I/O, data sets, preprocessing, measures, phantom, metrics.

This module holds what every room shares: the two error types a user sees as one line, the label
convention, the diagnosis names, and the one atomic writer every file goes through.
"""
import os
from pathlib import Path


class DataError(Exception):
    """A problem with the user's data: names the file and says what is wrong, in one line."""

    def __init__(self, path, message):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class UserError(Exception):
    """A bad request that is not about one file (an impossible prior, an unknown diagnosis)."""


LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}  # ACDC convention, used everywhere inside the tool
DIAGNOSES = ("NOR", "DCM", "HCM", "MINF", "RV")  # ACDC groups; None means unknown


def atomic_write(path, write) -> Path:
    """Call write(tmp) with a temporary path beside `path`, then rename it over `path`: a reader never
    sees a half-written file, and a failed write leaves neither the file nor the temporary behind.
    The temporary name ends like `path` (write functions that pick a format by suffix still work)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}_{path.name}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
