"""The shared UNet denoiser on tiny configs with odd latent sizes (B, C, X, Y, Z) = (B, 2, 6, 10, 5)."""
import dataclasses

import torch

from synth4d.nets.config import UNetConfig
from synth4d.nets.layers import Attention, Downsample, Pointwise, ResBlock, Upsample
from synth4d.nets.conditions import null_conditions
from synth4d.nets.unet import UNet

SHAPE = (2, 6, 10, 5)  # (C, X, Y, Z): Y and Z not divisible by the factors below
CFG = UNetConfig(in_ch=2, out_ch=2, widths=(8, 16), down=((2, 2, 1),), attn=(False, True), blocks=1,
                 emb_dim=16, heads=2, dx_vocab=("NOR", "DCM"), scalars=("lvedv", "rvedv"))


def make(cfg=CFG, seed=0, randomise=True):
    """A UNet whose zero-initialised layers are perturbed, so every path reaches the output."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(B=2, cfg=CFG, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_ch, *SHAPE[1:], generator=g)
    t = torch.rand(B, generator=g) * 1000
    S = len(cfg.scalars)
    cond = dict(dx=torch.randint(0, len(cfg.dx_vocab) + 1, (B,), generator=g),
                scalars=torch.randn(B, S, generator=g), present=torch.ones(B, S, dtype=torch.bool))
    if cfg.phase:
        cond["phase"] = torch.rand(B, generator=g)
    return x, t, cond


def test_layers_shapes_and_identity_at_init():
    x = torch.randn(2, 8, 5, 6, 3)
    assert ResBlock(8, 16, emb_dim=4)(x, torch.randn(2, 4)).shape == (2, 16, 5, 6, 3)
    assert Downsample(8, (2, 2, 1))(x).shape == (2, 8, 3, 3, 3)
    assert Upsample(8, (2, 2, 2))(x).shape == (2, 8, 10, 12, 6)
    assert torch.equal(Attention(8, 2)(x), x)
    assert torch.equal(ResBlock(8, 8)(x), x)


def test_pointwise_equals_a_1x1x1_conv_and_keeps_the_channels_last_layout():
    torch.manual_seed(0)
    conv, point = torch.nn.Conv3d(6, 5, 1), Pointwise(6, 5)
    point.load_state_dict(conv.state_dict())                 # the same parameters, so old checkpoints load
    assert point.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 6, 5, 7, 3)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        xl = x.to(memory_format=layout).requires_grad_()
        y = point(xl)
        torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-6)
        assert y.is_contiguous(memory_format=layout)
        y.square().sum().backward()
        (gw,) = torch.autograd.grad(conv(x).square().sum(), conv.weight)
        torch.testing.assert_close(point.weight.grad, gw, rtol=1e-4, atol=1e-5)
        point.zero_grad()


def test_output_shape_matches_odd_input():
    x, t, cond = inputs()
    assert make()(x, t, cond).shape == x.shape
    cfg = dataclasses.replace(CFG, widths=(8, 8, 16), down=((2, 2, 1), (2, 2, 2)), attn=(False, False, True))
    x, t, cond = inputs(cfg=cfg)
    assert make(cfg)(x, t, cond).shape == x.shape


def test_zero_at_init_and_not_after_one_step():
    model = make(randomise=False).train()
    x, t, cond = inputs()
    assert torch.count_nonzero(model(x, t, cond)) == 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (model(x, t, cond) - torch.randn_like(x)).square().mean().backward()
    opt.step()
    assert model(x, t, cond).abs().max() > 0


def test_conditions_and_timestep_change_the_output():
    model = make()
    x, t, cond = inputs()
    with torch.no_grad():
        ref = model(x, t, cond)
        other_dx = {**cond, "dx": (cond["dx"] + 1) % 3}
        other_scalar = {**cond, "scalars": cond["scalars"] + torch.tensor([1.0, 0.0])}
        assert not torch.allclose(model(x, t, other_dx), ref)
        assert not torch.allclose(model(x, t, other_scalar), ref)
        assert not torch.allclose(model(x, t + 100, cond), ref)
        assert not torch.allclose(model(x, t, null_conditions(cond, len(CFG.dx_vocab))), ref)


def test_absent_scalar_value_is_ignored():
    model = make()
    x, t, cond = inputs()
    cond["present"][:, 1] = False
    changed = {**cond, "scalars": cond["scalars"].clone()}
    changed["scalars"][:, 1] = torch.tensor([5.0, float("nan")])
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), model(x, t, changed))
    model(x, t, changed).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        # ...while the same change to a present scalar does matter.
        changed["scalars"][:, 1] = 5.0
        cond["present"][:, 1] = True
        changed["present"] = cond["present"]
        assert not torch.allclose(model(x, t, cond), model(x, t, changed))


def test_phase_is_periodic():
    cfg = dataclasses.replace(CFG, phase=True)
    model = make(cfg)
    x, t, cond = inputs(cfg=cfg)
    with torch.no_grad():
        ref = model(x, t, cond)
        torch.testing.assert_close(model(x, t, {**cond, "phase": cond["phase"] + 1.0}), ref, atol=1e-4, rtol=0)
        assert not torch.allclose(model(x, t, {**cond, "phase": cond["phase"] + 0.3}), ref)


def test_ctx_channels_are_used():
    cfg = dataclasses.replace(CFG, ctx_ch=3)
    model = make(cfg)
    x, t, cond = inputs(cfg=cfg)
    ctx = torch.randn(2, 3, *SHAPE[1:])
    with torch.no_grad():
        assert model(x, t, cond, ctx=ctx).shape == x.shape
        assert not torch.allclose(model(x, t, cond, ctx=ctx), model(x, t, cond, ctx=ctx + 1))
