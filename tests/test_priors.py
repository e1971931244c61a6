"""The per-diagnosis prior: fitting, conditional drawing and the refusal of impossible requests."""
import numpy as np
import pytest

from synth4d.cine import UserError
from synth4d.cine.priors import check_request, draw, fit_priors


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
])
def test_impossible_requests_are_refused(req, words):
    with pytest.raises(UserError, match=words):
        check_request(req, ["NOR", "DCM"])


def test_fit_needs_data():
    with pytest.raises(UserError):
        fit_priors(_records(n=1)[:1])
