"""Output grids of generated subjects (cine.grid, generate --like / --size / --spacing): geometry copied
from a reference, volumes kept through the resampling, masks without holes, reruns that compare the grid."""
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from synth4d import cli
from synth4d.cine import nifti
from synth4d.cine.datasets import scan
from synth4d.cine.grid import OutputGrid, explicit, place, short_axis_rotation
from synth4d.cine.measures import volumes
from synth4d.cine.metrics import components_per_slice
from synth4d.cine.phantom import write_phantom
from tests.conftest import run_cli

FAST = ["--frames", "4", "--steps", "2"]


@pytest.fixture(scope="module")
def model_like(tmp_path_factory):
    """A phantom subject on a 96 matrix (about 2.2 mm, the first cpu grid's spacing), standing in for a generated one."""
    root = tmp_path_factory.mktemp("fine")
    list(write_phantom(root, n=1, seed=3, frames=4, matrix=96, progress=False))
    return scan(root).refs[0].load()


@pytest.mark.parametrize("spacing", [(1.1, 1.1), (1.37, 1.6), (2.6, 2.6), "same"])
def test_volumes_within_4_percent_and_no_holes(model_like, spacing):
    s = model_like
    spacing = tuple(s.spacing[:2]) if spacing == "same" else spacing
    mask = s.full_mask[..., :2]                                         # two frames (X, Y, Z, 2)
    image = s.image[..., :2] / s.image.max() * 2 - 1
    size = tuple(int(np.ceil(n * s.spacing[0] / sp)) + 3 for n, sp in zip(mask.shape[:2], spacing))  # holds the FOV
    out_image, out_mask, affine = place(image, mask, s.spacing, explicit(size=size, spacing=spacing), bg=-1.0)
    assert out_image.shape == size + image.shape[2:] and out_mask.shape == out_image.shape
    zooms = (*spacing, s.spacing[2])
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), zooms)
    for t in range(2):
        before, after = volumes(mask[..., t], s.spacing), volumes(out_mask[..., t], zooms)
        for k in ("lv", "rv", "myo"):
            assert after[k] == pytest.approx(before[k], rel=0.04), (k, spacing)   # 3.3 % here: ES LV at 2.6 mm
        finer = max(spacing) <= min(s.spacing[:2]) + 1e-6
        for label in (1, 2, 3) if finer else (3,):   # onto a finer grid no structure splits or merges; onto
            a, b = components_per_slice(mask[..., t], label), components_per_slice(out_mask[..., t], label)
            assert np.array_equal(b, a), label       # a coarser one, thin RV and MYO parts may (the LV may not)
    assert out_image.min() >= -1.0001 and (out_mask[0] == 0).all()


def test_default_orientation_is_short_axis_and_centred():
    r = short_axis_rotation()
    assert np.allclose(r.T @ r, np.eye(3)) and np.linalg.det(r) > 0
    image, mask = np.zeros((16, 16, 5, 2), np.float32), np.zeros((16, 16, 5, 2), np.uint8)
    out, _, affine = place(image, mask, (2.0, 2.0, 8.0), OutputGrid(), bg=-1.0)
    assert out.shape == image.shape
    assert np.allclose(affine[:3, :3] @ np.array([7.5, 7.5, 2.0]) + affine[:3, 3], 0)   # centre at the origin
    assert nib.aff2axcodes(affine) != ("R", "A", "S")                   # oblique, like a real short-axis stack


def test_generate_like_copies_the_reference_grid(tiny_weights, tiny_phantom, tmp_path):
    ref = tiny_phantom / "patient001" / "patient001_4d.nii.gz"
    shape, ref_affine = nifti.peek(ref)
    out = tmp_path / "like"
    run_cli("generate", "--weights", tiny_weights, "--n", 1, "--like", ref, *FAST, out)
    img = nib.load(out / "synth_0000.nii.gz")
    msk, _ = nifti.read(out / "synth_0000_mask.nii.gz", ndim=4, kind="mask")
    assert img.shape[:2] == shape[:2] and msk.shape == img.shape
    n = img.shape[2]                                                      # the model's slices, at most the reference's
    assert n <= shape[2] and np.allclose(img.affine[:3, :3], ref_affine[:3, :3], atol=1e-4)
    centre = lambda a, s: a[:3, :3] @ ((np.asarray(s[:3]) - 1) / 2) + a[:3, 3]   # noqa: E731
    if n == shape[2]:
        assert np.allclose(img.affine, ref_affine, atol=1e-3)
    assert np.allclose(centre(img.affine, img.shape), centre(ref_affine, shape), atol=1e-3)   # the same FOV centre
    # A rerun asking for another grid is refused; --size and --spacing set a grid explicitly.
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--n", "1", "--size", "40", "40",
                                      *map(str, FAST), str(out)])
    assert result.exit_code != 0 and "another request" in str(result.exception)
    run_cli("generate", "--weights", tiny_weights, "--n", 1, "--size", 40, 32, "--spacing", 2.5, 2.0, 9.0, *FAST,
            tmp_path / "explicit")
    img = nib.load(tmp_path / "explicit" / "synth_0000.nii.gz")
    assert img.shape[:2] == (40, 32) and np.allclose(img.header.get_zooms()[:3], (2.5, 2.0, 9.0), atol=1e-3)
