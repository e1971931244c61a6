"""Quality against sampler steps: generate the same requests with each sampler setting, evaluate each set
against a real one, print one table (the model card's "Sampler" section).

`python scripts/sampler_table.py REAL RUNS [--n 100] [--jobs 2] [--weights DIR] [--settings ...]` writes
RUNS/<setting>/ (the generated set, its eval.json and seconds.json) and prints the table; rerun it to
resume (generate skips complete subjects, an existing eval.json is kept). Each setting is
sampler:steps:keyframes:seed[:precision[:guided fraction[:motion final t]]] (precision as `generate
--precision`, auto if not given; the guided fraction as `generate --guided-fraction`, 1 if not given: every
step guided; the motion model's final timestep as `generate --motion-final-t`, the trailing grid if not
given; sampler, steps and guided fraction may each be STATIC/MOTION, e.g.
ddim/unipc:25/8:12:0:auto:0.5/0.25:20 for `--sampler ddim --steps 25 --motion-sampler unipc
--motion-steps 8 --guided-fraction 0.5 --motion-guided-fraction 0.25 --motion-final-t 20`, the default
sampling). Requests cycle through NOR, DCM, HCM, MINF, RV (n / 5 per group) with
everything else drawn from the prior; the same seed draws the same requests, so settings with one seed
are paired, and two seeds of one setting measure the run-to-run noise. Each setting is also compared subject
by subject (`paired`) with the first setting listed with its seed: the difference in the r and MAE of each
measure and in the image change per frame, with a 95 % interval from resampling subjects. It prints
figures and asserts nothing. Generation runs as `jobs` CLI processes with one thread each, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DIAGNOSES = ("NOR", "DCM", "HCM", "MINF", "RV")
SETTINGS = ("ddim:25:12:0", "ddim:25:12:1", "dpmpp_2m:15:12:0", "dpmpp_2m:10:12:0", "dpmpp_2m:8:12:0",
            "dpmpp_2m:10:8:0", "ddim/dpmpp_2m:25/8:12:0", "ddim/dpmpp_2m:25/6:12:0", "ddim/dpmpp_2m:25/4:12:0",
            "ddim/dpmpp_2m:25/8:8:0", "ddim/dpmpp_2m:25/8:12:0:auto:0.5/0.25",
            "ddim/dpmpp_2m:25/8:12:1:auto:0.5/0.25", "ddim/dpmpp_2m:25/8:12:0:auto:0.5/0.25:20",
            "ddim/dpmpp_2m:25/8:12:1:auto:0.5/0.25:20", "ddim/unipc:25/8:12:0:auto:0.5/0.25:20",
            "ddim/unipc:25/8:12:1:auto:0.5/0.25:20", "ddim/unipc:25/20:12:0:auto:0.5/0.25:20",
            "ddim/unipc:25/15:12:0:auto:0.5/0.2:20", "ddim/unipc:25/10:12:0:auto:0.5/0.2:20",
            "ddim/unipc:25/6:12:0:auto:0.5/0.17:20")   # the model card's rows (weights/README.md, "Samplers and steps")
MEASURES = ("lvedv", "rvedv", "lv_mass", "lvef", "rvef")
STRUCTURES = ("RV", "MYO", "LV")


def generate_options(setting: str) -> list:
    """`sampler:steps:keyframes:seed[:precision[:guided fraction[:motion final t]]]` (sampler, steps and guided
    fraction may be STATIC/MOTION) -> the options of `synth4d generate` that sample that way, the same for every
    job of the setting. Without a guided fraction every step is guided (what `--sampler` alone implies), without
    a final t the motion model's grid is the trailing one."""
    sampler, steps, keyframes, seed, *rest = setting.split(":")
    (sampler, *motion_sampler), (steps, *motion_steps) = sampler.split("/"), steps.split("/")
    cmd = ["--sampler", sampler, "--steps", steps, "--keyframes", keyframes, "--seed", seed,
           "--precision", rest[0] if rest else "auto"]
    cmd += ["--motion-sampler", *motion_sampler] if motion_sampler else []
    cmd += ["--motion-steps", *motion_steps] if motion_steps else []
    if len(rest) > 1:
        guided, *motion_guided = rest[1].split("/")
        cmd += ["--guided-fraction", guided, "--motion-guided-fraction", (motion_guided or [guided])[0]]
    if len(rest) > 2:
        cmd += ["--motion-final-t", rest[2]]
    return cmd


def run_setting(real: Path, out: Path, setting: str, n: int, jobs: int, weights) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seconds = out / "seconds.json"
    if not seconds.exists():
        per_job = -(-n // jobs)
        procs, clock = [], time.perf_counter()
        for j in range(jobs):
            rows = range(j * per_job, min(n, (j + 1) * per_job))
            if not rows:
                continue
            csv = out / f"requests_{j}.csv"
            csv.write_text("dx\n" + "".join(f"{DIAGNOSES[i % len(DIAGNOSES)]}\n" for i in rows))
            cmd = [sys.executable, "-m", "synth4d", "generate", str(out), "--conditions", str(csv), "--start",
                   str(rows[0]), *generate_options(setting)] + (["--weights", str(weights)] if weights else [])
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL))
        if any(p.wait() for p in procs):
            raise SystemExit(f"generation failed for {setting}")
        seconds.write_text(json.dumps({"seconds": time.perf_counter() - clock, "subjects": n, "jobs": jobs}))
    report = out / "eval.json"
    if not report.exists():
        cmd = [sys.executable, "-m", "synth4d", "eval", str(real), str(out), "--fvd", "--control", "--coherence",
               "--realism", "--json"] + (["--weights", str(weights)] if weights else [])
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        report.write_text(result.stdout)
    return {**json.loads(report.read_text()), "timing": json.loads(seconds.read_text())}


def figures(r: dict) -> dict:
    """The figures the table compares, by name."""
    c, g = r["control"], r["coherence"]["generated"]
    out = {f"{k} {m}": c["priors"][k][m] for k in MEASURES for m in ("r", "mae")}
    gen = r["realism"]["rows"]["generated"]
    out.update({f"realism {s}": v for s, v in gen["realism"].items()})
    return {**out, "diagnosis": c["diagnosis"]["rate"], "fvd_vae": r["fvd_vae"]["value"],
            "image change": g["image_change"], "ES phase sd": g["es_phase_sd"], "sharpness": gen["sharpness"]}


def row(setting: str, r: dict) -> str:
    f, t = figures(r), r["timing"]
    cells = [f"{f[k + ' r']:.3f} / {f[k + ' mae']:.1f}" for k in MEASURES]
    cells += [f"{f['diagnosis']:.2f}", f"{f['fvd_vae']:.2f}", f"{f['image change']:.4f}", f"{f['ES phase sd']:.3f}",
              " / ".join(f"{f['realism ' + k]:.3f}" for k in STRUCTURES), f"{f['sharpness']:.2f}",
              f"{t['seconds'] / t['subjects']:.2f}"]
    return f"| {setting} | " + " | ".join(cells) + " |"


REAL_TARGET = {"image change": "image_change", "ES phase sd": "es_phase_sd"}   # judged by their distance to REAL's


def higher_is_better(figure: str) -> bool:
    """Which way a figure improves: errors, fvd_vae and the distances to the real figure (REAL_TARGET) fall;
    r, diagnosis consistency, realism and sharpness rise."""
    return not (figure.endswith(" mae") or figure == "fvd_vae" or figure in REAL_TARGET)


def judged(r: dict) -> dict:
    """figures(r) with the REAL_TARGET figures replaced by their distance to the real set's figure."""
    f, real = figures(r), r["coherence"]["real"]
    return {k: abs(v - real[REAL_TARGET[k]]) if k in REAL_TARGET else v for k, v in f.items()}


def seed_of(setting: str) -> str:
    """The seed field of a setting (settings with one seed draw the same requests)."""
    return setting.split(":")[3]


def beyond_noise(results: dict, reference: str, repeat: str) -> dict:
    """Per setting, the figures that differ from the reference setting with its seed (`reference`, or `repeat`, the
    same setting with another seed, for the settings with repeat's seed: the same requests) by more than the two
    seeds of the reference differ, the run-to-run noise measured once per figure: {"worse": [...], "better": [...]}."""
    bases = {reference: judged(results[reference]), repeat: judged(results[repeat])}
    noise = {k: abs(bases[repeat][k] - bases[reference][k]) for k in bases[reference]}
    out = {}
    for s, r in results.items():
        if s in (reference, repeat):
            continue
        ref = bases[repeat if seed_of(s) == seed_of(repeat) else reference]
        moved = {k: v - ref[k] for k, v in judged(r).items() if abs(v - ref[k]) > noise[k]}
        out[s] = {"worse": [k for k, d in moved.items() if (d > 0) != higher_is_better(k)],
                  "better": [k for k, d in moved.items() if (d > 0) == higher_is_better(k)]}
    return out


def per_subject(folder: Path, grid) -> dict:
    """id -> one generated subject's figures: requested and measured measures (its manifest row), its image
    change per frame (as `eval --coherence` computes it, on `grid`) and its high-frequency energy near the heart
    (heart_detail). Cached in folder/per_subject.json."""
    import csv
    from synth4d.cine.datasets import scan
    from synth4d.cine.metrics import frame_change
    from synth4d.cine.prep import prepare_subject
    cache = folder / "per_subject.json"
    if cache.exists():
        out = json.loads(cache.read_text())
        if all("hf energy" in x for x in out.values()):   # caches written before the figure are made again
            return out
    with open(folder / "manifest.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    out = {}
    for s in scan(folder).load_each(f"per subject ({folder.name})"):
        p = prepare_subject(s, grid)
        r = rows[s.id]
        out[s.id] = {"image change": float(frame_change(p.image[:, :, :p.n_slices]).mean()),
                     "hf energy": heart_detail(p, grid.spacing),
                     **{f"{w} {k}": float(r[f"{w}_{k}"] or "nan") for k in MEASURES for w in ("requested", "measured")}}
    cache.write_text(json.dumps(out))
    return out


def heart_detail(p, spacing: float) -> float:
    """A prepared subject's mean high-frequency energy near the heart over its labelled frames, as `eval --realism`
    takes it per frame (cine.metrics.high_frequency_energy in jobs.realism.heart_box): its sharpness figure is
    the set's mean of these over the real test set's, so the paired difference of this mean, relative to the
    reference set's, is the relative difference in sharpness (here on the grid of `p`, the VAE's)."""
    import numpy as np
    from synth4d.cine.metrics import high_frequency_energy
    from synth4d.jobs.realism import heart_box
    n = p.n_slices
    frames = (range(p.full_mask.shape[3]) if p.full_mask is not None else sorted(p.masks))
    energy = []
    for t in frames:
        mask = p.full_mask[..., t] if p.full_mask is not None else p.masks[t]
        box = heart_box(np.moveaxis(mask[:, :, :n], 2, 0), spacing)                # (n, X, Y)
        energy.append(high_frequency_energy(p.image[:, :, :n, t], np.moveaxis(box, 0, 2)))
    energy = [e for e in energy if np.isfinite(e)]
    return float(np.mean(energy)) if energy else float("nan")


def paired(a: dict, b: dict, boot: int = 4000, seed: int = 0) -> dict:
    """b - a for two per_subject() sets generated from the same requests and seeds, over the subjects both
    have: {figure: (difference, low, high)}, the 95 % interval from resampling subjects (the same subjects
    for both sets each time). Figures: r and MAE of each measure, the mean image change per frame and the mean
    high-frequency energy near the heart (heart_detail; the sharpness figure before its division by the real's)."""
    import numpy as np
    from synth4d.cine.metrics import mae, pearson
    ids = sorted(set(a) & set(b))

    def figs(d, idx):
        sub = [d[ids[i]] for i in idx]
        out = {k: float(np.mean([x[k] for x in sub])) for k in ("image change", "hf energy")}
        for k in MEASURES:
            req, got = [x[f"requested {k}"] for x in sub], [x[f"measured {k}"] for x in sub]
            out[f"{k} r"], out[f"{k} mae"] = pearson(req, got), mae(got, req)
        return out

    def difference(idx):
        fa, fb = figs(a, idx), figs(b, idx)
        return {k: fb[k] - fa[k] for k in fa}

    rng = np.random.default_rng(seed)
    diff = difference(np.arange(len(ids)))
    draws = [difference(rng.integers(0, len(ids), len(ids))) for _ in range(boot)]
    return {k: (d, *(float(q) for q in np.percentile([x[k] for x in draws], [2.5, 97.5]))) for k, d in diff.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("real", type=Path)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = ap.parse_args()
    results = {}
    for setting in args.settings:
        results[setting] = run_setting(args.real, args.runs / setting.replace(":", "_").replace("/", "-"), setting, args.n, args.jobs,
                                       args.weights)
        print(f"done {setting}", file=sys.stderr)
    head = ["sampler:steps:keyframes:seed[:precision[:guided fraction[:motion final t]]]"] + [f"{k} r / MAE" for k in MEASURES] + [
        "diagnosis consistency", "fvd_vae", "image change / frame", "ES phase sd", "realism " + " / ".join(STRUCTURES),
        "sharpness", "s / subject (machine)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for setting, r in results.items():
        print(row(setting, r))
    references = {}
    for setting in args.settings:   # per seed, the first setting listed with it
        references.setdefault(seed_of(setting), setting)
    if any(references[seed_of(x)] != x for x in args.settings):
        from synth4d.weights.checkpoint import load_vae
        from synth4d.weights import DIR
        grid = load_vae((args.weights or DIR) / "vae.safetensors", "cpu")[1]["grid"]
        folder = lambda x: args.runs / x.replace(":", "_").replace("/", "-")   # noqa: E731
        for reference in references.values():
            same_seed = [x for x in args.settings if seed_of(x) == seed_of(reference) and x != reference]
            if not same_seed:
                continue
            ref = per_subject(folder(reference), grid)
            print(f"\npaired with {reference} (same requests and seeds; 95 % interval over subjects, * where it "
                  f"excludes 0):")
            for setting in same_seed:
                d = paired(ref, per_subject(folder(setting), grid))
                print(f"  {setting}: " + "; ".join(f"{k} {v:+.4g} [{lo:+.4g}, {hi:+.4g}]{'*' if lo > 0 or hi < 0 else ''}"
                                                  for k, (v, lo, hi) in d.items()))
    if len(args.settings) < 2:
        return
    reference, repeat = args.settings[:2]
    if reference.split(":")[:3] == repeat.split(":")[:3] and reference.split(":")[4:] == repeat.split(":")[4:]:
        print(f"\nbeyond the run-to-run noise (|{reference} - {repeat}|) of the one of them with the same seed:")
        for setting, moved in beyond_noise(results, reference, repeat).items():
            print(f"  {setting}: worse {', '.join(moved['worse']) or 'none'}; better {', '.join(moved['better']) or 'none'}")


if __name__ == "__main__":
    main()
