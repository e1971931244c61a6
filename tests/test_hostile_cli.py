"""Hostile input files through every command that reads them, the way a user meets them: exit status 1,
one line on stderr (progress-bar redraws aside) naming the file, no traceback, nothing left in the output."""
import re
import sys

import numpy as np
import pytest

from synth4d import main
from synth4d.cine import nifti
from tests.test_hostile_nifti import raw

CASES = {  # a 4D cine file that is hostile in one way, and what the error line says
    "claims 400 MB, holds 64 bytes": (lambda p: raw(p, (500, 500, 10, 40), payload=64), "more than the file holds"),
    "RGB voxels": (lambda p: raw(p, dtype=np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])), "voxel type"),
    "spacing 0 mm": (lambda p: raw(p, pixdim=(1.5, 1.5, 0.0, 30.0)), "voxel spacing"),
    "NaN affine": (lambda p: raw(p, srows=np.full((3, 4), np.nan)), "affine"),
    "NaN intensities": (lambda p: nifti.write(p, np.full((8, 8, 3, 4), np.nan, np.float32),
                                              nifti.Geometry.from_spacing((1.5, 1.5, 8.0), 30.0)), "NaN or infinite"),
}
COMMANDS = {  # command line with DATA (a folder holding the file), FILE (the file) and OUT (where output would go)
    "info": ["info", "DATA"],
    "train-vae": ["train-vae", "DATA", "--preset", "tiny", "--steps", "1", "--out", "OUT", "--cache", "CACHE"],
    "segment": ["segment", "FILE", "OUT/mask.nii.gz"],
    "eval": ["eval", "DATA", "--recon"],
}


def run_main(argv, capsys):
    old = sys.argv
    sys.argv = ["synth4d", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, [s for s in re.split(r"[\r\n]", err) if s.strip() and not re.search(r"\d+%\|", s)]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_through_the_cli(tmp_path, capsys, case, command):
    make, why = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    path = data / "case1.nii.gz"
    make(path)
    nifti.write(data / "case2.nii.gz", np.zeros((8, 8, 3, 4), np.float32), nifti.Geometry.from_spacing((1.5, 1.5, 8.0), 30.0))
    subs = {"DATA": str(data), "FILE": str(path), "OUT": str(tmp_path / "out"), "CACHE": str(tmp_path / "cache")}
    argv = [re.sub("|".join(subs), lambda m: subs[m.group()], a) for a in COMMANDS[command]]
    code, out, err = run_main(argv, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("synth4d: error: "), (code, err)
    assert str(path) in err[0] and re.search(why, err[0]), err[0]
    assert out == "" and not (tmp_path / "out").exists()
