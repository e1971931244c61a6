"""Add the ES phase prior (cine.priors.fit_es_phase) to a static checkpoint trained before the prior
existed, without touching its tensors.

`python scripts/es_phase_prior.py DATA RUN WEIGHTS --anchor-from GENERATED [--cache DIR]`
refits the priors on the training subjects of the static run folder RUN (its split.json) in DATA, exactly as
training does (jobs.encode.encode_dataset, LatentSubject.values, cine.priors.fit_priors), refuses if the
refitted measure prior differs from the one in WEIGHTS/static.safetensors (other data), and writes the
new "es_phase" entry into that file's metadata. Its anchor, the phase where the motion model puts ES, is
measured: the median of es / frames over the plausible subjects of GENERATED, a folder these weights
generated without the prior (a `synth4d generate` manifest). Prints the prior.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file

from synth4d.cine import atomic_write
from synth4d.cine.priors import FIELDS, fit_priors
from synth4d.jobs.encode import encode_dataset
from synth4d.train.common import read_split


def measured_anchor(generated: Path) -> tuple[float, int]:
    """(median ES phase, subjects) of the plausible subjects in a generated folder's manifest."""
    with open(generated / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["plausible"] == "yes" and not r.get("es_phase")]
    if not rows:
        raise SystemExit(f"{generated}/manifest.csv: no plausible subject generated without an ES phase prior")
    return float(np.median([int(r["es"]) / int(r["frames"]) for r in rows])), len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("data", type=Path)
    ap.add_argument("run", type=Path, help="the static LDM's run folder (split.json)")
    ap.add_argument("weights", type=Path)
    ap.add_argument("--anchor-from", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()
    path = args.weights / "static.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    stored = json.loads(metadata["priors"])
    subjects, _ = encode_dataset(args.data, args.weights / "vae.safetensors", cache=args.cache, device="cpu")
    by_id = {s.id: s for s in subjects}
    train_ids, _ = read_split(args.run, by_id)
    labelled = [by_id[i].values() for i in train_ids if set(FIELDS) <= set(by_id[i].values())]
    refit = fit_priors(labelled)
    if not _same(refit, stored):
        raise SystemExit(f"{path}: its measure prior is not the one these training subjects give; wrong DATA or RUN")
    es = refit["es_phase"]
    es["anchor"], n = measured_anchor(args.anchor_from)
    es["anchor_measured_on"] = n
    metadata["priors"] = json.dumps({**stored, "es_phase": es})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    print(json.dumps(es, indent=1))


def _same(a: dict, b: dict) -> bool:
    groups = [(a["all"], b["all"])] + [(a["dx"].get(d), b["dx"][d]) for d in b["dx"]]
    return (set(a["dx"]) == set(b["dx"]) and all(x is not None and x["n"] == y["n"] and np.allclose(x["mean"], y["mean"])
                                                  and np.allclose(x["cov"], y["cov"]) for x, y in groups))


if __name__ == "__main__":
    main()
