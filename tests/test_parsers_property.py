"""Property-based tests (hypothesis) of the readers of user files: whatever the bytes, a reader returns its
result or raises cine.DataError naming the file, never another exception (which the CLI would show as a
traceback), and a NIfTI header never makes it allocate more than MAX_VOXELS voxels."""
import gzip

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from synth4d.cine import DataError, nifti
from synth4d.cine.datasets import _read_cfg, _read_csv

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CSV_ALPHABET = st.sampled_from(list('dx,lvedvfrms0123456789.-+e"\n\r;\t \xe9naNINF') + ["\u00ff", "\ufeff"])


def read_or_data_error(path, read):
    try:
        return read(path)
    except DataError as e:
        assert e.path == str(path) and e.message and "\n" not in e.message
        return None


@FAST
@given(text=st.text(CSV_ALPHABET, max_size=300), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_conditions_csv(tmp_path, text, encoding):
    from synth4d.jobs.generate import read_conditions
    path = tmp_path / "c.csv"
    path.write_bytes(text.encode(encoding, errors="replace"))
    rows = read_or_data_error(path, read_conditions)
    if rows is not None:
        assert rows and all(isinstance(line, int) and isinstance(r, dict) for line, r in rows)
        assert all(np.isfinite(v) for _, r in rows for k, v in r.items() if k != "dx")


@FAST
@given(data=st.binary(max_size=400))
def test_info_cfg_and_tables(tmp_path, data):
    (tmp_path / "Info.cfg").write_bytes(data)
    (tmp_path / "t.csv").write_bytes(data)
    cfg = read_or_data_error(tmp_path / "Info.cfg", _read_cfg)
    assert cfg is None or all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.items())
    read_or_data_error(tmp_path / "t.csv", _read_csv)


HEADER = st.fixed_dictionaries({
    "shape": st.lists(st.integers(0, 70000), min_size=1, max_size=5),
    "dtype": st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex64]),
    "pixdim": st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                 st.sampled_from([0.0, 1.5, 8.0])), min_size=4, max_size=4),
    "srow": st.lists(st.one_of(st.floats(-1e6, 1e6, width=32), st.just(float("nan"))), min_size=12, max_size=12),
    "payload": st.integers(0, 5000),
    "compressed": st.booleans(),
})


@FAST
@given(h=HEADER)
def test_nifti_header_fields(tmp_path, h):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(h["dtype"])
    try:
        hdr.set_data_shape(h["shape"])
    except Exception:  # nibabel itself refuses some shapes when writing: no file to read then
        return
    hdr["pixdim"][1:5] = h["pixdim"]
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = np.reshape(h["srow"], (3, 4))
    hdr["sform_code"], hdr["vox_offset"] = 1, 352
    blob = hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)) + b"\1" * h["payload"]
    path = tmp_path / ("f.nii.gz" if h["compressed"] else "f.nii")
    path.write_bytes(gzip.compress(blob) if h["compressed"] else blob)
    for read in (nifti.read, nifti.peek):
        got = read_or_data_error(path, read)
        if got is not None and read is nifti.read:
            assert got[0].size <= nifti.MAX_VOXELS and np.isfinite(got[0]).all()
