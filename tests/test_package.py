"""The installed package: only synth4d names in site-packages, the console module and the Python API of the
README working from a folder that has its own train.py and nets.py (which would shadow generic package names)."""
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("synth4d.py", "__init__.py", "__main__.py", "pyproject.toml", "README.md", "cine", "nets", "train", "jobs",
           "weights")


def readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel `pip install .` would install, built from a copy of the sources and installed into a folder."""
    pytest.importorskip("setuptools", minversion="77")
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("synth4d-*.whl"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    user = tmp / "user"
    user.mkdir()
    for name in ("train.py", "nets.py", "cine.py", "weights.py"):
        (user / name).write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    return wheel, site, user


def test_only_synth4d_names_are_installed(installed):
    wheel, site, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"synth4d", wheel.name.split("-py")[0] + ".dist-info"}
    # pip --target puts the console script in bin/ beside the packages (in a virtual environment: its bin/).
    assert {p.name for p in site.iterdir()} == {"synth4d", wheel.name.split("-py")[0] + ".dist-info", "bin"}
    assert [p.name for p in (site / "bin").iterdir()] == ["synth4d"]
    for part in ("cine/nifti.py", "nets/unet.py", "train/ldm.py", "jobs/generate.py", "weights/checkpoint.py",
                 "weights/vae.safetensors", "weights/static.safetensors", "weights/motion.safetensors"):
        assert f"synth4d/{part}" in names
    assert not any(n.startswith(("synth4d/tests/", "synth4d/scripts/")) for n in names)


def run_installed(site: Path, user: Path, *args, **kw):
    """Run python in the user's folder with the installed package first on the path."""
    return subprocess.run([sys.executable, *args], cwd=user, env={"PYTHONPATH": str(site), "OMP_NUM_THREADS": "2",
                                                                  "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, **kw)


def test_python_m_synth4d_runs_the_cli(installed):
    _, site, user = installed
    done = run_installed(site, user, "-m", "synth4d", "--version")
    assert done.returncode == 0 and done.stdout.strip() == "synth4d, version 0.1.0", done.stderr
    done = run_installed(site, user, "-c", "import synth4d, synth4d.train.vae, synth4d.nets.unet; "
                                           "print(synth4d.__file__, synth4d.train.vae.__file__)")
    assert done.returncode == 0, done.stderr
    assert all(p.startswith(str(site / "synth4d")) for p in done.stdout.split())


def test_readme_python_api_from_a_folder_with_its_own_train_py(installed):
    _, site, user = installed
    done = run_installed(site, user, "-c", readme_python_block(), timeout=300)
    assert done.returncode == 0, done.stderr
    image, mask, spacing, lvedv = re.fullmatch(r"(\(.*?\)) (\(.*?\)) (\(.*?\)) (\S+)\n", done.stdout).groups()
    image, mask, spacing = eval(image), eval(mask), eval(spacing)
    grid = shipped_grid()
    n, mm = grid["size"], grid["spacing"]
    assert image == mask and len(image) == 4 and image[:2] == (n, n) and image[3] == 30 and 1 <= image[2] <= grid["slices"]
    assert spacing[:2] == (mm, mm) and 4 <= spacing[2] <= 12 and 50 < float(lvedv) < 400


def shipped_grid() -> dict:
    """The grid the shipped VAE records in its metadata: generated subjects come out on it."""
    from safetensors import safe_open
    with safe_open(str(ROOT / "weights" / "vae.safetensors"), "np") as f:
        return json.loads(f.metadata()["grid"])
