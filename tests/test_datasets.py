"""Data set layouts (ACDC, M&Ms, plain folder + CSV), their checks, and `synth4d info`."""
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from synth4d.cine import DataError, nifti
from synth4d.cine.datasets import scan
from synth4d.cine.info import format_info, info_report
from synth4d import cli

SHAPE = (8, 8, 3, 5)  # (X, Y, Z, T)
GEOM = nifti.Geometry.from_spacing((1.5, 1.5, 8.0), frame_ms=40.0)
GEOM3 = nifti.Geometry.from_spacing((1.5, 1.5, 8.0))
CFG = {"ED": "1", "ES": "3", "Group": "DCM", "Height": "181.5", "NbFrame": "5", "Weight": "80", "Vendor": "B"}


def _image(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _frame_mask(lv, rv=4, myo=6, lv_label=3, rv_label=1):
    """(X, Y, Z) mask with lv, rv, myo voxels (rv_label / lv_label let M&Ms swap the codes)."""
    flat = np.zeros(int(np.prod(SHAPE[:3])), np.uint8)
    flat[:lv], flat[lv:lv + rv], flat[lv + rv:lv + rv + myo] = lv_label, rv_label, 2
    return flat.reshape(SHAPE[:3])


def _acdc(base, i, cfg=CFG, gt_frames=(1, 3), full=False, image=None):
    d = Path(base) / f"patient{i:03d}"
    d.mkdir(parents=True)
    if cfg is not None:
        (d / "Info.cfg").write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    nifti.write(d / f"patient{i:03d}_4d.nii.gz", _image(i) if image is None else image, GEOM)
    for f in gt_frames:
        nifti.write(d / f"patient{i:03d}_frame{f:02d}_gt.nii.gz", _frame_mask(lv=30 if f == 1 else 12), GEOM3, kind="mask")
    if full:
        nifti.write(d / f"patient{i:03d}_4d_gt.nii.gz", np.stack([_frame_mask(lv=30 - 4 * t) for t in range(5)], -1),
                    GEOM, kind="mask")
    return d


def _mnms(root, code, split="Training/Labeled", labelled=True, ed=0, es=2):
    d = Path(root) / split / code
    nifti.write(d / f"{code}_sa.nii.gz", _image(len(code)), GEOM)
    if labelled:
        m = np.zeros(SHAPE, np.uint8)
        m[..., ed] = _frame_mask(lv=30, lv_label=1, rv_label=3)  # M&Ms codes: 1 LV, 2 MYO, 3 RV
        m[..., es] = _frame_mask(lv=10, lv_label=1, rv_label=3)
        nifti.write(d / f"{code}_sa_gt.nii.gz", m, GEOM, kind="mask")
    return d


MNMS_HEADER = "External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight\n"


def _mnms_csv(root, rows):
    path = Path(root) / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
    path.write_text(MNMS_HEADER + "".join(",".join(r) + "\n" for r in rows))
    return path


@contextmanager
def _raises(path, match=None):
    """Expect a DataError whose message names the file."""
    with pytest.raises(DataError, match=match) as e:
        yield e
    assert Path(path).name in str(e.value), str(e.value)


# ---- ACDC -----------------------------------------------------------------------------------

def test_acdc_training_and_testing_subfolders(tmp_path):
    _acdc(tmp_path / "training", 1)
    _acdc(tmp_path / "testing", 101, cfg={"ED": "2", "ES": "5", "NbFrame": "5"}, gt_frames=())
    ds = scan(tmp_path)
    assert ds.layout == "acdc" and [r.id for r in ds.refs] == ["patient001", "patient101"] and ds.problems == []
    a, b = ds.refs
    assert (a.ed, a.es, a.dx) == (0, 2, "DCM")
    assert a.meta == {"vendor": "B", "height": 181.5, "weight": 80.0}
    assert (b.ed, b.es, b.dx) == (1, 4, None)
    s = a.load()
    assert s.id == "patient001" and s.image.shape == SHAPE and s.spacing == (1.5, 1.5, 8.0) and s.frame_ms == 40.0
    np.testing.assert_array_equal(s.image, _image(1))
    assert sorted(s.masks) == [0, 2] and s.masks[0].dtype == np.uint8
    np.testing.assert_array_equal(s.masks[2], _frame_mask(lv=12))
    assert s.full_mask is None
    u = b.load()
    assert u.masks == {} and not u.labelled and u.dx is None


def test_acdc_in_root_with_full_mask(tmp_path):
    _acdc(tmp_path, 7, full=True)
    (ref,) = scan(tmp_path).refs
    s = ref.load()
    assert s.full_mask.shape == SHAPE and int(s.full_mask[..., 4].astype(bool).sum()) == 14 + 10
    assert "full_mask" in ref.files


def test_acdc_refs_pickle(tmp_path):
    import pickle
    _acdc(tmp_path, 1)
    ref = pickle.loads(pickle.dumps(scan(tmp_path).refs[0]))
    assert sorted(ref.load().masks) == [0, 2]


@pytest.mark.parametrize("cfg, match", [
    ({**CFG, "ED": "abc"}, "ED 'abc' is not a number"),
    ({**CFG, "ES": "9"}, "ES 9 is out of range for 5 frames"),
    ({**CFG, "ED": "0"}, "ED 0 is out of range"),  # ACDC frames are 1-based
    ({k: v for k, v in CFG.items() if k != "ES"}, "missing ES"),
    ({**CFG, "Group": "XYZ"}, "unknown Group"),
    ({**CFG, "NbFrame": "6"}, "NbFrame 6"),
    ({**CFG, "Height": "tall"}, "height 'tall'"),
])
def test_acdc_bad_info_cfg(tmp_path, cfg, match):
    _acdc(tmp_path, 1, cfg=cfg)
    with _raises("Info.cfg", match):
        scan(tmp_path)


def test_acdc_missing_or_garbled_info_cfg(tmp_path):
    _acdc(tmp_path, 1, cfg=None)
    with _raises("Info.cfg", "missing Info.cfg"):
        scan(tmp_path)
    (tmp_path / "patient001" / "Info.cfg").write_text("ED 1\n")
    with _raises("Info.cfg", "not 'Key: value'"):
        scan(tmp_path)


def test_mask_shape_and_geometry_mismatch(tmp_path):
    d = _acdc(tmp_path, 1)
    gt = d / "patient001_frame03_gt.nii.gz"
    nifti.write(gt, np.zeros((8, 8, 4), np.uint8), GEOM3, kind="mask")
    with _raises(gt, "shape"):
        scan(tmp_path)
    nifti.write(gt, np.zeros((8, 8, 3), np.uint8), nifti.Geometry.from_spacing((1.5, 1.5, 8.0), origin=(0, 0.5, 0)), kind="mask")
    with _raises(gt, "geometry"):
        scan(tmp_path)
    nifti.write(gt, np.zeros((8, 8, 3), np.uint8), nifti.Geometry.from_spacing((1.5, 1.5, 8.0), origin=(0, 1e-4, 0)), kind="mask")
    assert scan(tmp_path).refs[0].load().masks[2].max() == 0  # within tolerance; an all-zero labelled frame is fine


def test_unknown_labels_and_nan_intensities_raise_on_load(tmp_path):
    d = _acdc(tmp_path, 1)
    gt = d / "patient001_frame01_gt.nii.gz"
    bad = _frame_mask(lv=30)
    bad[0, 0, 0] = 5
    nifti.write(gt, bad, GEOM3, kind="mask")
    with _raises(gt, r"unknown label values \[5\]"):
        scan(tmp_path).refs[0].load()
    nifti.write(gt, _frame_mask(lv=30), GEOM3, kind="mask")
    image = _image()
    image[1, 2, 0, 3] = np.nan
    nifti.write(d / "patient001_4d.nii.gz", image, GEOM)
    with _raises("patient001_4d.nii.gz", "NaN"):
        info_report(tmp_path)


def test_truncated_and_foreign_files(tmp_path):
    d = _acdc(tmp_path, 1)
    image = d / "patient001_4d.nii.gz"
    image.write_bytes(image.read_bytes()[:300])  # header intact, voxel data cut: found by load, not scan
    with _raises(image, "not a readable NIfTI"):
        scan(tmp_path).refs[0].load()
    image.write_text("this is not a NIfTI file")
    with _raises(image, "not a readable NIfTI"):
        scan(tmp_path)


def test_3d_where_4d_expected(tmp_path):
    nifti.write(tmp_path / "a.nii.gz", _image()[..., 0], GEOM3)
    with _raises("a.nii.gz", "expected a 4D cine"):
        scan(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no subjects found") as e:
        scan(tmp_path)
    assert e.value.path == str(tmp_path)


def test_skip_bad_records_problems(tmp_path):
    _acdc(tmp_path, 1)
    _acdc(tmp_path, 2, cfg={**CFG, "ED": "abc"})
    d = _acdc(tmp_path, 3)
    image = _image(3)
    image[0, 0, 0, 0] = np.nan
    nifti.write(d / "patient003_4d.nii.gz", image, GEOM)
    with pytest.raises(DataError):
        scan(tmp_path)
    ds = scan(tmp_path, skip_bad=True)
    assert [r.id for r in ds.refs] == ["patient001", "patient003"]  # NaN is found only by load
    assert len(ds.problems) == 1 and ds.problems[0][0].endswith("patient002/Info.cfg")
    report = info_report(tmp_path, skip_bad=True)
    assert report["n_subjects"] == 1
    assert [Path(p["path"]).name for p in report["problems"]] == ["Info.cfg", "patient003_4d.nii.gz"]
    text = format_info(report)
    assert "unusable files (2)" in text and "ED 'abc' is not a number" in text and "NaN" in text


# ---- M&Ms -----------------------------------------------------------------------------------

def test_mnms_layout_label_mapping_and_unlabelled(tmp_path):
    _mnms(tmp_path, "A1B2C3", ed=1, es=3)
    _mnms(tmp_path, "Z9Y8X7", split="Training/Unlabeled", labelled=False)
    _mnms(tmp_path, "Q5Q5Q5", split="Testing")
    _mnms_csv(tmp_path, [["A1B2C3", "Siemens", "A", "1", "1", "3", "52", "ARV", "M", "175", "70.5"],
                         ["Z9Y8X7", "Philips", "B", "2", "0", "2", "", "HHD", "F", "", ""],
                         ["Q5Q5Q5", "GE", "C", "3", "0", "2", "40", "", "F", "160", "60"]])
    ds = scan(tmp_path)
    assert ds.layout == "mnms" and [r.id for r in ds.refs] == ["A1B2C3", "Q5Q5Q5", "Z9Y8X7"]
    a, q, z = ds.refs
    assert (a.ed, a.es, a.dx, z.dx, q.dx) == (1, 3, "RV", None, None)
    assert z.meta["diagnosis"] == "HHD" and "diagnosis" not in q.meta   # not an ACDC group: kept, counted as other
    assert a.meta == {"vendor": "A", "vendor_name": "Siemens", "sex": "M", "centre": "1", "age": 52.0,
                      "height": 175.0, "weight": 70.5, "split": "Training/Labeled", "diagnosis": "ARV"}
    s = a.load()
    assert sorted(s.masks) == [1, 3]
    np.testing.assert_array_equal(s.masks[1], _frame_mask(lv=30))  # back in ACDC codes: 3 LV, 1 RV
    np.testing.assert_array_equal(s.masks[3], _frame_mask(lv=10))
    assert z.load().masks == {}


def test_mnms_problems(tmp_path):
    _mnms(tmp_path, "A1B2C3")
    with pytest.raises(DataError, match="no information CSV"):
        scan(tmp_path)
    d = _mnms(tmp_path, "NOROW1")
    _mnms_csv(tmp_path, [["A1B2C3", "Siemens", "A", "1", "0", "7", "52", "NOR", "M", "175", "70"]])
    csv_path = next(tmp_path.glob("*.csv"))
    with _raises(csv_path, "A1B2C3: ES 7 is out of range"):
        scan(tmp_path)
    _mnms_csv(tmp_path, [["A1B2C3", "Siemens", "A", "1", "0", "2", "52", "NOR", "M", "175", "70"]])
    with _raises("NOROW1_sa.nii.gz", "no row for 'NOROW1'"):
        scan(tmp_path)
    ds = scan(tmp_path, skip_bad=True)
    assert [r.id for r in ds.refs] == ["A1B2C3"] and "NOROW1" in ds.problems[0][0]
    gt = d / "NOROW1_sa_gt.nii.gz"
    nifti.write(gt, np.full(SHAPE, 4, np.uint8), GEOM, kind="mask")
    _mnms_csv(tmp_path, [["NOROW1", "Siemens", "A", "1", "0", "2", "52", "NOR", "M", "175", "70"]])
    with _raises(gt, r"unknown label values \[4\].*M&Ms"):
        scan(tmp_path, skip_bad=True).refs[0].load()


# ---- plain folder ---------------------------------------------------------------------------

def test_folder_with_csv(tmp_path):
    m = np.zeros(SHAPE, np.uint8)
    m[..., 1], m[..., 3] = _frame_mask(lv=20), _frame_mask(lv=0)
    nifti.write(tmp_path / "s1.nii.gz", _image(1), GEOM)
    nifti.write(tmp_path / "s1_gt.nii.gz", m, GEOM, kind="mask")
    nifti.write(tmp_path / "s2.nii", _image(2), GEOM)
    (tmp_path / "table.csv").write_text("Subject,dx,ed,es,height,vendor\ns1,hcm,1,3,170,X\ns2,,,,,\n")
    ds = scan(tmp_path)
    assert ds.layout == "folder" and [r.id for r in ds.refs] == ["s1", "s2"]
    s1, s2 = ds.refs
    assert (s1.ed, s1.es, s1.dx, s1.meta) == (1, 3, "HCM", {"height": 170.0, "vendor": "X"})
    assert (s2.ed, s2.es, s2.dx, s2.meta) == (0, None, None, {})
    assert sorted(s1.load().masks) == [1, 3] and s2.load().masks == {}
    (tmp_path / "table.csv").write_text("id,es\ns1,x\n")
    with _raises("table.csv", "s1: es 'x' is not a number"):
        scan(tmp_path)


def test_folder_without_csv_infers_ed_es_from_two_masks(tmp_path):
    nifti.write(tmp_path / "a.nii.gz", _image(1), GEOM)  # 3D masks, 1-based: frames 2 and 4, bigger LV at 4
    nifti.write(tmp_path / "a_frame02_gt.nii.gz", _frame_mask(lv=10), GEOM3, kind="mask")
    nifti.write(tmp_path / "a_frame04_gt.nii.gz", _frame_mask(lv=25), GEOM3, kind="mask")
    m = np.zeros(SHAPE, np.uint8)
    m[..., 0], m[..., 2] = _frame_mask(lv=25), _frame_mask(lv=10)
    nifti.write(tmp_path / "b.nii.gz", _image(2), GEOM)
    nifti.write(tmp_path / "b_mask.nii.gz", m, GEOM, kind="mask")
    nifti.write(tmp_path / "c.nii.gz", _image(3), GEOM)
    a, b, c = scan(tmp_path).refs
    assert (a.ed, a.es) == (3, 1) and (b.ed, b.es) == (0, 2) and (c.ed, c.es, c.dx) == (0, None, None)
    assert sorted(a.load().masks) == [1, 3] and sorted(b.load().masks) == [0, 2] and c.load().masks == {}
    nifti.write(tmp_path / "a_frame09_gt.nii.gz", _frame_mask(lv=1), GEOM3, kind="mask")
    with _raises("a_frame09_gt.nii.gz", "out of range for 5 frames"):
        scan(tmp_path)


# ---- synth4d info ---------------------------------------------------------------------------

def test_info_cli_text_and_json(tmp_path):
    _acdc(tmp_path / "training", 1)
    _acdc(tmp_path / "training", 2, cfg={**CFG, "Group": "NOR"})
    _acdc(tmp_path / "testing", 101, cfg={"ED": "1", "ES": "3"}, gt_frames=())
    runner = CliRunner()
    text = runner.invoke(cli, ["info", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert "acdc" in text.output and "DCM 1" in text.output and "LVEDV" in text.output
    res = runner.invoke(cli, ["info", "--json", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["layout"] == "acdc" and report["n_subjects"] == 3
    assert report["diagnoses"] == {"DCM": 1, "NOR": 1, "unknown": 1}
    assert report["labelled_frames"] == 4 and report["subjects_without_labels"] == 1
    assert report["ranges"]["frames"] == [5, 5] and report["ranges"]["spacing_z"] == [8.0, 8.0]
    sub = report["subjects"][0]
    assert sub["labelled_frames"] == [0, 2] and sub["shape"] == list(SHAPE) and sub["vendor"] == "B"
    voxel_ml = 1.5 * 1.5 * 8.0 / 1000
    assert sub["measures"]["lvedv"] == pytest.approx(30 * voxel_ml, abs=0.01)
    assert sub["measures"]["lvef"] == pytest.approx(60.0, abs=0.01)
    assert report["volumes"]["DCM"]["n"] == 1 and report["volumes"]["all"]["n"] == 2
    assert report["subjects"][2]["measures"] is None


def test_info_cli_error_is_one_line(tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "synth4d", "info", str(bad)], capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 1
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def _folder_with_csv(root, content: bytes):
    from synth4d.cine.nifti import Geometry, write
    for sid in ("a", "b"):
        write(root / f"{sid}.nii.gz", np.zeros((8, 8, 3, 4), np.float32), Geometry.from_spacing((1.5, 1.5, 8.0), 40.0))
    (root / "info.csv").write_bytes(content)


BAD_TABLES = {
    "semicolons": (b"subject;dx\na;NOR\n", "semicolon-separated"),
    "UTF-16": ("subject,dx\na,NOR\n".encode("utf-16"), "not UTF-8"),
    "Latin-1": ("subject,dx\na,N\xd6R\n".encode("latin-1"), "not UTF-8"),
    "unclosed quote": (b'subject,dx\n"a,NOR\nb,DCM\n', "not a well-formed CSV row"),
    "a 200 kB field": (b"subject,dx\na," + b"x" * 200_000 + b"\n", "line 2: not a well-formed CSV row"),
    "an id twice": (b"subject,dx\na,NOR\nb,DCM\na,HCM\n", "line 4: subject 'a' appears twice \\(also line 2\\)"),
    "a longer row": (b"subject,dx\na,NOR,extra\n", "line 2: 3 fields for 2 columns"),
    "an unknown diagnosis": (b"subject,dx\na,NRO\n", "a: unknown dx 'NRO'"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_folder_tables_are_refused_naming_the_line(tmp_path, case):
    content, why = BAD_TABLES[case]
    _folder_with_csv(tmp_path, content)
    with pytest.raises(DataError, match=why) as info:
        scan(tmp_path)
    assert info.value.path == str(tmp_path / "info.csv")


def test_info_cfg_with_a_key_twice_or_a_byte_order_mark(tmp_path):
    from synth4d.cine.datasets import _read_cfg
    (tmp_path / "Info.cfg").write_bytes(b"ED: 1\nES: 8\nED: 3\n")
    with pytest.raises(DataError, match="line 3: 'ed' given twice \\(also line 1\\)"):
        _read_cfg(tmp_path / "Info.cfg")
    (tmp_path / "Info.cfg").write_bytes("\ufeffED: 1\nES: 8\n".encode("utf-8"))
    assert _read_cfg(tmp_path / "Info.cfg") == {"ed": "1", "es": "8"}
    (tmp_path / "a.csv").mkdir()   # a folder named like a table is no table
    _folder_with_csv(tmp_path, b"subject,dx\na,NOR\n")
    assert [r.dx for r in scan(tmp_path).refs] == ["NOR", None]
