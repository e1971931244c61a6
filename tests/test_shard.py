"""generate --shard K/N and synth4d merge: shards merged are the files and manifest of one run."""
import csv

import pytest
from click.testing import CliRunner

from synth4d import cli
from synth4d.jobs.generate import shard_range
from tests.conftest import run_cli

FAST = ["--frames", "4", "--steps", "2", "--seed", "5"]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def _rows(folder):
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_shards_merged_equal_one_run(tiny_weights, tmp_path):
    common = ["--weights", tiny_weights, "--n", 5, *FAST]
    run_cli("generate", *common, tmp_path / "one")
    for k in (1, 2, 3):
        run_cli("generate", *common, "--shard", f"{k}/3", tmp_path / f"part{k}")
    assert sorted(_files(tmp_path / "part2")) == ["manifest.csv", "synth_0001.json", "synth_0001.nii.gz",
                                                  "synth_0001_mask.nii.gz", "synth_0002.json", "synth_0002.nii.gz",
                                                  "synth_0002_mask.nii.gz"]
    out = run_cli("merge", tmp_path / "all", *(tmp_path / f"part{k}" for k in (1, 2, 3))).stdout
    assert out.startswith("5 subjects")
    one, merged = _files(tmp_path / "one"), _files(tmp_path / "all")
    assert one.keys() == merged.keys()
    assert all(one[k] == merged[k] for k in one if k != "manifest.csv")          # byte-identical subjects
    assert _rows(tmp_path / "one") == _rows(tmp_path / "all")
    run_cli("merge", tmp_path / "all", tmp_path / "part1")                       # merging again changes nothing
    assert _files(tmp_path / "all") == merged


def test_shard_ranges_and_refusals(tiny_weights, tmp_path, monkeypatch):
    assert [shard_range(f"{k}/3", 10) for k in (1, 2, 3)] == [(0, 3), (3, 6), (6, 10)]
    assert shard_range(None, 7) == (0, 7)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert shard_range(None, 7) == (3, 7)                                         # torchrun: rank 1 of 2
    monkeypatch.delenv("WORLD_SIZE")
    for bad in ("0/2", "3/2", "a/b", "2"):
        result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--n", "4", "--shard", bad,
                                          str(tmp_path / "x")])
        assert result.exit_code != 0 and "--shard" in str(result.exception), bad
    result = CliRunner().invoke(cli, ["generate", "--weights", str(tiny_weights), "--n", "2", "--shard", "1/3",
                                      str(tmp_path / "x")])
    assert result.exit_code != 0 and "empty" in str(result.exception)


def test_merge_refuses_shards_of_different_runs(tiny_weights, tmp_path):
    run_cli("generate", "--weights", tiny_weights, "--n", 1, *FAST, tmp_path / "a")
    run_cli("generate", "--weights", tiny_weights, "--n", 1, "--frames", 4, "--steps", 2, "--seed", 6, tmp_path / "b")
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code != 0 and "different requests" in str(result.exception)
    assert not (tmp_path / "m").exists()
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "m"), str(tmp_path / "empty")])
    assert result.exit_code != 0 and "no manifest.csv" in str(result.exception)


@pytest.mark.parametrize("layout", ["acdc"])
def test_shards_in_acdc_layout(tiny_weights, tmp_path, layout):
    common = ["--weights", tiny_weights, "--n", 2, "--layout", layout, *FAST]
    run_cli("generate", *common, tmp_path / "one")
    run_cli("generate", *common, "--shard", "2/2", tmp_path / "p2")
    run_cli("generate", *common, "--shard", "1/2", tmp_path / "p1")
    run_cli("merge", tmp_path / "all", tmp_path / "p1", tmp_path / "p2")
    one, merged = _files(tmp_path / "one"), _files(tmp_path / "all")
    assert one.keys() == merged.keys() and all(one[k] == merged[k] for k in one if k != "manifest.csv")
