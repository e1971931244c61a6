"""The one atomic writer (cine.atomic_write) and what loaders skip: interrupted writes leave nothing a
reader takes for data, and their leftovers are cleaned up by the next write of the same file."""
import os
import subprocess
import sys

import numpy as np
import pytest

from synth4d.cine import FILE_MODE, atomic_write, nifti
from synth4d.cine.datasets import scan


def dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_failed_write_leaves_nothing_and_the_old_file_stays(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("old"))

    def fails(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "m.csv"
    stale = tmp_path / f".tmp{dead_pid()}_m.csv"
    live = tmp_path / f".tmp{os.getppid()}_m.csv"      # a running process: maybe writing right now
    other = tmp_path / f".tmp{dead_pid()}_other.csv"   # another file's: not ours to judge here
    for p in (stale, live, other):
        p.write_text("x")
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert not stale.exists() and live.exists() and other.exists() and target.read_text() == "new"


def test_writes_replace_symlinks_and_use_the_usual_mode(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = tmp_path / "out" / "run.json"
    link.parent.mkdir()
    link.symlink_to(precious)
    atomic_write(link, lambda tmp: open(tmp, "w").write("{}"))
    assert precious.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "{}"
    from safetensors.torch import save_file   # it creates files 0600
    import torch
    ckpt = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(1)}, tmp))
    assert ckpt.stat().st_mode & 0o777 == FILE_MODE


def test_loaders_skip_hidden_temporaries(tmp_path):
    """A .tmp<pid>_<name>.nii.gz left by a killed write is not taken for a subject or a table."""
    geom = nifti.Geometry.from_spacing((1.5, 1.5, 8.0), frame_ms=40.0)
    nifti.write(tmp_path / "case1.nii.gz", np.zeros((8, 8, 3, 4), np.float32), geom)
    (tmp_path / f".tmp{dead_pid()}_case2.nii.gz").write_bytes(b"half a file")
    (tmp_path / f".tmp{dead_pid()}_info.csv").write_text("subject,dx\ncase1,NOR\ncase1,DCM\n")
    ds = scan(tmp_path)
    assert [r.id for r in ds.refs] == ["case1"] and ds.refs[0].dx is None
