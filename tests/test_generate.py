"""`synth4d generate` end to end with tiny trained weights: files, determinism, resumption, refusals."""
import csv
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from synth4d.cine import UserError, nifti
from synth4d.cine.datasets import scan
from synth4d import cli
from tests.conftest import fails_at, run_cli, weights_without_es_prior

FAST = ["--frames", "5", "--steps", "3"]


def _arrays(folder, sid):
    image, geom = nifti.read(folder / f"{sid}.nii.gz", ndim=4)
    mask, _ = nifti.read(folder / f"{sid}_mask.nii.gz", ndim=4, kind="mask")
    return image, mask, geom


def test_flat_outputs_geometry_and_manifest(tiny_weights, tmp_path):
    out = tmp_path / "gen"
    result = run_cli("generate", "--weights", tiny_weights, "--n", 2, "--dx", "HCM", "--lvedv", 120, *FAST, out)
    paths = result.stdout.split()
    assert paths == [str(out / f) for f in ("synth_0000.nii.gz", "synth_0000_mask.nii.gz", "synth_0000.json",
                                            "synth_0001.nii.gz", "synth_0001_mask.nii.gz", "synth_0001.json")]
    image, mask, geom = _arrays(out, "synth_0000")
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["synth_0000", "synth_0001"]
    row = rows[0]
    assert row["dx"] == "HCM" and float(row["requested_lvedv"]) == 120 and row["given_lvedv"] == "1"
    assert row["given_lvesv"] == "0" and float(row["requested_lvesv"]) < 120
    assert image.shape[3] == 5 and mask.shape == image.shape and image.shape[2] == int(row["slices"])
    assert geom.spacing[:2] == pytest.approx((6.0, 6.0)) and geom.spacing[2] == pytest.approx(float(row["slice_mm"]), abs=1e-3)
    assert geom.frame_ms > 0 and set(np.unique(mask)) <= {0, 1, 2, 3}
    # The measured columns are what the written masks say.
    from synth4d.cine.measures import clinical_measures
    m = clinical_measures(mask[..., 0], mask[..., int(row["es"])], geom.spacing)
    assert float(row["measured_lvedv"]) == pytest.approx(m["lvedv"], abs=1e-2)
    # The folder + manifest is a data set the loader reads.
    ds = scan(out)
    assert ds.layout == "folder" and [r.id for r in ds.refs] == ["synth_0000", "synth_0001"]
    assert ds.refs[0].dx == "HCM"
    # Provenance: the headers say synthetic, the mask is a label map, the sidecar says how it was made.
    import nibabel as nib
    from synth4d import __version__
    img, msk = nib.load(out / "synth_0000.nii.gz"), nib.load(out / "synth_0000_mask.nii.gz")
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == f"synth4d {__version__} synthetic"
    assert int(msk.header["intent_code"]) == 1002 and int(img.header["intent_code"]) == 0
    side = __import__("json").loads((out / "synth_0000.json").read_text())
    assert side["synthetic"] is True and side["requested"]["lvedv"] == 120 and side["given"] == ["lvedv"]
    assert side["seed"] == int(row["seed"]) and side["weights"] == row["weights"] and side["sampling"]["steps"] == 3
    assert side["sampling"]["motion_steps"] == int(row["motion_steps"]) == 3   # --steps: both models
    assert side["labels"] == {"convention": "acdc", "0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    assert side["measured"]["lvedv"] == pytest.approx(m["lvedv"], abs=1e-2)


@pytest.mark.parametrize("layout", ["flat", "acdc"])
def test_mnms_label_order_and_prefix_read_back(tiny_weights, tmp_path, layout):
    """--labels mnms swaps RV and LV in the files; synth4d reads them back in its own order either way."""
    common = ["--weights", tiny_weights, "--n", 1, "--seed", 3, "--layout", layout, *FAST]
    run_cli("generate", *common, tmp_path / "acdc")
    run_cli("generate", *common, "--labels", "mnms", "--prefix", "synthHCM_", tmp_path / "mnms")
    plain, swapped = scan(tmp_path / "acdc"), scan(tmp_path / "mnms")
    assert swapped.layout == plain.layout and [r.id for r in swapped.refs] == [
        "synthHCM_0000" if layout == "flat" else "synthHCM_001"]
    a, b = plain.refs[0].load(), swapped.refs[0].load()
    full_a = a.full_mask if a.full_mask is not None else np.stack([a.masks[t] for t in sorted(a.masks)], -1)
    full_b = b.full_mask if b.full_mask is not None else np.stack([b.masks[t] for t in sorted(b.masks)], -1)
    assert np.array_equal(full_a, full_b) and np.array_equal(a.image, b.image)
    stored = next(p for p in (tmp_path / "mnms").rglob("*.nii.gz") if "_mask" in p.name or p.name.endswith("_4d_gt.nii.gz"))
    raw, _ = nifti.read(stored, ndim=4, kind="mask")
    assert np.array_equal(raw, np.array([0, 3, 2, 1], np.uint8)[full_a])


def test_bad_prefix_is_one_line(tiny_weights, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--prefix", "../x", str(tmp_path / "o")])
    assert result.exit_code != 0 and "--prefix" in str(result.exception) and not (tmp_path / "o").exists()


def test_same_seed_same_files_and_one_subject_alone(tiny_weights, tmp_path):
    run_cli("generate", "--weights", tiny_weights, "--n", 3, "--seed", 7, *FAST, tmp_path / "a")
    run_cli("generate", "--weights", tiny_weights, "--n", 3, "--seed", 7, *FAST, tmp_path / "b")
    run_cli("generate", "--weights", tiny_weights, "--n", 1, "--start", 2, "--seed", 7, *FAST, tmp_path / "c")
    run_cli("generate", "--weights", tiny_weights, "--n", 1, "--seed", 8, *FAST, tmp_path / "d")
    for sid in ("synth_0000", "synth_0001", "synth_0002"):
        a, b = _arrays(tmp_path / "a", sid), _arrays(tmp_path / "b", sid)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    alone, batch = _arrays(tmp_path / "c", "synth_0002"), _arrays(tmp_path / "a", "synth_0002")
    assert np.array_equal(alone[0], batch[0]) and np.array_equal(alone[1], batch[1])
    other = _arrays(tmp_path / "d", "synth_0000")
    assert other[0].shape != batch[0].shape or not np.array_equal(other[0], _arrays(tmp_path / "a", "synth_0000")[0])


def test_rerun_skips_complete_subjects_and_never_overwrites(tiny_weights, tmp_path):
    out = tmp_path / "gen"
    run_cli("generate", "--weights", tiny_weights, "--n", 2, *FAST, out)
    first = (out / "synth_0001.nii.gz").stat().st_mtime_ns
    result = run_cli("generate", "--weights", tiny_weights, "--n", 3, "--json", *FAST, out)
    rows = [__import__("json").loads(line) for line in result.stdout.splitlines()]
    assert [r.get("skipped", False) for r in rows] == [True, True, False]
    # Skipped rows (read back from the manifest) have the types of new ones.
    assert {k: type(v) for k, v in rows[0].items() if k != "skipped"} == {k: type(v) for k, v in rows[2].items()}
    assert (out / "synth_0001.nii.gz").stat().st_mtime_ns == first
    # Another request into the same folder would silently mix two runs: refused, whatever differs.
    for change in (["--seed", "5"], ["--dx", "HCM"], ["--lvedv", "150"], ["--frames", "6"], ["--steps", "4"],
                   ["--guidance", "3"], ["--keyframes", "2"], ["--sampler", "dpmpp_2m"], ["--motion-steps", "2"],
                   ["--motion-sampler", "dpmpp_2m"], ["--motion-guidance", "1"]):
        result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), *FAST, *change, str(out)])
        assert result.exit_code != 0 and "another request" in str(result.exception), change
    # A stray file with a subject's name is not overwritten without --overwrite.
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "synth_0000.nii.gz").write_bytes(b"mine")
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), *FAST, str(tmp_path / "x")])
    assert result.exit_code != 0 and (tmp_path / "x" / "synth_0000.nii.gz").read_bytes() == b"mine"
    run_cli("generate", "--weights", tiny_weights, "--overwrite", *FAST, tmp_path / "x")
    assert (tmp_path / "x" / "synth_0000.nii.gz").read_bytes() != b"mine"
    assert not list(out.glob(".tmp*")) and not list((tmp_path / "x").glob(".tmp*"))


def test_acdc_layout_reads_back(tiny_weights, tmp_path):
    out = tmp_path / "acdc"
    run_cli("generate", "--weights", tiny_weights, "--n", 2, "--dx", "DCM", "--layout", "acdc", *FAST, out)
    ds = scan(out)
    assert ds.layout == "acdc" and [r.id for r in ds.refs] == ["patient001", "patient002"]
    subject = ds.refs[0].load()
    assert subject.dx == "DCM" and subject.ed == 0 and sorted(subject.masks) == sorted({0, subject.es})
    assert subject.full_mask is not None and subject.full_mask.shape == subject.image.shape
    assert np.array_equal(subject.masks[subject.es], subject.full_mask[..., subject.es])


def test_conditions_csv(tiny_weights, tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("dx,lvedv,lvef,frames\nNOR,150,60,4\nDCM,,,5\n")
    out = tmp_path / "gen"
    result = run_cli("generate", "--weights", tiny_weights, "--conditions", table, "--steps", 3, "--json", out)
    rows = [__import__("json").loads(line) for line in result.stdout.splitlines()]
    assert [r["dx"] for r in rows] == ["NOR", "DCM"] and [int(r["frames"]) for r in rows] == [4, 5]
    assert float(rows[0]["requested_lvedv"]) == 150 and float(rows[0]["requested_lvesv"]) == pytest.approx(60, abs=1e-2)


@pytest.mark.parametrize("args, words", [
    (["--lvedv", "100", "--lvesv", "120"], "smaller than"),
    (["--lvef", "130"], "between 0 and 100"),
    (["--rvedv", "-3"], "positive"),
    (["--dx", "XYZ"], "unknown diagnosis"),
    (["--slices", "99"], "slices must be"),
])
def test_impossible_requests_are_refused_before_any_work(tiny_weights, tmp_path, args, words):
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "synth4d", "generate", "--weights", str(tiny_weights), *args, str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_conditions_file(tiny_weights, tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("dx,lvedv,height\nNOR,150,180\n")
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--conditions", str(table),
                                      str(tmp_path / "o")])
    assert result.exit_code != 0 and "c.csv" in str(result.exception) and "height" in str(result.exception)
    table.write_text("dx,lvedv\nNOR,big\n")
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--conditions", str(table),
                                      str(tmp_path / "o")])
    assert "line 2" in str(result.exception)


def test_export_weights_halves_the_files_and_still_generates(tiny_weights, tmp_path):
    runs = tmp_path / "runs"
    for stage in ("vae", "static", "motion"):
        (runs / stage).mkdir(parents=True)
        (runs / stage / f"{stage}.safetensors").write_bytes((tiny_weights / f"{stage}.safetensors").read_bytes())
    run_cli("export-weights", runs, tmp_path / "w")
    for stage in ("vae", "static", "motion"):
        small, big = (tmp_path / "w" / f"{stage}.safetensors").stat().st_size, (tiny_weights / f"{stage}.safetensors").stat().st_size
        assert small < 0.6 * big
    result = CliRunner().invoke(cli, ["export-weights", str(runs), str(tmp_path / "w")])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)
    run_cli("generate", "--weights", tmp_path / "w", *FAST, tmp_path / "gen")
    image, mask, _ = _arrays(tmp_path / "gen", "synth_0000")
    assert image.shape == mask.shape and mask.max() <= 3


def test_keyframes_interpolate_motion_but_keep_the_anatomy(tiny_weights, tmp_path):
    run_cli("generate", "--weights", tiny_weights, "--frames", 7, "--steps", 3, "--keyframes", 3, tmp_path / "k")
    run_cli("generate", "--weights", tiny_weights, "--frames", 7, "--steps", 3, "--keyframes", 0, tmp_path / "all")
    k, full = _arrays(tmp_path / "k", "synth_0000"), _arrays(tmp_path / "all", "synth_0000")
    assert k[0].shape == full[0].shape and k[0].shape[3] == 7
    # Phase 0 is ED: the same static sample, untouched by how the motion frames were made.
    assert np.array_equal(k[0][..., 0], full[0][..., 0]) and np.array_equal(k[1][..., 0], full[1][..., 0])
    assert not np.array_equal(k[0][..., 1:], full[0][..., 1:])


def test_two_jobs_side_by_side_into_one_folder(tiny_weights, tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "synth4d", "generate", "--weights", str(tiny_weights), "--n", "3", *FAST, str(out)]
    jobs = [subprocess.Popen(cmd + ["--start", str(start)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for start in (0, 3)]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0]
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"synth_{i:04d}" for i in range(6)]
    assert all((out / p).is_file() for r in rows for p in r["files"].split(";"))


def test_manifest_updates_keep_the_rows_another_job_wrote(tmp_path):
    # Two jobs side by side into one folder: each knows only its own subjects when it writes.
    from synth4d.jobs.generate import _read_manifest, _write_manifest
    path = tmp_path / "manifest.csv"
    row = lambda sid, seed, attempts=1: {"id": sid, "seed": seed, "attempts": attempts, "files": f"{sid}.nii.gz"}  # noqa: E731
    _write_manifest(path, {"synth_0000": row("synth_0000", 1)})
    _write_manifest(path, {"synth_0002": row("synth_0002", 3)})
    _write_manifest(path, {"synth_0000": row("synth_0000", 2)})   # a row is replaced, not repeated
    rows = _read_manifest(path)
    assert sorted(rows) == ["synth_0000", "synth_0002"] and rows["synth_0000"]["seed"] == "2"
    assert rows["synth_0002"]["attempts"] == "1" and not list(tmp_path.glob(".tmp*"))


def test_manifest_lock_is_never_followed_through_a_symlink(tmp_path):
    from synth4d.cine import DataError
    from synth4d.jobs.generate import _write_manifest
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".manifest.lock").symlink_to(precious)
    with pytest.raises(DataError, match="manifest lock"):
        _write_manifest(tmp_path / "out" / "manifest.csv", {"synth_0000": {"id": "synth_0000", "seed": 1}})
    assert precious.read_text() == "keep me"


KILL_AT = {  # a function of jobs.generate to replace, and on which call the process dies (os._exit: no clean-up)
    "between the subject's files and its manifest row": ("_write_manifest", 1),
    "between the image and the mask": ("write", 2),
}


@pytest.mark.parametrize("layout", ["flat", "acdc"])
@pytest.mark.parametrize("moment", list(KILL_AT))
def test_a_rerun_completes_a_generate_killed_at_any_write(tiny_weights, tmp_path, layout, moment):
    """Kill a run mid-subject (a real process exit, nothing cleaned up), rerun the same command: the
    folder ends exactly as an uninterrupted run leaves it, and no data set reader sees a partial subject."""
    args = ["--weights", tiny_weights, "--n", 2, "--seed", 4, "--layout", layout, *FAST]
    run_cli("generate", *args, tmp_path / "whole")
    name, call = KILL_AT[moment]
    killed = tmp_path / "killed"
    script = (f"import os, sys, synth4d.jobs.generate as g\n"
              f"real, calls = g.{name}, []\n"
              f"def dies(*a, **k):\n"
              f"    calls.append(1)\n"
              f"    if len(calls) == {call}: os._exit(9)\n"
              f"    return real(*a, **k)\n"
              f"g.{name} = dies\n"
              f"from synth4d import main\n"
              f"sys.argv = ['synth4d', 'generate'] + sys.argv[1:]\n"
              f"main()\n")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args), str(killed)], capture_output=True)
    assert done.returncode == 9
    if layout == "acdc" and list(killed.glob("patient*")):   # a subject folder is there whole or not at all
        assert all(ref.load().n_frames == 5 for ref in scan(killed).refs)
    run_cli("generate", *args, killed)
    def data_files(folder):  # hidden names are the lock and the pending markers, no data
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))

    files = data_files(tmp_path / "whole")
    assert files == data_files(killed)
    assert all((tmp_path / "whole" / f).read_bytes() == (killed / f).read_bytes() for f in files)
    assert not list(killed.rglob(".tmp*")) and not list((killed / ".pending").iterdir())
    assert [r.id for r in scan(killed).refs] == [r.id for r in scan(tmp_path / "whole").refs]


CONDITIONS = {  # CSV content (bytes): what the one-line error says
    "extra field": (b"dx,lvedv\nHCM,150,7\n", "line 2: 3 fields for 2 columns"),
    "frames nan": (b"dx,frames\nHCM,nan\n", "line 2: frames 'nan' is not a whole number"),
    "frames inf": (b"dx,frames\nHCM,inf\n", "line 2: frames 'inf' is not a whole number"),
    "frames 2.7": (b"dx,frames\nHCM,2.7\n", "line 2: frames '2.7' is not a whole number"),
    "lvedv inf": (b"dx,lvedv\nHCM,1e999\n", "line 2: lvedv '1e999' is not a finite number"),
    "Latin-1 bytes": ("dx,lvedv\nHCM,150\nNOR,1\xe9\n".encode("latin-1"), "not UTF-8"),
    "UTF-16": ("dx,lvedv\nHCM,150\n".encode("utf-16"), "not UTF-8"),
    "a 200 kB field": (b"dx,lvedv\nHCM," + b"1" * 200_000 + b"\n", "line 2: not a well-formed CSV row"),
    "unclosed quote": (b'dx,lvedv\n"HCM,150\nNOR,100\n', "not a well-formed CSV row"),
    "semicolons": (b"dx;lvedv\nHCM;150\n", "unknown column"),
    "a column twice": (b"dx,lvedv,lvedv\nHCM,150,160\n", "a column appears twice"),
    "a range error on line 3": (b"dx,lvef\nHCM,60\nDCM,130\n", "line 3: lvef must be between 0 and 100"),
    "an unknown diagnosis on line 2": (b"dx\nFOO\n", "line 2: unknown diagnosis 'FOO'"),
    "no rows": (b"dx,lvedv\n", "no subject rows"),
}


@pytest.mark.parametrize("case", list(CONDITIONS))
def test_bad_conditions_name_the_file_and_line_and_write_nothing(tiny_weights, tmp_path, case):
    from synth4d.cine import DataError
    from synth4d.jobs.generate import generate
    content, why = CONDITIONS[case]
    path = tmp_path / "requests.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=why) as info:
        list(generate(tmp_path / "out", conditions=path, weights=tiny_weights, frames=4, steps=2))
    assert info.value.path == str(path) and not (tmp_path / "out").exists()


def test_bad_output_folders_and_manifests_are_refused_before_any_work(tiny_weights, tmp_path):
    from synth4d.cine import DataError, UserError
    from synth4d.jobs.generate import generate
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="is not a folder"):
        list(generate(tmp_path / "a_file", weights=tiny_weights, frames=4, steps=2))
    for content in (b"\xff\xfe\x00garbage", b"name,value\nx,1\n", b"id,seed,attempts,files\nsynth_0000,abc,1,x\n"):
        out = tmp_path / f"out{len(content)}"
        out.mkdir()
        (out / "manifest.csv").write_bytes(content)
        with pytest.raises(DataError, match="manifest") as info:
            list(generate(out, weights=tiny_weights, frames=4, steps=2))
        assert info.value.path == str(out / "manifest.csv")
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["manifest.csv"]


def test_cli_gives_one_line_for_bad_conditions(tiny_weights, tmp_path):
    (tmp_path / "c.csv").write_bytes(b"dx,frames\nHCM,2.7\n")
    done = subprocess.run([sys.executable, "-m", "synth4d", "generate", str(tmp_path / "o"), "--conditions",
                           str(tmp_path / "c.csv"), "--weights", str(tiny_weights)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"synth4d: error: {tmp_path / 'c.csv'}: line 2: frames '2.7' is not "
                                                "a whole number"]


@pytest.mark.parametrize("guidance", ["nan", "inf"])
def test_non_finite_guidance_is_refused(tiny_weights, tmp_path, guidance):
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--guidance", guidance, *FAST,
                                      str(tmp_path / "o")])
    assert result.exit_code != 0 and "guidance must be a finite number" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_a_motion_grid_end_is_recorded_and_checked(tiny_weights, tmp_path):
    """--motion-final-t reaches the manifest and the sidecar, changes the subject's request digest (a rerun with
    another end refuses to mix the two), and an end that leaves too few timesteps is one clean error."""
    import csv
    import json
    out = tmp_path / "o"
    args = ["--weights", tiny_weights, "--n", 1, "--dx", "NOR", "--frames", 4, "--steps", 2, "--keyframes", 2]
    run_cli("generate", *args, "--motion-final-t", 30, out)
    row = next(csv.DictReader(open(out / "manifest.csv")))
    assert row["motion_final_t"] == "30"
    assert json.loads((out / "synth_0000.json").read_text())["sampling"]["motion_final_t"] == 30
    result = CliRunner().invoke(cli, ["generate", *map(str, args), str(out)])
    assert result.exit_code != 0 and "generated from another request" in str(result.exception)
    run_cli("generate", *args, tmp_path / "trailing")
    row = next(csv.DictReader(open(tmp_path / "trailing" / "manifest.csv")))
    assert row["motion_final_t"] == "" and row["request"] != next(csv.DictReader(open(out / "manifest.csv")))["request"]
    assert json.loads((tmp_path / "trailing" / "synth_0000.json").read_text())["sampling"]["motion_final_t"] is None
    result = CliRunner().invoke(cli, ["generate", *map(str, args), "--motion-final-t", "999", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "final timestep must be between 0 and 998 for 2 steps" in str(result.exception)
    assert not (tmp_path / "bad").exists()


def test_a_fault_at_any_atomic_write_is_completed_by_a_rerun(tiny_weights, tmp_path, monkeypatch):
    """Raise at the k-th atomic write of a run (probe, pending marker, image, mask, manifest), then rerun the
    same command: always completes, byte for byte as an uninterrupted run."""
    import synth4d.cine
    import synth4d.jobs.generate as g
    args = ["--weights", tiny_weights, "--n", 1, "--seed", 4, *FAST]
    run_cli("generate", *args, tmp_path / "whole")
    expected = {p.relative_to(tmp_path / "whole"): p.read_bytes() for p in (tmp_path / "whole").rglob("*")
                if p.is_file() and not p.name.startswith(".")}
    real, k = synth4d.cine.atomic_write, 0
    while True:
        k += 1
        faulty = fails_at(k, real, OSError(28, "No space left on device"))

        out = tmp_path / f"fault{k}"
        for module in (g, synth4d.cine.nifti):
            monkeypatch.setattr(module, "atomic_write", faulty)
        result = CliRunner().invoke(cli, ["generate", *map(str, args), str(out)])
        for module in (g, synth4d.cine.nifti):
            monkeypatch.setattr(module, "atomic_write", real)
        if result.exit_code == 0:
            break   # k is past the last write
        run_cli("generate", *args, out)
        got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
        assert got == expected, k
    assert k == 7   # six writes: the probe, then the subject's pending marker, image, mask, sidecar and manifest


def test_the_motion_model_runs_its_own_sampler_and_steps(tiny_weights, monkeypatch):
    import synth4d.nets.diffusion as diffusion
    from synth4d.jobs.synthesize import Sampling, load
    model = load(tiny_weights)
    calls = {"static": 0, "motion": 0}
    for name in calls:
        getattr(model.chain, name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    used = []
    for name, fn in list(diffusion.SAMPLERS.items()):
        monkeypatch.setitem(diffusion.SAMPLERS, name, lambda *a, fn=fn, name=name, **k: used.append(name) or fn(*a, **k))
    sampling = Sampling(steps=3, keyframes=3, motion_sampler="dpmpp_2m", motion_steps=2)
    n = model.generate(dx="NOR", frames=5, sampling=sampling).attempts   # draws again if implausible
    assert calls == {"static": 3 * n, "motion": 2 * n} and used == ["ddim", "dpmpp_2m"] * n   # a batched forward a step
    # Guided on the noisiest half of the motion steps (4 of 8) and a third of the static ones (1 of 3): the same
    # forward count (cond and uncond share one batched forward), the unguided steps at half the batch.
    batches = {"static": [], "motion": []}
    for name in batches:
        getattr(model.chain, name).register_forward_hook(
            lambda m, a, o, name=name: batches[name].append(a[0].shape[0]))
    sampling = Sampling(steps=3, keyframes=3, guided_fraction=0.4, motion_steps=8, motion_guided_fraction=0.5)
    assert sampling.chain_args()["guided_steps"] == 1 and sampling.chain_args()["motion_guided_steps"] == 4
    n = model.generate(dx="NOR", frames=5, sampling=sampling).attempts
    assert batches["static"] == [2, 1, 1] * n
    assert batches["motion"] == [4, 4, 4, 4, 2, 2, 2, 2] * n   # 2 keyframes sampled (ED is not), x2 when guided


def test_sampler_options_resolve_per_model(monkeypatch):
    import synth4d.jobs.synthesize as synthesize
    from synth4d.jobs.synthesize import Sampling
    steps = lambda s: (s.sampler, s.steps, s.guidance, s.motion_sampler, s.motion_steps, s.motion_guidance)  # noqa: E731
    monkeypatch.setattr(synthesize, "DEFAULT_MOTION", ("dpmpp_2m", 8, 1.0, 1.0, None))
    monkeypatch.setattr(synthesize, "DEFAULT_GUIDED", 1.0)
    assert steps(Sampling()) == ("ddim", 25, 2, "dpmpp_2m", 8, 1)                     # the defaults: one per model
    assert steps(Sampling("ddim", 25)) == ("ddim", 25, 2, "ddim", 25, 2)              # the reference: both DDIM 25
    assert steps(Sampling(steps=10)) == ("ddim", 10, 2, "ddim", 10, 2)                # given steps are both models'
    assert steps(Sampling(guidance=3)) == ("ddim", 25, 3, "ddim", 25, 3)              # and so is a given guidance
    assert steps(Sampling("dpmpp_2m")) == ("dpmpp_2m", 15, 2, "dpmpp_2m", 15, 2)
    assert steps(Sampling(motion_steps=5)) == ("ddim", 25, 2, "dpmpp_2m", 5, 1)
    assert steps(Sampling(motion_sampler="ddim")) == ("ddim", 25, 2, "ddim", 25, 1)
    assert steps(Sampling("ddim", 20, motion_sampler="dpmpp_2m")) == ("ddim", 20, 2, "dpmpp_2m", 20, 2)
    assert steps(Sampling(motion_guidance=1.5)) == ("ddim", 25, 2, "dpmpp_2m", 8, 1.5)
    assert Sampling(motion_steps=5).describe() == "static ddim 25 steps, guidance 2; motion dpmpp_2m 5 steps, guidance 1"
    assert Sampling("ddim").describe() == "ddim 25 steps, guidance 2" and Sampling("ddim").shared()
    fractions = lambda s: (s.guided_fraction, s.motion_guided_fraction)  # noqa: E731
    monkeypatch.setattr(synthesize, "DEFAULT_MOTION", ("dpmpp_2m", 8, 2.0, 0.5, None))
    assert fractions(Sampling()) == (1.0, 0.5) and fractions(Sampling(motion_steps=6)) == (1.0, 0.5)
    monkeypatch.setattr(synthesize, "DEFAULT_GUIDED", 0.48)
    assert fractions(Sampling()) == (0.48, 0.5) and fractions(Sampling("ddim", 25)) == (1.0, 1.0)
    assert fractions(Sampling(motion_steps=6)) == (0.48, 0.5)
    assert Sampling().chain_args()["guided_steps"] == 12
    monkeypatch.setattr(synthesize, "DEFAULT_GUIDED", 1.0)
    assert fractions(Sampling("ddim", 25)) == (1.0, 1.0)                            # the reference: guided throughout
    assert fractions(Sampling(guided_fraction=0.25)) == (0.25, 0.25)                 # a given fraction is both models'
    assert fractions(Sampling(motion_guided_fraction=0.75)) == (1.0, 0.75)
    assert Sampling().describe() == ("static ddim 25 steps, guidance 2; motion dpmpp_2m 8 steps, guidance 2 on the "
                                     "first 4 steps")
    assert not Sampling(motion_sampler="ddim", motion_steps=25, motion_guidance=2).shared()  # guided differently
    assert [Sampling.guided_steps(f, 8) for f in (0, 0.1, 0.25, 0.3, 0.5, 1)] == [0, 0, 2, 2, 4, 8]
    assert Sampling.guided_steps(0.5, 25) == 12 and Sampling.guided_steps(0.48, 25) == 12
    for bad in ({"motion_sampler": "euler"}, {"motion_steps": 0}, {"sampler": "plms"}, {"motion_guidance": -1.0},
                {"guidance": float("nan")}, {"guided_fraction": 1.5}, {"motion_guided_fraction": -0.1},
                {"guided_fraction": float("nan")}):
        with pytest.raises(UserError):
            Sampling(**bad)


def test_the_motion_grid_end_goes_with_the_default_motion_sampling():
    from synth4d.jobs.synthesize import DEFAULT_MOTION, Sampling
    assert DEFAULT_MOTION[4] == 20 and Sampling().motion_final_t == 20
    assert Sampling().chain_args()["motion_final_t"] == 20
    assert Sampling().describe() == ("static ddim 25 steps, guidance 2 on the first 12 steps; motion unipc 8 steps "
                                     "to t = 20, guidance 2 on the first 2 steps")
    assert Sampling(motion_guided_fraction=0.5).motion_final_t == 20               # the default's steps and sampler
    # other motion steps or samplers, or any static option given: the trailing grid (None), unless given
    for other in (Sampling(motion_steps=10), Sampling(motion_sampler="ddim"), Sampling(motion_sampler="dpmpp_2m"),
                  Sampling("ddim", 25), Sampling(steps=8)):
        assert other.motion_final_t is None and other.chain_args()["motion_final_t"] is None
    assert Sampling("ddim", 25).shared() and not Sampling("ddim", 25, motion_final_t=20).shared()
    assert Sampling(motion_steps=10, motion_final_t=0).motion_final_t == 0
    assert Sampling("ddim", 25, motion_final_t=975).motion_final_t == 975
    for bad in (976, -1):   # 25 steps need 25 distinct timesteps from 999 down
        with pytest.raises(UserError, match="final timestep"):
            Sampling("ddim", 25, motion_final_t=bad)


def test_the_motion_model_samples_on_the_asked_grid(tiny_weights, monkeypatch):
    import synth4d.nets.diffusion as diffusion
    from synth4d.jobs.synthesize import Sampling, load
    model = load(tiny_weights)
    grids = []
    for name, fn in list(diffusion.SAMPLERS.items()):
        monkeypatch.setitem(diffusion.SAMPLERS, name,
                            lambda *a, fn=fn, **k: grids.append(k.get("timesteps")) or fn(*a, **k))
    model.generate(dx="NOR", frames=5, sampling=Sampling(steps=3, keyframes=3, motion_steps=4, motion_final_t=40))
    assert grids[:2] == [None, [999, 679, 360, 40]]     # the static model's own grid untouched
    grids.clear()
    model.generate(dx="NOR", frames=5, sampling=Sampling(steps=3, keyframes=3, motion_steps=4))
    assert grids[:2] == [None, [999, 749, 499, 249]]    # the trailing grid


def test_es_phase_warps_the_motion_cycle(tiny_weights, monkeypatch):
    """An asked-for ES phase reaches the motion model as a warped cycle: the model's ES (the prior's anchor)
    at the asked phase, ED untouched; without an ES phase the phases are the plain ones."""
    from synth4d.cine.priors import warp_phases
    from synth4d.jobs.synthesize import Sampling, load
    model = load(tiny_weights)
    anchor = model.chain.priors["es_phase"]["anchor"]
    assert 0.2 < anchor < 0.5   # the tiny phantom's ES phases
    asked = []
    real = model.chain.sample_motion
    monkeypatch.setattr(model.chain, "sample_motion", lambda z, n, c, phases, *a: asked.append(list(phases)) or real(z, n, c, phases, *a))
    subject = model.generate(dx="NOR", frames=6, es_phase=0.5, sampling=Sampling(steps=2, keyframes=0))
    assert subject.values["es_phase"] == 0.5
    assert np.allclose(asked[-1], warp_phases([t / 6 for t in range(6)], 0.5, anchor)) and asked[-1][3] == pytest.approx(anchor)
    chain_values = dict(subject.values, es_phase=None)
    model.chain.generate(chain_values, chain_values["slices"], [t / 6 for t in range(6)], 0, steps=2)
    assert np.allclose(asked[-1], [t / 6 for t in range(6)])


def test_es_phase_in_requests_and_manifest(tiny_weights, tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("dx,es_phase\nNOR,0.45\nHCM,\n")
    result = run_cli("generate", "--weights", tiny_weights, "--conditions", table, "--steps", 2, "--frames", 5, "--json",
                     tmp_path / "gen")
    rows = [__import__("json").loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["es_phase"] == 0.45 and 0.2 < rows[1]["es_phase"] < 0.5   # given, then drawn from the prior
    with open(tmp_path / "gen" / "manifest.csv", newline="") as f:
        assert [float(r["es_phase"]) for r in csv.DictReader(f)] == [r["es_phase"] for r in rows]
    table.write_text("dx,es_phase\nNOR,0.9\n")
    proc = subprocess.run([sys.executable, "-m", "synth4d", "generate", "--weights", str(tiny_weights), "--conditions",
                           str(table), str(tmp_path / "bad")], capture_output=True, text=True)
    assert proc.returncode == 1 and "c.csv" in proc.stderr and "line 2" in proc.stderr and "es_phase" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_es_phase_refused_by_weights_without_its_prior(tiny_weights, tmp_path):
    old = tmp_path / "old"
    weights_without_es_prior(tiny_weights, old)
    run_cli("generate", "--weights", old, *FAST, tmp_path / "plain")          # weights from before the prior still generate
    with open(tmp_path / "plain" / "manifest.csv", newline="") as f:
        assert next(csv.DictReader(f))["es_phase"] == ""
    proc = subprocess.run([sys.executable, "-m", "synth4d", "generate", "--weights", str(old), "--es-phase", "0.4",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no ES phase prior" in proc.stderr and not (tmp_path / "o").exists()


def test_plausibility_wants_the_smallest_lv_in_systole():
    from synth4d.jobs.synthesize import plausible
    labels = np.zeros((24, 24, 4, 20), np.uint8)   # 20 frames; every structure on every slice
    labels[4:20, 4:20], labels[8:20, 8:20], labels[11:17, 11:17] = 1, 2, 3
    measured = {"lvedv": 100.0, "rvedv": 100.0, "lv_mass": 100.0, "lvef": 60.0}
    assert plausible(labels, measured, es=7) == ""
    assert plausible(labels, measured, es=11) == ""                                                # 0.55 of the cycle
    assert plausible(labels, measured, es=16) == "smallest LV at frame 16 of 20, not in systole"
    assert plausible(labels, measured, es=2) == "smallest LV at frame 2 of 20, not in systole"   # 0.10 of the cycle
    assert plausible(labels, measured) == ""                                                       # ES not known


def test_a_subject_off_its_diagnosis_is_drawn_again():
    """The generated masks must meet the criteria of the diagnosis they are labelled with (cine.diagnosis)
    whenever the drawn or asked values do; a request that rules them out itself is not held to them."""
    from synth4d.cine.measures import wall_thickness
    from synth4d.jobs.synthesize import off_diagnosis
    labels = np.zeros((40, 40, 4, 20), np.uint8)
    labels[4:36, 4:36], labels[8:32, 8:32], labels[14:26, 14:26] = 1, 2, 3    # LV wall 6 px (9 mm), 12.7 mm at corners
    spacing = (1.5, 1.5, 8.0)
    wall = wall_thickness(labels[..., 0], spacing)
    assert 9 <= wall < 15
    nor = {"dx": "NOR", "lvedv": 140.0, "rvedv": 150.0, "lvef": 62.0, "rvef": 55.0}
    good = {"lvedv": 135.0, "rvedv": 148.0, "lv_mass": 110.0, "lvef": 58.0, "rvef": 51.0}
    assert off_diagnosis(nor, labels, good, spacing) == ""
    why = off_diagnosis(nor, labels, {**good, "rvef": 34.6}, spacing)
    assert why == ("NOR criteria not met (LVEF >= 50, LVEDV 80-190 mL, RVEF >= 40, max LV wall < 15 mm): "
                   f"LVEF 58 %, LVEDV 135 mL, RVEF 35 %, max wall {wall:.1f} mm")
    thick = labels.copy()
    thick[14:26, 14:26] = 2
    thick[18:22, 18:22] = 3                                                     # LV wall 10 px = 15 mm: hypertrophied
    assert off_diagnosis(nor, thick, good, spacing).startswith("NOR criteria not met")
    hcm = {"dx": "HCM", "lvedv": 120.0, "rvedv": 130.0, "lvef": 70.0, "rvef": 60.0}
    assert off_diagnosis(hcm, thick, {**good, "lvef": 70.0}, spacing) == ""
    assert off_diagnosis(hcm, labels, {**good, "lvef": 70.0}, spacing).endswith(f"LVEF 70 %, max wall {wall:.1f} mm")
    asked_off = {**nor, "lvef": 40.0}                                           # --dx NOR --lvef 40: not normal
    assert off_diagnosis(asked_off, labels, {**good, "lvef": 41.0}, spacing) == ""
    assert off_diagnosis({**nor, "dx": None}, labels, {**good, "rvef": 20.0}, spacing) == ""


def test_the_diagnosis_check_draws_again_and_says_why(tiny_weights, monkeypatch):
    """Wired into generation: a miss draws again; MAX_ATTEMPTS misses keep the last draw, flagged with the reason."""
    from synth4d.jobs import synthesize
    model = synthesize.load(tiny_weights)
    sampling = synthesize.Sampling(steps=2, keyframes=3)
    monkeypatch.setattr(synthesize, "plausible", lambda *a, **k: "")           # only the diagnosis check decides
    verdicts = iter([False, True])
    monkeypatch.setattr(synthesize, "meets", lambda dx, m: next(verdicts))
    s = model.generate(dx="DCM", frames=4, sampling=sampling, seed=5)
    assert (s.attempts, s.plausible) == (2, "yes")
    monkeypatch.setattr(synthesize, "meets", lambda dx, m: False)
    s = model.generate(dx="DCM", frames=4, sampling=sampling, seed=5)
    assert s.attempts == synthesize.MAX_ATTEMPTS and s.plausible.startswith("DCM criteria not met (LVEF < 40")
    assert s.values["dx"] == "DCM"                                              # kept, and flagged as such
