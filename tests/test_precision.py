"""--precision: which arithmetic the networks use, and that bf16 generates what fp32 does, within bf16's rounding."""
import csv

import numpy as np
import pytest
from click.testing import CliRunner

from synth4d import cli
from synth4d.cine import UserError, nifti
from synth4d.nets import device
from tests.conftest import run_cli

FAST = ["--frames", "5", "--steps", "3", "--n", "2", "--dx", "HCM", "--seed", "4"]


@pytest.fixture
def restore_precision():
    yield
    device.set_precision("auto")


def test_precision_rules(monkeypatch, restore_precision):
    with pytest.raises(UserError, match="fp64"):
        device.set_precision("fp64")
    for native in (False, True):
        monkeypatch.setattr(device, "native_bf16_cpu", lambda: native)
        device.set_precision("auto")
        assert device.uses_bf16("cpu") is native and device.uses_bf16("cuda") and not device.uses_bf16("mps")
        device.set_precision("fp32")
        assert not device.uses_bf16("cpu") and not device.uses_bf16("cuda")
        device.set_precision("bf16")
        assert device.uses_bf16("cpu") and device.uses_bf16("cuda") and not device.uses_bf16("mps")


def test_cpu_flags_are_read(monkeypatch, tmp_path):
    text = tmp_path / "cpuinfo"
    text.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(text if path == "/proc/cpuinfo" else path, *a, **k))
    device.native_bf16_cpu.cache_clear()
    try:
        assert device.native_bf16_cpu()
        text.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
        device.native_bf16_cpu.cache_clear()
        assert not device.native_bf16_cpu()
    finally:
        monkeypatch.undo()
        device.native_bf16_cpu.cache_clear()


def test_bf16_generates_what_fp32_does(tiny_weights, tmp_path, restore_precision):
    out = {}
    for p in ("fp32", "bf16"):
        run_cli("generate", "--weights", tiny_weights, *FAST, "--precision", p, tmp_path / p)
        with open(tmp_path / p / "manifest.csv") as f:
            assert [r["precision"] for r in csv.DictReader(f)] == [p, p]
        out[p] = [nifti.read(tmp_path / p / f"synth_000{i}.nii.gz", ndim=4)[0] for i in range(2)]
        out[p + "_mask"] = [nifti.read(tmp_path / p / f"synth_000{i}_mask.nii.gz", ndim=4, kind="mask")[0]
                            for i in range(2)]
    for a, b, ma, mb in zip(out["fp32"], out["bf16"], out["fp32_mask"], out["bf16_mask"]):
        assert a.shape == b.shape and not np.array_equal(a, b)   # the arithmetic did change
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
        assert (ma == mb).mean() > 0.9


def test_unknown_precision_is_refused(tiny_weights, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--precision", "fp64",
                                      str(tmp_path / "x")])
    assert result.exit_code == 2 and "fp64" in result.output and not (tmp_path / "x").exists()


def test_freed_memory_is_kept_on_glibc():
    import platform
    import torch
    from synth4d.nets.memory import keep_freed_memory
    kept = keep_freed_memory()
    assert kept == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert keep_freed_memory() is kept          # once per process
    x = torch.ones(16 << 20)                    # 64 MB: from the heap now, and still correct
    assert float(x.sum()) == 16 << 20
