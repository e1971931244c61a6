"""Fixed-seed outputs of `phantom`, `generate`, `segment` and `eval` match the files recorded in
golden_outputs.json: NIfTI files byte for byte, or else in their header exactly and their voxels'
slice statistics and label counts within a tolerance (nifti_record); text files (.txt, .jsonl, .json,
.csv) in their words, integers and layout exactly and in their decimal numbers to a relative 1e-4.

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
and every NIfTI file kept its digest. Rounding was not enough: on the CI's CPU eval.json still
differed (the Frechet distances of rank-deficient covariances, from an encoder whose convolutions
take other kernels there, moved past a rounding boundary), so text files are now recorded as their
skeleton (every decimal number replaced by "#") and the list of their numbers, compared within
NUMBERS_RTOL; every file kept its content. It was made again when the shipped weights became round 5's
(the 1.5 mm grid; weights/README.md): every generated and segmented file changed, the phantom's files
kept their digests, and NIfTI files gained the tolerant comparison, since a new network may meet
other convolution kernels on another CPU. And once more when the manifest and sidecars gained the
motion model's own sampler and steps ("motion_sampler", "motion_steps"): only manifest.csv,
generate.jsonl and the sidecars changed (the commands give --steps, which sets both models' steps).
And once more when the shipped static and motion weights became round 6's (the VAE kept its file):
the generated files (gen/ and acdc/, with their manifests and sidecars), generate.jsonl and eval.json
changed; the phantom's files and segment's kept their digests. And once more when eval's coherence
figures gained the ES phase's robust spread ("es_phase_mad_sd", "es_phase_far"): only eval.json changed.
And once more when the shipped static checkpoint gained the ES phase prior (its metadata only), generation
began to warp the motion cycle onto a drawn ES phase, the manifest and sidecars gained "es_phase" and the
plausibility check began to want the smallest LV in systole: the generated files (gen/ and acdc/, with
their manifests and sidecars), generate.jsonl and eval.json changed; the phantom's files and segment's
kept their digests. And once more when the manifest and sidecars gained the guided fractions of the steps
("guided_fraction", "motion_guided_fraction"): only manifest.csv, generate.jsonl and the sidecars changed
(the commands give --steps, which guides every step). And once more when the shipped VAE's image decoder
was fine-tuned with an SSIM term (encoder and mask decoder unchanged): the generated images (gen/ and acdc/),
the manifests, sidecars and generate.jsonl (the weights' identity) and eval.json changed; every mask, the
phantom's files and segment's kept their records. And once more when eval's coherence and reconstruction
figures gained the ED-ES change ("ed_es_change"): only eval.json changed (generation's diagnosis check, added
just before, changed no recorded file: every generated subject met its group's criteria at the first draw).
And once more when the manifest and sidecars gained the motion model's final timestep ("motion_final_t", empty
or null for the trailing grid the commands use): only manifest.csv, generate.jsonl and the sidecars changed, their
numbers and every NIfTI file kept their records.
Every command runs in a fresh process on one thread: with two threads, float sums in
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
TEXT = (".txt", ".jsonl", ".json", ".csv")
NUMBERS_RTOL, NUMBERS_ATOL = 1e-4, 1e-9
LABEL_FLIPS = 1e-3   # share of a frame's voxels whose label may differ in a mask that does not match exactly


def text_record(data: bytes) -> dict:
    """A text output as {"skeleton": sha256 of the text with every decimal number replaced by "#",
    "numbers": those numbers}. The values drawn from the priors (numpy's eigh and inv) and the Frechet
    distances differ in their last bits between CPUs whose BLAS and convolution kernels order sums
    differently; the numbers are compared within a tolerance, everything else exactly."""
    numbers = [float(m.group()) for m in FLOAT.finditer(data)]
    return {"skeleton": hashlib.sha256(FLOAT.sub(b"#", data)).hexdigest(), "numbers": numbers}


def nifti_record(path: Path) -> dict:
    """A NIfTI output as {"sha256": of the file, "header": sha256 of its header block (shape, voxel
    type, spacing, affines, description, intent), "numbers": per 2D slice of every frame its mean and
    standard deviation, or for a uint8 mask the count of each label per frame}. A file that matches
    byte for byte is equal; one that does not must have the same header, slice statistics within
    NUMBERS_RTOL and label counts within LABEL_FLIPS of the frame: a generated frame whose voxels
    differ in their last bits (convolution kernels that sum in another order on another CPU) then
    passes, a change of the anatomy, intensities or geometry fails."""
    import nibabel as nib
    import numpy as np
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    frames = data.reshape(data.shape[:3] + (-1,))                      # (X, Y, Z, T)
    if data.dtype == np.uint8:
        numbers = [int(n) for t in range(frames.shape[3]) for n in np.bincount(frames[..., t].ravel(), minlength=4)]
        kind = "labels"
    else:
        slices = frames.astype(np.float64).reshape(-1, frames.shape[2] * frames.shape[3])
        numbers = [float(v) for v in np.concatenate([slices.mean(0), slices.std(0)])]
        kind = "slices"
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "header": hashlib.sha256(img.header.binaryblock).hexdigest(), kind: numbers}


def _nifti_differs(a: dict, b: dict) -> str | None:
    import numpy as np
    if a["sha256"] == b["sha256"]:
        return None
    if a["header"] != b["header"] or a.keys() != b.keys():
        return "header differs"
    if "labels" in a:
        x, y = np.asarray(a["labels"]), np.asarray(b["labels"])
        if x.shape != y.shape:
            return "label counts differ"
        frame = x.reshape(-1, 4).sum(1).max() if x.size % 4 == 0 else x.sum()
        worst = np.abs(x - y).max() if x.size else 0
        return None if worst <= LABEL_FLIPS * frame else f"a label count differs by {worst} voxels"
    x, y = np.asarray(a["slices"]), np.asarray(b["slices"])
    if x.shape != y.shape or not np.allclose(x, y, rtol=NUMBERS_RTOL, atol=NUMBERS_ATOL):
        return "voxel statistics differ"
    return None


def differences(got: dict, want: dict) -> list[str]:
    """The files of got that do not match want (digests exactly, text records as text_record says)."""
    import numpy as np
    out = [f"{name}: {'missing' if name not in got else 'not recorded'}" for name in sorted(set(got) ^ set(want))]
    for name in sorted(set(got) & set(want)):
        a, b = got[name], want[name]
        if isinstance(b, str) or isinstance(a, str):
            if a != b:
                out.append(f"{name}: digest {a} != {b}")
        elif "sha256" in a or "sha256" in b:
            why = _nifti_differs(a, b) if "sha256" in a and "sha256" in b else "recorded as another kind"
            if why:
                out.append(f"{name}: {why}")
        elif a["skeleton"] != b["skeleton"] or len(a["numbers"]) != len(b["numbers"]):
            out.append(f"{name}: text differs beyond its decimal numbers")
        elif not np.allclose(a["numbers"], b["numbers"], rtol=NUMBERS_RTOL, atol=NUMBERS_ATOL):
            bad = [(x, y) for x, y in zip(a["numbers"], b["numbers"])
                   if not np.isclose(x, y, rtol=NUMBERS_RTOL, atol=NUMBERS_ATOL)]
            out.append(f"{name}: {len(bad)} numbers differ, first {bad[0][0]!r} != {bad[0][1]!r}")
    return out


def run_all(folder: Path) -> dict:
    """Run COMMANDS in folder, one thread each -> {relative path: sha256, or text_record for text} of
    every file written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for args, stdout_name in COMMANDS:
        with open(folder / stdout_name, "wb") as out:
            subprocess.run([sys.executable, "-m", "synth4d", *args], cwd=folder, env=env, stdout=out,
                           stderr=subprocess.DEVNULL, check=True)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        data, name = path.read_bytes(), path.relative_to(folder).as_posix()
        if path.suffix in TEXT:
            digests[name] = text_record(data.replace(str(WEIGHTS).encode(), b"<weights>"))
        elif path.name.endswith((".nii.gz", ".nii")):
            digests[name] = nifti_record(path)
        else:
            digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def test_outputs_unchanged(tmp_path):
    record = json.loads(GOLDEN.read_text())
    if record["versions"] != versions():
        pytest.skip(f"outputs recorded with {record['versions']}, this environment has {versions()}")
    assert differences(run_all(tmp_path), record["files"]) == []


def test_comparison_catches_changes():
    """The comparison itself: last-bit noise passes, a changed number, word or file fails."""
    a = {"x.nii.gz": "ab", "e.json": text_record(b'{"fvd": 16.947488557187643, "n": 2}')}
    noisy = {"x.nii.gz": "ab", "e.json": text_record(b'{"fvd": 16.947488557187650, "n": 2}')}
    assert differences(noisy, a) == []
    for changed in (b'{"fvd": 16.95, "n": 2}', b'{"fvd": 16.947488557187643, "n": 3}',
                    b'{"fid": 16.947488557187643, "n": 2}'):
        assert len(differences({**a, "e.json": text_record(changed)}, a)) == 1
    assert differences({**a, "x.nii.gz": "ac"}, a) == ["x.nii.gz: digest ac != ab"]
    assert differences({"x.nii.gz": "ab"}, a) == ["e.json: missing"]


def test_nifti_comparison(tmp_path):
    """A NIfTI file: last-bit noise in the voxels and a label flipped in one voxel of 8192 pass (though
    the bytes differ); changed intensities, changed labels and another affine fail."""
    import nibabel as nib
    import numpy as np
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (16, 16, 3, 4)).astype(np.float32)
    mask = np.zeros((64, 64, 2, 2), np.uint8)
    mask[10:40, 10:40] = 3
    mask[20:30, 20:30] = 2

    def record(array, affine=np.eye(4)):
        path = tmp_path / "x.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), path)
        return {"x.nii.gz": nifti_record(path)}
    flipped = mask.copy()
    flipped[10, 10, 0, 0] = 2
    for want, noisy, changed in ((image, np.nextafter(image, np.inf), image * 1.01),
                                 (mask, flipped, np.where(mask == 2, 3, mask).astype(np.uint8))):
        base = record(want)
        assert record(noisy)["x.nii.gz"]["sha256"] != base["x.nii.gz"]["sha256"]
        assert differences(record(noisy), base) == []
        assert len(differences(record(changed), base)) == 1
        assert len(differences(record(want, np.diag([2.0, 1, 1, 1])), base)) == 1
    assert len(differences({"x.nii.gz": "ab"}, record(image))) == 1    # a record of another kind

if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        files = run_all(Path(tmp))
    GOLDEN.write_text(json.dumps({"versions": versions(), "files": files}, indent=1) + "\n")
    print(f"{len(files)} files recorded in {GOLDEN}")
