"""`synth4d export-nnunet`: the nnU-Net v2 raw layout, case names, label names and the folds that keep
synthetic cases out of validation."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from synth4d import cli
from synth4d.cine import nifti
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def synthetic(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "gen"
    run_cli("generate", "--weights", tiny_weights, "--n", 3, "--frames", 4, "--steps", 2, out)
    return out


def _export(*args):
    return run_cli("export-nnunet", *args).stdout.strip()


def test_layout_labels_and_folds(tiny_phantom, synthetic, tmp_path):
    folder = tmp_path / _export(tiny_phantom, synthetic, tmp_path, "--id", 7, "--name", "Mixed").split("/")[-1]
    assert folder.name == "Dataset007_Mixed"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "cineMRI"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
    images = sorted(p.name[:-len("_0000.nii.gz")] for p in (folder / "imagesTr").iterdir())
    labels = sorted(p.name[:-len(".nii.gz")] for p in (folder / "labelsTr").iterdir())
    with open(synthetic / "manifest.csv") as f:   # ED and ES each (one case where ES is frame 0 too)
        n_syn = sum(1 if row["es"] == "0" else 2 for row in __import__("csv").DictReader(f))
    assert images == labels and dataset["numTraining"] == len(images) == 6 * 2 + n_syn
    real = [c for c in images if c.startswith(tiny_phantom.name.replace("_", ""))]
    syn = [c for c in images if c.startswith("gen_")]
    assert len(real) == 12 and len(syn) == n_syn and "gen_synth_0000_ed" in syn
    for case in (real[0], syn[0]):   # a 3D frame and its mask on the same grid, labels 0-3
        image, geom = nifti.read(folder / "imagesTr" / f"{case}_0000.nii.gz", ndim=3)
        mask, mgeom = nifti.read(folder / "labelsTr" / f"{case}.nii.gz", ndim=3, kind="mask")
        assert image.shape == mask.shape and geom == mgeom and set(np.unique(mask)) <= {0, 1, 2, 3}
        assert mask.any()
    folds = json.loads((folder / "splits_final.json").read_text())
    assert len(folds) == 5
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(real)                     # every real case validates exactly once
    for f in folds:
        assert set(syn) <= set(f["train"]) and not set(f["val"]) & set(f["train"])
        subjects = {c.rsplit("_", 1)[0] for c in f["val"]}
        assert not subjects & {c.rsplit("_", 1)[0] for c in f["train"]}   # a subject's frames stay together


def test_ratio_and_all_frames(tiny_phantom, synthetic, tmp_path):
    folder = tmp_path / "Dataset008_Few"
    _export(tiny_phantom, synthetic, tmp_path, "--id", 8, "--name", "Few", "--ratio", 0.25)
    syn = [p for p in (folder / "labelsTr").iterdir() if p.name.startswith("gen_")]
    assert 2 <= len(syn) <= 3                               # at most 0.25 x 12 real cases, whole subjects
    _export(tiny_phantom, synthetic, tmp_path, "--id", 8, "--name", "Few", "--frames", "all", "--overwrite")
    syn = sorted(p.name for p in (folder / "labelsTr").iterdir() if p.name.startswith("gen_"))
    assert len(syn) == 3 * 4                                # every frame of 3 subjects of 4 frames
    first = [n for n in syn if n.startswith("gen_synth_0000_")]
    tags = sorted(n[len("gen_synth_0000_"):-len(".nii.gz")] for n in first)
    # ED and ES by name (as the sidecar records them), the other frames by number
    side = json.loads((synthetic / "synth_0000.json").read_text())
    named = {side["es"]: "es", side["ed"]: "ed"}                # ED wins where ES falls on it
    assert tags == sorted(named.get(t, f"f{t:02d}") for t in range(4)), (tags, side["ed"], side["es"])


@pytest.mark.parametrize("argv, expect", [
    (["--id", "1000", "--name", "X"], "1 to 999"),
    (["--id", "9", "--name", "a b"], "--name"),
])
def test_bad_options_one_line(tiny_phantom, tmp_path, argv, expect):
    result = CliRunner().invoke(cli, ["export-nnunet", str(tiny_phantom), str(tmp_path), *argv])
    assert result.exit_code != 0 and expect in str(result.exception) and not list(tmp_path.iterdir())


def test_refuses_existing_folder_and_too_few_real_subjects(tiny_phantom, synthetic, tmp_path):
    _export(tiny_phantom, tmp_path, "--id", 9, "--name", "A")
    result = CliRunner().invoke(cli, ["export-nnunet", str(tiny_phantom), str(tmp_path), "--id", "9", "--name", "A"])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)
    result = CliRunner().invoke(cli, ["export-nnunet", str(tiny_phantom), str(tmp_path), "--id", "9", "--name", "B"])
    assert result.exit_code != 0 and "already uses id 9" in str(result.exception)
    result = CliRunner().invoke(cli, ["export-nnunet", str(synthetic), str(tmp_path / "o"), "--id", "3", "--name", "S"])
    assert result.exit_code != 0 and "real labelled subject" in str(result.exception)
