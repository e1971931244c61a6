"""Clinical priors: the per-diagnosis joint distribution of the measures, and request checks.

Generation may be asked for any subset of the priors; the rest are drawn from a Gaussian
fitted per diagnosis to the log of the training subjects' measures, conditioned on the
values given (so an asked-for large LVEDV brings a large RVEDV and mass with it).
The fitted prior is plain JSON so it travels in a checkpoint's metadata.

The ES phase (ES frame after ED as a fraction of the cycle) has a prior of its own, a Gaussian per
diagnosis clipped to the training range (`fit_es_phase`), drawn after the measures so a seed draws the
same measures with or without it. The generator warps its motion model's cycle so that the model's
own ES phase ("anchor", `warp_phases`) lands on the drawn one.
"""
from __future__ import annotations

import math

import numpy as np

from synth4d.cine import UserError
from synth4d.cine.diagnosis import volumes_fit
from synth4d.cine.measures import MEASURES, ejection_fraction

# Drawn jointly, in log space. EFs follow from EDV and ESV.
FIELDS = ("lvedv", "lvesv", "rvedv", "rvesv", "lv_mass", "slices", "slice_mm", "rr_ms")
REQUESTABLE = (*MEASURES, "slices", "es_phase")
ES_PHASE_RANGE = (0.15, 0.55)  # ES (after ED, fraction of the cycle) outside this is not a plausible systole


def fit_priors(records, shrink=4.0):
    """records: dicts with dx and FIELDS -> {"dx": {name: {n, mean, cov, lo, hi}}, "all": {...}}.

    Each diagnosis' covariance is shrunk towards the pooled one by n / (n + shrink), so a group
    with few subjects still gets a usable, positive-definite covariance.
    """
    rows = [r for r in records if all(np.isfinite(r.get(f, np.nan)) and r.get(f, 0) > 0 for f in FIELDS)]
    if len(rows) < 2:
        raise UserError(f"need at least 2 subjects with ED and ES masks to fit priors, found {len(rows)}")
    x_all = np.log([[r[f] for f in FIELDS] for r in rows])            # (N, F)
    pooled = _fit(x_all, None)
    out = {"fields": list(FIELDS), "all": pooled, "dx": {}}
    for dx in sorted({str(r.get("dx")) for r in rows if r.get("dx")}):
        x = x_all[[str(r.get("dx")) == dx for r in rows]]
        out["dx"][dx] = _fit(x, pooled, shrink)
    es = fit_es_phase(records)
    return {**out, "es_phase": es} if es else out


def fit_es_phase(records) -> dict | None:
    """records with dx and es_phase -> {"anchor", "all", "dx": {dx: {n, mean, sd, lo, hi}}}, None for fewer than 2.

    anchor: the phase where the motion model puts ES; the training mean until measured on the model's own
    output (scripts/es_phase_prior.py). A diagnosis with fewer than 5 subjects gets the pooled figures.
    """
    rows = [r for r in records if r.get("es_phase") is not None and 0 < r["es_phase"] < 1]
    if len(rows) < 2:
        return None

    def stats(v):
        v = np.asarray(v, dtype=float)
        return {"n": len(v), "mean": float(v.mean()), "sd": float(v.std(ddof=1)), "lo": float(v.min()),
                "hi": float(v.max())}

    pooled = stats([r["es_phase"] for r in rows])
    by_dx = {}
    for dx in sorted({str(r.get("dx")) for r in rows if r.get("dx")}):
        v = [r["es_phase"] for r in rows if str(r.get("dx")) == dx]
        by_dx[dx] = stats(v) if len(v) >= 5 else {**pooled, "n": len(v)}
    return {"anchor": pooled["mean"], "all": pooled, "dx": by_dx}


def warp_phases(phases, es_phase, anchor) -> list:
    """Output phases -> the motion model's phases, piecewise linear: 0 -> 0, es_phase -> anchor, 1 -> 1,
    so the model's systole (0..anchor) fills 0..es_phase of the output cycle and its diastole the rest."""
    return [float(p) * anchor / es_phase if p <= es_phase else anchor + (float(p) - es_phase) * (1 - anchor) / (1 - es_phase)
            for p in phases]


def _fit(x, pooled, shrink=4.0):
    n = len(x)
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False) if n > 1 else np.zeros((x.shape[1], x.shape[1]))
    if pooled is not None:
        w = n / (n + shrink)
        cov = w * cov + (1 - w) * np.asarray(pooled["cov"])
    cov = cov + np.eye(len(mean)) * 1e-6
    return {"n": n, "mean": mean.tolist(), "cov": cov.tolist(),
            "lo": np.exp(x.min(0)).tolist(), "hi": np.exp(x.max(0)).tolist()}


def check_request(req, dx_vocab=None):
    """Refuse impossible requests before any work. req: name -> value (None = not given)."""
    dx = req.get("dx")
    if dx is not None and dx_vocab is not None and dx not in dx_vocab:
        raise UserError(f"unknown diagnosis {dx!r}; these weights know {', '.join(dx_vocab)}")
    for k in REQUESTABLE:
        v = req.get(k)
        if v is None:
            continue
        if not math.isfinite(v) or v <= 0:
            raise UserError(f"{k} must be a positive number, got {v}")
        if k in ("lvef", "rvef") and not 0 < v < 100:
            raise UserError(f"{k} must be between 0 and 100 %, got {v}")
        if k == "es_phase" and not ES_PHASE_RANGE[0] <= v <= ES_PHASE_RANGE[1]:
            raise UserError(f"es_phase must be between {ES_PHASE_RANGE[0]} and {ES_PHASE_RANGE[1]} of the cycle, got {v}")
    for side in ("lv", "rv"):
        edv, esv, ef = req.get(f"{side}edv"), req.get(f"{side}esv"), req.get(f"{side}ef")
        if edv is not None and esv is not None:
            if esv >= edv:
                raise UserError(f"{side}esv ({esv}) must be smaller than {side}edv ({edv})")
            if ef is not None and abs(100 * (edv - esv) / edv - ef) > 1.0:
                raise UserError(f"{side}edv, {side}esv and {side}ef disagree: (EDV-ESV)/EDV = "
                                f"{100 * (edv - esv) / edv:.1f} %, not {ef} %")


def draw(priors, req, rng):
    """Complete a request: every FIELD filled, EFs derived. req: name -> value or None; dx may be None.

    Values given are kept exactly; the others are drawn from the diagnosis' Gaussian conditioned
    on them (in log space), re-drawn (at most 50 times) until ESV < EDV on both sides and the
    values meet the diagnosis' criteria (cine.diagnosis.volumes_fit): the Gaussian's tails reach
    past them, and a "NOR" subject asked to have an LVEF of 40 % is not normal. When the given
    values rule the criteria out, the first draw with ESV < EDV is kept.
    """
    dx = req.get("dx")
    if dx is None:
        names = sorted(priors["dx"])
        n = np.array([priors["dx"][d]["n"] for d in names], dtype=float)
        dx = names[rng.choice(len(names), p=n / n.sum())] if names else None
    p = priors["dx"].get(dx, priors["all"]) if dx else priors["all"]
    fields = priors["fields"]
    mean, cov = np.asarray(p["mean"]), np.asarray(p["cov"])
    first = None
    for _ in range(50):
        known = {f: req[f] for f in fields if req.get(f) is not None}
        for side in ("lv", "rv"):  # an EF with one volume fixes the other volume
            edv, esv, ef = req.get(f"{side}edv"), req.get(f"{side}esv"), req.get(f"{side}ef")
            if ef is not None and edv is not None and esv is None:
                known[f"{side}esv"] = edv * (1 - ef / 100)
            elif ef is not None and esv is not None and edv is None:
                known[f"{side}edv"] = esv / (1 - ef / 100)
        idx_b = [i for i, f in enumerate(fields) if f in known]
        idx_a = [i for i, f in enumerate(fields) if f not in known]
        x = np.empty(len(fields))
        if idx_b:
            x[idx_b] = np.log([known[fields[i]] for i in idx_b])
        if idx_a:
            mu_a, s_aa = mean[idx_a], cov[np.ix_(idx_a, idx_a)]
            if idx_b:  # Gaussian conditioning: mu_a + S_ab S_bb^-1 (x_b - mu_b)
                k = cov[np.ix_(idx_a, idx_b)] @ np.linalg.inv(cov[np.ix_(idx_b, idx_b)])
                mu_a = mu_a + k @ (x[idx_b] - mean[idx_b])
                s_aa = s_aa - k @ cov[np.ix_(idx_b, idx_a)]
            x[idx_a] = rng.multivariate_normal(mu_a, (s_aa + s_aa.T) / 2, method="eigh")
        for side in ("lv", "rv"):  # an EF alone: draw the EDV, derive the ESV from the asked EF
            ef = req.get(f"{side}ef")
            if ef is not None and f"{side}edv" not in known and f"{side}esv" not in known:
                x[fields.index(f"{side}esv")] = x[fields.index(f"{side}edv")] + math.log(1 - ef / 100)
        out = {**dict(zip(fields, np.exp(x).tolist())), **known}  # given values exactly, not exp(log(v))
        if out["lvesv"] < out["lvedv"] and out["rvesv"] < out["rvedv"]:
            first = first or out
            if volumes_fit(dx, {**out, **_efs(out)}):
                break
    else:
        if first is None:
            raise UserError(f"could not draw priors consistent with the request {req}")
        out = first
    lo, hi = p["lo"][fields.index("slices")], p["hi"][fields.index("slices")]
    out["slices"] = int(round(min(max(out["slices"], lo), hi)))
    out.update(_efs(out))
    out["dx"] = dx
    es = priors.get("es_phase")
    if req.get("es_phase") is not None:
        out["es_phase"] = float(req["es_phase"])
    elif es:   # drawn last: the measures above come out the same with or without an ES phase prior
        q = es["dx"].get(dx, es["all"]) if dx else es["all"]
        out["es_phase"] = float(np.clip(rng.normal(q["mean"], q["sd"]), q["lo"], q["hi"]))
    return out


def _efs(values) -> dict:
    return {f"{side}ef": ejection_fraction(values[f"{side}edv"], values[f"{side}esv"]) for side in ("lv", "rv")}
