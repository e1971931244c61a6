"""Fixed-seed outputs of `phantom`, `generate`, `segment` and `eval` match, byte for byte, the files
recorded in golden_outputs.json.

The record was made with the code of commit 5a66601 (before the package was reorganised under the
`synth4d` namespace) and the shipped weights of that commit, by `python tests/test_unchanged.py
--record`, and matched by the reorganised code. It was made again when the manifest gained its
"sampler" column, and again for its "weights" and "request" columns (each time manifest.csv and
generate.jsonl changed and every other file kept its digest). It was made once more when outputs
gained provenance (the header description "synth4d <version> synthetic", the label-map intent on
every mask, the JSON sidecar and the manifest's "labels" column): every NIfTI file then changed its
header only; voxel data and affines were compared against the previous code and were identical.
And once more when generated subjects gained their short-axis-like default orientation (cine.grid):
the generated NIfTI files changed their affine only (voxel data and spacing compared: identical);
every other file kept its digest. And once more when the phantom gained trabeculae, a moderator band,
a thicker RV free wall and looser clinical draws: the phantom's files and what is computed from them
(segment.jsonl, seg.nii.gz, eval.json) changed; every generated file kept its digest. And once more
when text outputs began to be compared with their decimals rounded to 6 significant digits (on
another CPU the JSON files differed in the last bits of values drawn through numpy's linear algebra)
and the manifest and sidecars gained the "precision" of the networks' arithmetic: the commands pass
`--precision fp32` (bf16, the default on CPUs with native bf16, changes the last bits of voxel data),
and every NIfTI file kept its digest. Every command runs in a fresh process on one thread: with two threads, float sums in
the convolutions are ordered differently and generated intensities differ in the last bits. Text
outputs name files relative to the working folder; the shipped weights' folder, which differs
between checkouts, is replaced by <weights>. A record made with other torch / numpy / nibabel
versions is not compared (the test is skipped and says why).
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden_outputs.json")
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
COMMANDS = (  # (arguments, file that receives stdout)
    (["phantom", "real", "--n", "2", "--seed", "5"], "phantom.txt"),
    (["generate", "gen", "--dx", "HCM", "--n", "2", "--frames", "5", "--steps", "3", "--keyframes", "3",
      "--seed", "7", "--json", "--precision", "fp32"], "generate.jsonl"),
    (["generate", "acdc", "--lvedv", "150", "--lvef", "55", "--n", "1", "--frames", "4", "--steps", "2",
      "--keyframes", "0", "--layout", "acdc", "--seed", "3", "--precision", "fp32"], "generate_acdc.txt"),
    (["segment", "real/patient001/patient001_4d.nii.gz", "seg.nii.gz", "--json", "--precision", "fp32"], "segment.jsonl"),
    (["eval", "real", "gen", "--json", "--precision", "fp32"], "eval.json"),
)


def versions() -> dict:
    import nibabel
    import numpy
    import torch
    return {"torch": torch.__version__, "numpy": numpy.__version__, "nibabel": nibabel.__version__}


FLOAT = re.compile(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def canonical_text(data: bytes) -> bytes:
    """Text with every decimal number rounded to 6 significant digits. The values drawn from the priors
    (numpy's eigh and inv) and the Frechet distances (eigh) differ in their last bits between CPUs whose
    BLAS kernels order sums differently; printed in full, those bits would make the digests machine-bound."""
    return FLOAT.sub(lambda m: b"%.6g" % float(m.group()), data)


def run_all(folder: Path) -> dict:
    """Run COMMANDS in folder, one thread each -> {relative path: sha256} of every file written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for args, stdout_name in COMMANDS:
        with open(folder / stdout_name, "wb") as out:
            subprocess.run([sys.executable, "-m", "synth4d", *args], cwd=folder, env=env, stdout=out,
                           stderr=subprocess.DEVNULL, check=True)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        data = path.read_bytes()
        if path.suffix in (".txt", ".jsonl", ".json", ".csv"):
            data = canonical_text(data.replace(str(WEIGHTS).encode(), b"<weights>"))
        digests[path.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return digests


def test_outputs_unchanged(tmp_path):
    record = json.loads(GOLDEN.read_text())
    if record["versions"] != versions():
        pytest.skip(f"outputs recorded with {record['versions']}, this environment has {versions()}")
    assert run_all(tmp_path) == record["files"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        files = run_all(Path(tmp))
    GOLDEN.write_text(json.dumps({"versions": versions(), "files": files}, indent=1) + "\n")
    print(f"{len(files)} files recorded in {GOLDEN}")
