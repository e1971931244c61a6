"""The generation chain's pieces that are pure math: keyframe interpolation along the cycle."""
import math

import torch

from synth4d.nets.pipeline import periodic_interpolate


def test_interpolation_passes_through_the_keys_and_wraps_around():
    keys = torch.randn(8, 3, 2)
    at_keys = periodic_interpolate(keys, [k / 8 for k in range(8)])
    torch.testing.assert_close(at_keys, keys)
    # Just before phase 1 the curve returns to the value at phase 0: the cycle is closed.
    torch.testing.assert_close(periodic_interpolate(keys, [1 - 1e-6])[0], keys[0], atol=1e-4, rtol=0)


def test_a_smooth_cycle_comes_back_from_twelve_keys():
    curve = lambda p: 1 + 0.5 * math.cos(2 * math.pi * p) + 0.2 * math.sin(4 * math.pi * p)  # noqa: E731
    keys = torch.tensor([curve(k / 12) for k in range(12)])
    phases = [t / 30 for t in range(30)]
    got = periodic_interpolate(keys, phases)
    want = torch.tensor([curve(p) for p in phases])
    assert (got - want).abs().max() < 0.02
    # Linear interpolation between the same keys is clearly worse: the cubic is doing real work.
    linear = torch.tensor([keys[int(p * 12)] * (1 - (p * 12 % 1)) + keys[(int(p * 12) + 1) % 12] * (p * 12 % 1)
                           for p in phases])
    assert (linear - want).abs().max() > 2 * (got - want).abs().max()


def _motion_chain():
    """A Generator4D around a randomised tiny motion UNet (the static net and VAE are not used here)."""
    from synth4d.nets.config import UNetConfig
    from synth4d.nets.diffusion import make_schedule
    from synth4d.nets.pipeline import Generator4D
    from synth4d.nets.unet import UNet
    cfg = UNetConfig(in_ch=2, out_ch=2, ctx_ch=3, widths=(8, 16), down=((2, 2, 1),), attn=(False, True), blocks=1,
                     emb_dim=16, heads=2, dx_vocab=("NOR",), scalars=("lvef",), phase=True)
    torch.manual_seed(0)
    motion = UNet(cfg)
    with torch.no_grad():
        for p in motion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Generator4D(None, motion.eval(), motion.eval(), make_schedule("cosine"), 1.0, 2.0, (4, 4, 3),
                       {}, {"lvef": (50.0, 10.0)}, None, {})


def test_ed_frames_are_not_sampled_and_the_others_do_not_notice():
    chain = _motion_chain()
    z_ed = torch.randn(1, 2, 4, 4, 3)
    cond = {"dx": torch.tensor([0]), "scalars": torch.tensor([[0.5]]), "present": torch.tensor([[True]])}
    run = lambda phases: chain.sample_motion(z_ed, 3, cond, phases, torch.Generator().manual_seed(3), 4, 2.0)  # noqa: E731
    calls = []
    chain.motion.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with_ed, without = run([0.0, 0.25, 0.5, 0.75]), run([0.25, 0.5, 0.75])
    assert calls == [2 * 3] * 8       # cond + uncond of the three non-ED frames, 4 steps, both runs
    assert torch.equal(with_ed[0], z_ed[0])                               # ED: the anatomy itself
    torch.testing.assert_close(with_ed[1:], without, atol=1e-5, rtol=0)   # each frame's own DDIM path
    assert (without - z_ed).flatten(1).abs().amax(dim=1).min() > 0.01     # and every other frame moves


def test_generation_gives_the_motion_model_the_training_context():
    """The motion net sees motion_context(z_ED, slices), the function the training batches use (train.motion)."""
    from synth4d.nets.conditions import motion_context
    chain = _motion_chain()
    z_ed = torch.randn(1, 2, 4, 4, 3)
    cond = {"dx": torch.tensor([0]), "scalars": torch.tensor([[0.5]]), "present": torch.tensor([[True]])}
    seen = []
    chain.motion.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["ctx"]), with_kwargs=True)
    chain.sample_motion(z_ed, 2, cond, [0.5], torch.Generator().manual_seed(3), 2, 1.0)
    assert len(seen) == 2 and all(torch.equal(c, motion_context(z_ed, 2)) for c in seen)
