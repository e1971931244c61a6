"""The readable table of `synth4d eval`'s result, and the result made JSON-safe."""
from __future__ import annotations

import numpy as np


def clean(obj):
    """JSON-safe: numpy scalars to Python, NaN and infinities to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _f(x, fmt=".3g"):
    return "-" if x is None else format(x, fmt)


def format_table(result: dict) -> str:
    """A readable report of evaluate's result, for stderr."""
    lines = [f"real       {result['real']['path']} ({result['real']['layout']}, {result['real']['subjects']} subjects)"]
    if "generated" in result:
        g = result["generated"]
        lines.append(f"generated  {g['path']} ({g['layout']}, {g['subjects']} subjects)")
    for name in ("fvd", "fvd_vae"):
        if name in result:
            r, p = result[name], result[name]["protocol"]
            lines += ["", f"{name.upper() if name == 'fvd' else name}  {_f(r['value'], '.4g')}   "
                          f"(real half vs half: {_f(r['real_halves'], '.4g')})",
                      f"  feature: {p['feature']}",
                      f"  clips: {p['clip']}; resolution {p['resolution'][0]} x {p['resolution'][1]}",
                      f"  subjects real {p['subjects']['real']} / generated {p['subjects']['generated']}, "
                      f"clips real {p['clips']['real']} / generated {p['clips']['generated']}, "
                      f"halves {p['real_halves']['clips']}"]
    if "control" in result:
        c = result["control"]
        lines += ["", f"controllability ({c['subjects']} subjects; {c['protocol']})",
                  f"  {'prior':<8}{'n':>5}{'r':>8}{'MAE':>9}{'bias':>9}"]
        lines += [f"  {k:<8}{v['n']:>5}{_f(v['r'], '.3f'):>8}{_f(v['mae'], '.2f'):>9}{_f(v['bias'], '+.2f'):>9}"
                  for k, v in c["priors"].items()]
        d = c["diagnosis"]
        lines.append(f"  diagnosis criteria met: {_f(d['rate'], '.2f')} of {d['n']}  "
                     + "  ".join(f"{dx} {v['rate']:.2f} ({v['n']})" for dx, v in d["per_dx"].items()))
        lines += [f"    {dx}: {text}" for dx, text in d["criteria"].items()]
        lines += [f"    not checked, {dx}: {text}" for dx, text in d["not_checked"].items()]
    if "coherence" in result:
        r, g = result["coherence"]["real"], result["coherence"]["generated"]
        keys = [("subjects", "subjects"), ("frames (mean)", "frames_mean"), ("full-cycle masks", "full_cycle_masks"),
                ("LV curve roughness", "lv_curve_roughness"), ("RV curve roughness", "rv_curve_roughness"),
                ("ED offset (cycle)", "ed_offset"), ("ES phase (cycle)", "es_phase"), ("ES phase sd", "es_phase_sd"),
                ("image change / frame", "image_change"), ("image change roughness", "image_change_roughness")]
        rows = [(label, r[k], g[k]) for label, k in keys]
        rows += [(f"one component {s}", r["one_component"][s], g["one_component"][s]) for s in r["one_component"]]
        lines += ["", f"{'temporal coherence':<24}{'real':>10}{'generated':>12}"]
        lines += [f"  {label:<22}{_f(a):>10}{_f(b):>12}" for label, a, b in rows]
    if "recon" in result:
        r = result["recon"]
        lines += ["", f"reconstruction ({r['checkpoint']}, {r['frames']} frames): "
                      f"PSNR {_f(r['psnr'], '.2f')} dB, SSIM {_f(r['ssim'], '.3f')}"]
        lines += [f"  {kind:<10} {s:<4} Dice {_f(v['dice'], '.3f')}  HD95 {_f(v['hd95_mm'], '.2f')} mm  "
                  f"({v['frames']} frames)"
                  for kind, per in r["masks"].items() for s, v in per.items()]
    if "agreement" in result:
        a = result["agreement"]
        lines += ["", f"image-mask agreement ({a['subjects']} subjects, {a['frames']} frames; the VAE's mask head on "
                      "generated images vs generated masks): "
                      + ", ".join(f"Dice {k} {_f(v, '.3f')}" for k, v in a["dice"].items())]
    return "\n".join(lines)
