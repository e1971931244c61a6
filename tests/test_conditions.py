"""Conditions (nets.conditions): request values to tensors, guidance dropout, the motion context."""
import torch

from synth4d.nets.conditions import cond_tensors, drop_conditions, motion_context, normaliser, null_conditions


def test_condition_tensors_mark_what_is_absent():
    norm = {"lvedv": (150.0, 50.0), "rvedv": (140.0, 40.0)}
    cond = cond_tensors([{"dx": "HCM", "lvedv": 200.0}, {"dx": None, "rvedv": 100.0, "lvedv": None}],
                        norm, ["DCM", "HCM"])
    assert cond["dx"].tolist() == [1, 2]  # 2 = the null token
    assert cond["present"].tolist() == [[True, False], [False, True]]
    assert cond["scalars"].tolist() == [[1.0, 0.0], [0.0, -1.0]]


def test_normaliser_uses_only_present_values():
    rows = [{"lvedv": 100.0}, {"lvedv": 200.0, "rvedv": None}, {}]
    norm = normaliser(rows, ("lvedv", "rvedv"))
    assert norm["lvedv"] == (150.0, 50.0) and norm["rvedv"] == (0.0, 1.0)
    assert normaliser([{"x": 3.0}, {"x": 3.0}], ("x",))["x"] == (3.0, 1e-3)  # std floored


def test_motion_context_is_the_latent_and_a_slice_mask():
    z = torch.randn(2, 4, 5, 5, 6)
    ctx = motion_context(z, 4)
    assert ctx.shape == (2, 5, 5, 5, 6) and torch.equal(ctx[:, :4], z)
    assert (ctx[:, 4, ..., :4] == 1).all() and (ctx[:, 4, ..., 4:] == 0).all()


def test_drop_conditions():
    B = 4000
    cond = dict(dx=torch.zeros(B, dtype=torch.long), scalars=torch.randn(B, 2),
                present=torch.ones(B, 2, dtype=torch.bool), phase=torch.rand(B))
    g = torch.Generator().manual_seed(0)
    dropped = drop_conditions(cond, 2, p_all=0.1, p_each=0.2, generator=g)
    null = dropped["dx"] == 2
    all_gone = null & ~dropped["present"].any(1)
    # P(dx null) = 0.1 + 0.9 * 0.2; P(everything dropped) = 0.1 + 0.9 * 0.2 ** 3
    assert abs(null.float().mean() - 0.28) < 0.03
    assert abs(all_gone.float().mean() - 0.1072) < 0.02
    assert torch.equal(dropped["phase"], cond["phase"]) and torch.equal(dropped["scalars"], cond["scalars"])
    again = drop_conditions(cond, 2, 0.1, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["present"], dropped["present"]) and torch.equal(again["dx"], dropped["dx"])
    none = null_conditions(cond, 2)
    assert (none["dx"] == 2).all() and not none["present"].any() and torch.equal(none["phase"], cond["phase"])
