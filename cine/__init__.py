"""The cardiac-MRI domain in numpy/nibabel: NIfTI I/O, data sets, preprocessing, measures, phantom, metrics.

This module holds what every room shares: the two error types a user sees as one line, the label
convention, the diagnosis names, and the one atomic writer every file goes through.
"""
import glob
import os
import shutil
from pathlib import Path


class DataError(Exception):
    """A problem with the user's data: names the file and says what is wrong, in one line."""

    def __init__(self, path, message):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class UserError(Exception):
    """A bad request that is not about one file (an impossible prior, an unknown diagnosis)."""


def first_line(e: Exception) -> str:
    """An exception's message cut to one short line, for a one-line error (some messages are empty)."""
    lines = str(e).splitlines()
    return lines[0][:120] if lines else type(e).__name__


LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}  # ACDC convention, used everywhere inside the tool
DIAGNOSES = ("NOR", "DCM", "HCM", "MINF", "RV")  # ACDC groups; None means unknown


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()   # what open() would give; some writers (safetensors) create files 0600
TMP_PREFIX = ".tmp"              # temporary names are hidden: no data set layout or loader reads them


def atomic_write(path, write) -> Path:
    """Call write(tmp) with a temporary path beside `path`, then rename it over `path`: a reader never
    sees a half-written file, and a failed write leaves neither the file nor the temporary behind.
    The temporary name ends like `path` (write functions that pick a format by suffix still work).
    A symbolic link at `path` is replaced, never written through. Temporaries that a killed process
    left for the same file are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}_{path.name}")
    try:
        write(str(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _remove_stale(path: Path) -> None:
    """Delete .tmp<pid>_<name> files beside `path` whose process no longer runs."""
    for tmp in path.parent.glob(f"{TMP_PREFIX}*_{glob.escape(path.name)}"):
        pid = tmp.name[len(TMP_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not pid_running(int(pid)):
            tmp.unlink(missing_ok=True)


def pid_running(pid: int) -> bool:
    """Whether process `pid` still runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def atomic_folder(folder, write) -> Path:
    """Call write(tmp) with an empty hidden folder beside `folder`, then swap it into place: a reader sees
    the old folder or the complete new one, never a half-written one."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
