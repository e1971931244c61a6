"""Hostile NIfTI files: every one refused with one line naming the file, a non-zero exit and no traceback,
before anything large is allocated. The files are made here, header field by header field."""
import gzip
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from synth4d.cine import DataError, nifti


def raw(path, shape=(8, 8, 3, 4), dtype=np.float32, pixdim=(1.5, 1.5, 8.0, 30.0), srows=None, payload=None):
    """A .nii.gz written field by field (nibabel's own writer would refuse or repair what these tests need):
    the header claims `shape`, `dtype`, `pixdim` and an sform of rows `srows`; `payload` bytes of voxel data
    follow (default: as many as the header claims)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr["pixdim"][1:1 + len(pixdim)] = pixdim
    srows = np.diag([1.5, 1.5, 8.0, 1.0])[:3] if srows is None else np.asarray(srows)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srows
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["vox_offset"] = 352
    if payload is None:
        payload = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)) + b"\0" * payload)
    return path


def short_uncompressed(path):
    path = path.with_name("short.nii")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 4), np.float32), np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
    path.write_bytes(path.read_bytes()[:600])
    return path


RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
HOSTILE = {  # name: (make the file, what the error says, whether a header-only read (peek) sees it too)
    "claims 400 MB, holds 64 bytes": (lambda p: raw(p, (500, 500, 10, 40), payload=64), "more than the file holds",
                                      False),
    "claims 30000^3 x 100 voxels": (lambda p: raw(p, (30000, 30000, 30000, 100), payload=64), "more than any cine",
                                    True),
    "uncompressed, claims more than the file": (short_uncompressed, "the file holds", True),
    "RGB voxels": (lambda p: raw(p, dtype=RGB), "unsupported voxel type", True),
    "complex voxels": (lambda p: raw(p, dtype=np.complex64), "unsupported voxel type", True),
    "spacing 1e-30 mm": (lambda p: raw(p, pixdim=(1e-30, 1.5, 8.0, 30.0)), "voxel spacing", True),
    "spacing 1e30 mm": (lambda p: raw(p, pixdim=(1.5, 1e30, 8.0, 30.0)), "voxel spacing", True),
    "spacing 0 mm": (lambda p: raw(p, pixdim=(1.5, 1.5, 0.0, 30.0)), "voxel spacing", True),
    "singular affine": (lambda p: raw(p, srows=np.diag([1.5, 0.0, 8.0, 1.0])[:3]), "affine", True),
    "NaN affine": (lambda p: raw(p, srows=np.full((3, 4), np.nan)), "affine", True),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_read_refuses_before_allocating(tmp_path, case):
    make, why, in_header = HOSTILE[case]
    path = make(tmp_path / "bad.nii.gz")
    for reader in [nifti.read] + ([nifti.peek] if in_header else []):
        with pytest.raises(DataError, match=why) as info:
            reader(path, ndim=4)
        assert info.value.path == str(path)
    assert raw(tmp_path / "good.nii.gz") and nifti.read(tmp_path / "good.nii.gz")[0].shape == (8, 8, 3, 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from Linux's /proc")
def test_info_gives_one_line_and_allocates_nothing_large(tmp_path):
    """Through the CLI: exit 1, one stderr line naming the file, no traceback, peak memory well under the claim."""
    raw(tmp_path / "case.nii.gz", (500, 500, 10, 40), payload=64)
    # Peak memory of this process image: VmHWM (ru_maxrss would count the forking pytest process too).
    code = ("import sys\nfrom synth4d import main\nsys.argv = ['synth4d', 'info', sys.argv[1]]\n"
            "try:\n    main()\nfinally:\n"
            "    print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    text = [seg for seg in re.split(r"[\r\n]", done.stderr) if seg.strip() and not re.search(r"\d+%\|", seg)]
    assert done.returncode == 1 and len(text) == 1 and "Traceback" not in done.stderr   # progress-bar redraws aside
    assert str(tmp_path / "case.nii.gz") in done.stderr and "more than the file holds" in done.stderr
    assert int(done.stdout.split()[-1]) < 200_000  # kB: the header claims 400 MB


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_says_so(tmp_path):
    path = raw(tmp_path / "locked.nii.gz")
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read"):
        nifti.read(path)
