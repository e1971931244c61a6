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
    if "downstream" in result:
        return format_downstream(result["downstream"])
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
                ("ES phase sd, robust (MAD)", "es_phase_mad_sd"), ("ES phases far off median", "es_phase_far"),
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
        if r.get("ef", {}).get("subjects"):
            lines += [f"  decoded ED/ES masks, {r['ef']['subjects']} subjects: " + ", ".join(
                f"{k.upper()} {_f(v['decoded_mean'], '.1f')} vs {_f(v['true_mean'], '.1f')} (bias {_f(v['bias'], '+.1f')}, "
                f"MAE {_f(v['mae'], '.1f')} points)" for k, v in r["ef"].items() if k != "subjects")]
        if r.get("image_change", {}).get("decoded") is not None:
            c = r["image_change"]
            lines += [f"  image change / frame: decoded {_f(c['decoded'], '.4f')} vs real {_f(c['real'], '.4f')}"]
    if "agreement" in result:
        a = result["agreement"]
        lines += ["", f"image-mask agreement ({a['subjects']} subjects, {a['frames']} frames; the VAE's mask head on "
                      "generated images vs generated masks): "
                      + ", ".join(f"Dice {k} {_f(v, '.3f')}" for k, v in a["dice"].items())]
    if "realism" in result:
        r = result["realism"]
        lines += ["", f"realism (judge: {r['judge']['segmenter']}; fitted on {r['judge']['trained_on']['subjects']} "
                      f"real subjects, {r['judge']['fit']['steps']} steps, seed {r['judge']['fit']['seed']}; "
                      f"grid {r['grid']['size']} x {r['grid']['size']} at {r['grid']['spacing']:g} mm)",
                  f"  {'':<15}{'frames':>7}" + "".join(f"{'Dice ' + s:>10}" for s in r["rows"]["real"]["dice"])
                  + "".join(f"{'real. ' + s:>11}" for s in r["rows"]["real"]["dice"]) + f"{'sharpness':>11}"]
        for kind, row in r["rows"].items():
            lines.append(f"  {kind:<15}{row['frames']:>7}" + "".join(f"{_f(v, '.3f'):>10}" for v in row["dice"].values())
                         + "".join(f"{_f(v, '.3f'):>11}" for v in row["realism"].values())
                         + f"{_f(row['sharpness'], '.3f'):>11}")
        lines.append(f"  {r['protocol']}")
        if r.get("note"):
            lines.append(f"  {r['note']}")
    if "memorisation" in result:
        m = result["memorisation"]
        g, ref = m["generated_to_train"], m["real_to_train"]
        lines += ["", f"memorisation (reference: {m['reference']}; {m['train']['subjects']} training subjects)",
                  f"  flagged: {m['flagged']['n']} of {m['flagged']['of']} ({m['flagged']['fraction']:.1%}) closer "
                  f"to a training subject than {_f(m['threshold'], '.4g')}, the closest a real subject comes",
                  f"  {'distance to nearest train':<28}{'min':>9}{'p05':>9}{'median':>9}{'p95':>9}",
                  f"  {'generated':<28}" + "".join(f"{_f(g[k], '.4g'):>9}" for k in ('min', 'p05', 'median', 'p95')),
                  f"  {'real (reference)':<28}" + "".join(f"{_f(ref[k], '.4g'):>9}" for k in ('min', 'p05', 'median', 'p95')),
                  "  closest pairs: " + "; ".join(f"{p['generated']} ~ {p['train']} ({_f(p['distance'], '.4g')}, "
                                                  f"ED Dice {_f(p['ed_mask_dice'], '.2f')})" for p in m["closest"])]
    return "\n".join(lines)


def format_downstream(d: dict) -> str:
    """A readable report of jobs.downstream's result."""
    s = d["settings"]
    lines = [f"downstream segmentation (segmenter: {d['segmenter']})",
             f"  train {d['train']['path']} ({d['train']['subjects']} labelled subjects, {d['train']['slices']} slices)"]
    if d["synthetic"]:
        lines.append(f"  synthetic {d['synthetic']['path']} ({d['synthetic']['subjects']} subjects, "
                     f"{d['synthetic']['slices']} slices; {d['synthetic']['ratio']:g} synthetic per real slice)")
    lines += [f"  test {d['test']['path']} ({d['test']['subjects']} subjects, {d['test']['frames']} labelled frames)",
              f"  {s['fit']['steps']} steps, batch {s['fit']['batch']}, lr {s['fit']['lr']:g}, seeds "
              f"{','.join(map(str, s['seeds']))}; grid {s['grid']['size']} x {s['grid']['size']} at "
              f"{s['grid']['spacing']:g} mm; scored on each file's own grid", "",
              f"  {'arm':<16}" + "".join(f"{'Dice ' + n:>16}" for n in ('RV', 'MYO', 'LV'))
              + "".join(f"{'HD95 ' + n + ' mm':>18}" for n in ('RV', 'MYO', 'LV'))]
    for arm, row in d["arms"].items():
        lines.append(f"  {arm:<16}" + "".join(f"{_pm(row[n]['dice'], '.3f'):>16}" for n in ('RV', 'MYO', 'LV'))
                     + "".join(f"{_pm(row[n]['hd95'], '.2f'):>18}" for n in ('RV', 'MYO', 'LV')))
    if "difference" in d:
        diff = d["difference"]
        lines.append(f"  {'difference':<16}" + "".join(f"{_f(diff[n]['dice'], '+.3f'):>16}" for n in ('RV', 'MYO', 'LV'))
                     + "".join(f"{_f(diff[n]['hd95'], '+.2f'):>18}" for n in ('RV', 'MYO', 'LV')))
        lines.append(f"  {'p (paired)':<16}" + "".join(f"{_f(diff[n]['p'], '.3g'):>16}" for n in ('RV', 'MYO', 'LV')))
        t = d["paired_test"]
        lines.append(f"  mean Dice difference {t['mean_dice_difference']:+.4f}, p = {_f(t['p'], '.3g')} "
                     f"({t['subjects']} subjects; {t['test']})")
    return "\n".join(lines)


def _pm(v: dict, fmt: str) -> str:
    """mean ± sd over seeds."""
    if v["mean"] is None:
        return "-"
    return format(v["mean"], fmt) + ("" if v["sd"] is None else " ± " + format(v["sd"], fmt))
