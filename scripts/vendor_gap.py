"""The phantom's vendor gap: a compact segmenter fitted on one acquisition style, scored on held-out
subjects of every style (the real-only arm of `synth4d eval --downstream`, fitted once per seed and
reused for every test set). Prints a table; writes JSON with --json.

    python scripts/vendor_gap.py --train vA_train --test A=vA_test --test B=vB_test ... [--seeds 2]
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import numpy as np

from synth4d.cine.datasets import scan
from synth4d.cine.prep import prepare_subject
from synth4d.jobs.compact import FitSettings, collect, fit
from synth4d.jobs.downstream import _score, segment_subject, test_frames
from synth4d.jobs.realism import has_labels, judge_grid


@click.command()
@click.option("--train", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--test", "tests", multiple=True, required=True, help="NAME=FOLDER, once per style.")
@click.option("--seeds", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=FitSettings.steps, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(train, tests, seeds, steps, json_path):
    grid = judge_grid(1.5, 96)
    ds = scan(train)
    real = collect((prepare_subject(r.load(), grid) for r in ds.refs if has_labels(r)), FitSettings.max_frames)
    models = [fit(real, dataclasses.replace(FitSettings(steps=steps), seed=s), desc=f"seed {s}") for s in range(seeds)]
    result = {"train": str(train), "seeds": seeds, "steps": steps, "grid": dataclasses.asdict(grid), "tests": {}}
    for item in tests:
        name, folder = item.split("=", 1)
        per = {"RV": [], "MYO": [], "LV": []}
        hd = {"RV": [], "MYO": [], "LV": []}
        for subject in scan(folder).load_each(f"test {name}"):
            truth = test_frames(subject)
            preds = segment_subject({s: m for s, m in enumerate(models)}, subject, grid)
            scores = [_score(p, truth, subject.spacing) for p in preds.values()]
            for k in per:
                per[k].append(np.mean([sc[k]["dice"] for sc in scores]))
                hd[k] += [sc[k]["hd95"] for sc in scores if sc[k]["hd95"] is not None]
        result["tests"][name] = {"path": folder, "subjects": len(per["RV"]),
                                 "dice": {k: float(np.mean(v)) for k, v in per.items()},
                                 "hd95": {k: float(np.mean(v)) for k, v in hd.items()}}
    click.echo(f"fitted on {train} ({len(real.ids)} subjects), {seeds} seeds x {steps} steps")
    click.echo(f"{'test':<8}{'n':>4}{'Dice RV':>9}{'MYO':>7}{'LV':>7}{'mean':>7}{'HD95 RV':>9}{'MYO':>7}{'LV':>7}")
    for name, r in result["tests"].items():
        d, h = r["dice"], r["hd95"]
        click.echo(f"{name:<8}{r['subjects']:>4}{d['RV']:>9.3f}{d['MYO']:>7.3f}{d['LV']:>7.3f}"
                   f"{np.mean(list(d.values())):>7.3f}{h['RV']:>9.2f}{h['MYO']:>7.2f}{h['LV']:>7.2f}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
