"""The generation chain's pieces that are pure math: keyframe interpolation along the cycle."""
import math

import torch

from nets.pipeline import periodic_interpolate


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
