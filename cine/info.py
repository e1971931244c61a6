"""`synth4d info`: what the loader sees in a data set, as a report (JSON-ready dict) and as text."""
from __future__ import annotations

import sys
from collections import Counter
from typing import Optional

import numpy as np
from tqdm import tqdm

from synth4d.cine import DataError
from synth4d.cine.datasets import scan
from synth4d.cine.measures import MEASURES, clinical_measures


def info_report(root, skip_bad=False, csv_path=None) -> dict:
    """What the loader sees in root, as a JSON-serialisable dict; reads one subject at a time."""
    ds = scan(root, skip_bad=skip_bad, csv_path=csv_path)
    problems, subjects = list(ds.problems), []
    for ref in tqdm(ds.refs, desc="reading subjects", unit="subject", file=sys.stderr, leave=False):
        try:
            s = ref.load()
        except DataError as e:
            if not skip_bad:
                raise
            problems.append((e.path, e.message))
            continue
        both = s.es is not None and s.ed in s.masks and s.es in s.masks
        measures = clinical_measures(s.masks[s.ed], s.masks[s.es], s.spacing) if both else None
        subjects.append({"id": s.id, "dx": s.dx, "diagnosis": s.meta.get("diagnosis"), "ed": s.ed, "es": s.es,
                         "frames": s.n_frames,
                         "shape": list(s.image.shape), "spacing": [round(x, 4) for x in s.spacing],
                         "labelled_frames": sorted(s.masks), "vendor": s.meta.get("vendor"),
                         "measures": measures and {k: _json_float(v) for k, v in measures.items()}})
    if not subjects:
        raise DataError(root, f"no readable subject ({len(problems)} skipped)")
    return {
        "layout": ds.layout, "root": str(ds.root), "n_subjects": len(subjects),
        "diagnoses": dict(Counter(s["dx"] or ("other" if s["diagnosis"] else "unknown") for s in subjects)),
        "other_diagnoses": dict(Counter(s["diagnosis"] for s in subjects if s["diagnosis"] and not s["dx"])),
        "labelled_frames": sum(len(s["labelled_frames"]) for s in subjects),
        "subjects_without_labels": sum(not s["labelled_frames"] for s in subjects),
        "ranges": _ranges(subjects), "volumes": _volume_stats(subjects),
        "problems": [{"path": str(p), "reason": r} for p, r in problems], "subjects": subjects,
    }


def _ranges(subjects) -> dict:
    spacing = np.array([s["spacing"] for s in subjects])  # (subjects, 3)
    shape = np.array([s["shape"] for s in subjects])      # (subjects, 4): X, Y, Z, T
    columns = {"spacing_x": spacing[:, 0], "spacing_y": spacing[:, 1], "spacing_z": spacing[:, 2],
               "size_x": shape[:, 0], "size_y": shape[:, 1], "slices": shape[:, 2], "frames": shape[:, 3]}
    return {k: [v.min().item(), v.max().item()] for k, v in columns.items()}


def _volume_stats(subjects) -> dict:
    """Per diagnosis (and 'all'): n, and mean and sample sd of every measure over the measured subjects."""
    groups = {}
    for s in subjects:
        if s["measures"]:
            for g in (s["dx"] or "unknown", "all"):
                groups.setdefault(g, []).append(s["measures"])
    stats = {}
    for g, rows in groups.items():
        stats[g] = {"n": len(rows)}
        for k in MEASURES:
            x = np.array([r[k] for r in rows if r[k] is not None], dtype=np.float64)
            stats[g][k] = {"mean": _json_float(x.mean()) if x.size else None,
                           "sd": _json_float(x.std(ddof=1)) if x.size > 1 else None}
    return stats


def _json_float(x) -> Optional[float]:
    return round(float(x), 2) if np.isfinite(x) else None


def format_info(report: dict) -> str:
    """A readable summary of info_report: counts, geometry ranges, volumes per diagnosis, unusable files."""
    r = report
    lines = [f"layout     {r['layout']}  ({r['root']})",
             f"subjects   {r['n_subjects']}  ({r['n_subjects'] - r['subjects_without_labels']} labelled, "
             f"{r['subjects_without_labels']} without labels; {r['labelled_frames']} labelled frames)",
             "diagnoses  " + "  ".join(f"{dx} {n}" for dx, n in sorted(r["diagnoses"].items()))
             + (" (other: " + ", ".join(f"{c} {n}" for c, n in sorted(r["other_diagnoses"].items())) + ")"
                if r.get("other_diagnoses") else ""), "",
             f"{'geometry':<12}{'min':>8}{'max':>8}"]
    lines += [f"{k:<12}{lo:>8g}{hi:>8g}" for k, (lo, hi) in r["ranges"].items()]
    if r["volumes"]:
        head = ["dx", "n"] + [k.upper().replace("_", " ") for k in MEASURES]
        table = [[g, str(v["n"])] + [_mean_sd(v[k]) for k in MEASURES] for g, v in r["volumes"].items()]
        widths = [max(len(row[i]) for row in [head] + table) for i in range(len(head))]
        lines += ["", "measured from ED/ES masks, mean ± sd (volumes mL, EF %, mass g)"]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                  for row in [head] + table]
    if r["problems"]:
        lines += ["", f"unusable files ({len(r['problems'])}):"] + [f"  {p['path']}: {p['reason']}" for p in r["problems"]]
    return "\n".join(lines)


def _mean_sd(stat) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['sd']:.1f}" if stat["sd"] is not None else "")
