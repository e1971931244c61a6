"""The per-diagnosis prior: fitting, conditional drawing and the refusal of impossible requests."""
import numpy as np
import pytest

from synth4d.cine import UserError
from synth4d.cine.priors import check_request, draw, fit_es_phase, fit_priors, warp_phases


GROUPS = (("NOR", 140, 65), ("DCM", 270, 28), ("HCM", 110, 72))   # dx, mean LVEDV (mL), mean LVEF (%)


def _records(n=30, seed=0, groups=GROUPS):
    rng = np.random.default_rng(seed)
    out = []
    for dx, edv, ef in groups:
        for _ in range(n):
            e = edv * np.exp(rng.normal(0, 0.12))
            f = ef + rng.normal(0, 3)
            rv = e * np.exp(rng.normal(0.05, 0.05))
            out.append(dict(dx=dx, lvedv=e, lvesv=e * (1 - f / 100), rvedv=rv, rvesv=rv * 0.45, lv_mass=0.8 * e,
                            slices=float(rng.integers(8, 13)), slice_mm=8.0 + rng.random(), rr_ms=900.0))
    return out


def test_draw_follows_the_diagnosis():
    priors = fit_priors(_records())
    rng = np.random.default_rng(1)
    dcm = [draw(priors, {"dx": "DCM"}, rng) for _ in range(200)]
    hcm = [draw(priors, {"dx": "HCM"}, rng) for _ in range(200)]
    assert 230 < np.mean([d["lvedv"] for d in dcm]) < 310
    assert np.mean([d["lvef"] for d in dcm]) < 35 < 65 < np.mean([d["lvef"] for d in hcm])
    assert all(d["lvesv"] < d["lvedv"] and d["rvesv"] < d["rvedv"] for d in dcm + hcm)
    assert all(8 <= d["slices"] <= 12 and isinstance(d["slices"], int) for d in dcm)


def test_drawn_values_meet_the_diagnosis_criteria():
    from synth4d.cine.diagnosis import volumes_fit
    # Groups near their criteria's edges (NOR: LVEF >= 50, DCM: LVEDV > 190, HCM: LVEF > 55).
    priors = fit_priors(_records(groups=(("NOR", 140, 55), ("DCM", 215, 28), ("HCM", 110, 60))))
    fields, rng = priors["fields"], np.random.default_rng(4)
    for dx in ("NOR", "DCM", "HCM"):
        # The fitted Gaussian itself reaches past the group's criteria ...
        p = priors["dx"][dx]
        raw = np.exp(rng.multivariate_normal(p["mean"], p["cov"], size=2000))
        m = {f: raw[:, i] for i, f in enumerate(fields)}
        ef = {s: 100 * (m[f"{s}edv"] - m[f"{s}esv"]) / m[f"{s}edv"] for s in ("lv", "rv")}
        outside = np.mean([not volumes_fit(dx, {"lvedv": m["lvedv"][j], "rvedv": m["rvedv"][j], "lvef": ef["lv"][j],
                                                "rvef": ef["rv"][j]}) for j in range(2000)])
        assert outside > 0.03, dx
        # ... the drawn requests do not.
        assert all(volumes_fit(dx, draw(priors, {"dx": dx}, rng)) for _ in range(300)), dx


def test_given_values_are_kept_and_pull_the_rest():
    priors = fit_priors(_records())
    rng = np.random.default_rng(2)
    big = [draw(priors, {"dx": "NOR", "lvedv": 200.0}, rng) for _ in range(100)]
    small = [draw(priors, {"dx": "NOR", "lvedv": 100.0}, rng) for _ in range(100)]
    assert all(d["lvedv"] == 200.0 for d in big)
    # RVEDV and mass are correlated with LVEDV in the data: conditioning must carry that over.
    assert np.mean([d["rvedv"] for d in big]) > np.mean([d["rvedv"] for d in small]) + 50
    assert np.mean([d["lv_mass"] for d in big]) > np.mean([d["lv_mass"] for d in small]) + 40


def test_ejection_fraction_requests():
    priors = fit_priors(_records())
    rng = np.random.default_rng(3)
    d = draw(priors, {"dx": "HCM", "lvef": 40.0}, rng)
    assert d["lvef"] == pytest.approx(40.0)
    d = draw(priors, {"dx": "NOR", "lvedv": 150.0, "lvef": 50.0}, rng)
    assert d["lvesv"] == pytest.approx(75.0) and d["lvedv"] == 150.0
    d = draw(priors, {"dx": "NOR", "lvesv": 60.0, "lvef": 60.0}, rng)
    assert d["lvedv"] == pytest.approx(150.0)


def test_draw_is_reproducible_and_unknown_dx_uses_the_mix():
    priors = fit_priors(_records())
    a = draw(priors, {}, np.random.default_rng(7))
    b = draw(priors, {}, np.random.default_rng(7))
    assert a == b and a["dx"] in ("NOR", "DCM", "HCM")


@pytest.mark.parametrize("req, words", [
    ({"lvedv": -5.0}, "positive"),
    ({"lvef": 120.0}, "between 0 and 100"),
    ({"lvedv": 100.0, "lvesv": 120.0}, "smaller than"),
    ({"rvedv": 100.0, "rvesv": 100.0}, "smaller than"),
    ({"lvedv": 100.0, "lvesv": 50.0, "lvef": 20.0}, "disagree"),
    ({"dx": "XYZ"}, "unknown diagnosis"),
    ({"es_phase": 0.9}, "es_phase must be between"),
    ({"es_phase": 0.05}, "es_phase must be between"),
])
def test_impossible_requests_are_refused(req, words):
    with pytest.raises(UserError, match=words):
        check_request(req, ["NOR", "DCM"])


def test_fit_needs_data():
    with pytest.raises(UserError):
        fit_priors(_records(n=1)[:1])


def _with_es(records, seed=0):
    """records with an ES phase: DCM's later and wider than the others' (a made-up difference to find)."""
    rng = np.random.default_rng(seed)
    return [{**r, "es_phase": rng.normal(0.42, 0.04) if r["dx"] == "DCM" else rng.normal(0.33, 0.02)} for r in records]


def test_es_phase_prior_fitted_per_diagnosis():
    records = _with_es(_records(n=40))
    es = fit_priors(records)["es_phase"]
    ref = np.array([r["es_phase"] for r in records if r["dx"] == "DCM"])
    assert es["dx"]["DCM"]["mean"] == pytest.approx(ref.mean()) and es["dx"]["DCM"]["sd"] == pytest.approx(ref.std(ddof=1))
    assert es["dx"]["DCM"]["lo"] == ref.min() and es["dx"]["DCM"]["hi"] == ref.max()
    assert es["anchor"] == pytest.approx(np.mean([r["es_phase"] for r in records]))   # until measured on a model
    assert "es_phase" not in fit_priors(_records(n=40))                                # data without ES: no prior
    few = fit_es_phase(records[:40] + records[40:43])   # 3 DCM subjects: the pooled figures, with their own n
    assert few["dx"]["DCM"]["n"] == 3 and few["dx"]["DCM"]["mean"] == few["all"]["mean"]


def test_es_phase_drawn_last_and_within_the_training_range():
    records = _with_es(_records(n=40))
    with_es, without = fit_priors(records), fit_priors(_records(n=40))
    a = [draw(with_es, {"dx": "DCM"}, np.random.default_rng(i)) for i in range(200)]
    b = [draw(without, {"dx": "DCM"}, np.random.default_rng(i)) for i in range(200)]
    # The measures of a seed do not change when the weights gain an ES phase prior.
    assert all({k: v for k, v in x.items() if k != "es_phase"} == y for x, y in zip(a, b))
    phases = np.array([x["es_phase"] for x in a])
    q = with_es["es_phase"]["dx"]["DCM"]
    assert q["lo"] <= phases.min() and phases.max() <= q["hi"]
    assert abs(phases.mean() - q["mean"]) < 0.01 and 0.7 * q["sd"] < phases.std() < 1.1 * q["sd"]
    hcm = np.array([draw(with_es, {"dx": "HCM"}, np.random.default_rng(i))["es_phase"] for i in range(200)])
    assert hcm.mean() < phases.mean() - 0.05
    assert draw(with_es, {"dx": "NOR", "es_phase": 0.5}, np.random.default_rng(0))["es_phase"] == 0.5


def test_warp_phases_moves_the_model_es_onto_the_asked_one():
    T = 30
    out = np.arange(T) / T
    warped = np.array(warp_phases(out, es_phase=0.4, anchor=1 / 3))
    assert warped[0] == 0 and np.all(np.diff(warped) > 0) and warped[-1] < 1      # monotone, ED stays ED
    assert warped[12] == pytest.approx(1 / 3)                                      # output frame 12 (0.4) is the model's ES
    assert np.allclose(warp_phases(out, 1 / 3, 1 / 3), out)                        # no warp when they agree
    # Frames before ES share out the model's systole evenly, those after its diastole.
    assert np.allclose(np.diff(warped[:13]), (1 / 3) / 12) and np.allclose(np.diff(warped[12:]), (2 / 3) / 18)
