"""`synth4d merge OUT SHARDS...`: the folders that `generate --shard` jobs wrote, as one data set.

Each shard's subjects (the files its manifest lists) are linked into OUT (hard links where the file
system allows, copies otherwise) and its rows join OUT's manifest, so OUT is what one run would have
written. Refused, before anything is written: a shard without a manifest, two shards holding the same
subject from different requests, shards made with different weights, a file OUT already holds with
other content.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from synth4d.cine import UserError, atomic_write
from synth4d.jobs.generate import _read_manifest, _write_manifest


def merge(out, shards) -> list:
    """Merge `shards` (folders) into `out`; returns the merged subject ids."""
    out = Path(out)
    rows, source = {}, {}
    for shard in map(Path, shards):
        manifest = _read_manifest(shard / "manifest.csv")
        if not manifest:
            raise UserError(f"{shard} has no manifest.csv: not a folder `synth4d generate` wrote")
        for sid, row in manifest.items():
            if sid in rows and rows[sid].get("request") != row.get("request"):
                raise UserError(f"{sid} is in {source[sid]} and {shard} from different requests; merge shards of one run")
            rows[sid], source[sid] = row, shard
    weights = {row.get("weights", "") for row in rows.values()}
    if len(weights) > 1:
        raise UserError(f"the shards were made with {len(weights)} different weights; merge shards of one run")
    existing = _read_manifest(out / "manifest.csv")
    plan = []
    for sid, row in sorted(rows.items()):
        if sid in existing and existing[sid].get("request") != row.get("request"):
            raise UserError(f"{out} already holds {sid} from another request")
        for rel in row["files"].split(";"):
            src, dst = source[sid] / rel, out / rel
            if not src.is_file():
                raise UserError(f"{src} is listed in {source[sid] / 'manifest.csv'} but missing")
            if dst.exists() and dst.read_bytes() != src.read_bytes():
                raise UserError(f"{dst} exists with other content")
            plan.append((src, dst))
    for src, dst in plan:
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dst, lambda tmp, src=src: _link_or_copy(src, tmp))
    _write_manifest(out / "manifest.csv", rows)
    return sorted(rows)


def _link_or_copy(src: Path, tmp):
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
