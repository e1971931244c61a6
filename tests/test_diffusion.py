"""Schedules, forward noising, losses and the DDIM sampler, checked against independent numpy formulas and a
closed-form optimal denoiser for Gaussian data. Tensors are (B, D): the sampler does not care about X, Y, Z."""
import math

import numpy as np
import pytest
import torch

from nets.diffusion import (ddim_sample, ddim_timesteps, diffusion_loss, make_schedule, pred_to_x0_eps, q_sample,
                            sample_timesteps, timestep_buckets, v_target)


def test_schedules_match_their_formulas():
    T = 1000
    lin = make_schedule("linear", T)
    np.testing.assert_allclose(lin.betas.numpy(), np.linspace(1e-4, 0.02, T), rtol=1e-12)
    np.testing.assert_allclose(lin.alphas_cumprod.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, T)), rtol=1e-12)
    sl = make_schedule("scaled_linear", T)
    np.testing.assert_allclose(sl.betas.numpy(), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2, rtol=1e-12)

    cos = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    np.testing.assert_allclose(cos.betas.numpy(), betas, rtol=1e-10)
    # Away from the clipped end, alphas_cumprod is the closed form f(t + 1) / f(0) (Nichol & Dhariwal Eq. 17).
    np.testing.assert_allclose(cos.alphas_cumprod[:-1].numpy(), [f(t + 1) / f(0) for t in range(T - 1)], rtol=1e-8)
    assert cos.betas[-1] == 0.999 and cos.betas.dtype == torch.float64 and cos.n_steps == T
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("quadratic")


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_marginal(t):
    sched = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    mu, s, N = 2.0, 0.5, 200_000
    x0 = mu + s * torch.randn(N, 1, generator=g)
    x_t = q_sample(x0, torch.full((N,), t), torch.randn(N, 1, generator=g), sched)
    abar = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[: t + 1])
    assert abs(x_t.mean() - math.sqrt(abar) * mu) < 0.01
    assert abs(x_t.var() / (abar * s ** 2 + 1 - abar) - 1) < 0.02


def test_predictions_convert_back_to_x0_and_eps():
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    t = torch.tensor([0, 10, 500, 900, 990])
    x_t = q_sample(x0, t, eps, sched)
    for pred, out in (("eps", eps), ("v", v_target(x0, eps, t, sched))):
        x0_pred, eps_pred = pred_to_x0_eps(x_t, t, out, sched, pred)
        torch.testing.assert_close(x0_pred, x0, atol=2e-3, rtol=0)  # eps -> x0 divides by sqrt(abar) near t = T
        torch.testing.assert_close(eps_pred, eps, atol=1e-5, rtol=0)
    abar = sched.alphas_cumprod[t].float()[:, None, None]
    torch.testing.assert_close(v_target(x0, eps, t, sched), abar.sqrt() * eps - (1 - abar).sqrt() * x0)


def test_loss_is_per_sample_and_min_snr_weighted():
    sched = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    t = torch.tensor([5, 400, 999])
    out = torch.zeros_like(x0)
    for pred, target in (("eps", eps), ("v", v_target(x0, eps, t, sched))):
        plain = diffusion_loss(out, x0, eps, t, sched, pred)
        torch.testing.assert_close(plain, target.square().mean((1, 2)))
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
        snr = abar / (1 - abar)
        weight = np.minimum(snr, 5.0) / (snr if pred == "eps" else snr + 1)
        weighted = diffusion_loss(out, x0, eps, t, sched, pred, weighting="min_snr")
        np.testing.assert_allclose(weighted.numpy(), plain.numpy() * weight, rtol=1e-5)
        assert diffusion_loss(target, x0, eps, t, sched, pred).abs().max() == 0
    with pytest.raises(ValueError):
        diffusion_loss(out, x0, eps, t, sched, "x0")
    with pytest.raises(ValueError):
        diffusion_loss(out, x0, eps, t, sched, "eps", weighting="min_snr_v")


def test_min_snr_v_keeps_the_noisiest_steps():
    """min_snr_v: the v loss unchanged while SNR + 1 <= gamma, capped above; min_snr would drop t = T."""
    sched = make_schedule("cosine")
    t = torch.tensor([0, 500, 900, 999])
    x0, eps = torch.ones(4, 3), torch.zeros(4, 3)
    out = torch.zeros_like(x0)
    plain = diffusion_loss(out, x0, eps, t, sched, "v")
    abar = sched.alphas_cumprod[t].numpy()
    snr = abar / (1 - abar)
    expected = plain.numpy() * np.minimum(snr + 1, 5.0) / (snr + 1)
    got = diffusion_loss(out, x0, eps, t, sched, "v", weighting="min_snr_v")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert got[3] > 0.99 * plain[3]                                          # zero SNR: full weight
    assert diffusion_loss(out, x0, eps, t, sched, "v", weighting="min_snr")[3] < 1e-3 * plain[3]


def test_timesteps_and_buckets():
    sched = make_schedule("cosine")
    t = sample_timesteps(5000, sched, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 1000 and t.float().std() > 250
    assert torch.equal(t, sample_timesteps(5000, sched, torch.Generator().manual_seed(0)))
    assert timestep_buckets(torch.tensor([0, 249, 250, 500, 999]), sched).tolist() == [0, 0, 1, 2, 3]
    steps = ddim_timesteps(sched, 25)
    assert steps[0] == 999 and len(set(steps)) == 25 and steps == sorted(steps, reverse=True)


def toy_model(x, t, cond):
    """Output depends on x, t and both condition tensors per sample, so a batch mix-up changes the result."""
    return 0.3 * x + cond["a"][:, None] * (t[:, None] / 1000.0) + cond["b"]


def conds(B, g):
    return {"a": torch.randn(B, generator=g), "b": torch.randn(B, 3, generator=g)}


def test_ddim_is_deterministic():
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x_T, cond = torch.randn(4, 3, generator=g), conds(4, g)
    run = lambda **kw: ddim_sample(toy_model, x_T, sched, steps=10, cond=cond, **kw)  # noqa: E731
    assert torch.equal(run(), run())
    same = [run(eta=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    other = run(eta=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(same[0], same[1]) and not torch.allclose(same[0], other)
    assert not torch.allclose(same[0], run())


def test_guidance():
    sched = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    x_T, cond, uncond = torch.randn(4, 3, generator=g), conds(4, g), conds(4, g)
    batches = []

    def counting(x, t, c):
        batches.append(x.shape[0])
        return toy_model(x, t, c)

    plain = ddim_sample(toy_model, x_T, sched, steps=8, cond=cond)
    assert torch.equal(ddim_sample(counting, x_T, sched, steps=8, guidance=1.0, cond=cond, uncond=uncond), plain)
    assert batches == [4] * 8
    batches.clear()
    guided = ddim_sample(counting, x_T, sched, steps=8, guidance=3.0, cond=cond, uncond=uncond)
    assert batches == [8] * 8
    def by_hand(x, t, _):
        return toy_model(x, t, uncond) + 3.0 * (toy_model(x, t, cond) - toy_model(x, t, uncond))

    torch.testing.assert_close(guided, ddim_sample(by_hand, x_T, sched, steps=8))
    assert not torch.allclose(guided, plain)
    with pytest.raises(ValueError, match="uncond"):
        ddim_sample(toy_model, x_T, sched, guidance=2.0, cond=cond)


def test_callback_and_clip():
    sched = make_schedule("cosine")
    calls = []
    far = lambda x, t, c: -10 * torch.ones_like(x)  # noqa: E731  an eps that implies a huge x0
    x0 = ddim_sample(far, torch.randn(2, 3), sched, steps=6, pred="eps", clip_x0=1.0,
                     callback=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 6) for i in range(6)] and x0.abs().max() <= 1.0


MU = torch.tensor([1.0, -2.0, 0.5])
STD = torch.tensor([0.8, 1.5, 2.0])


def gaussian_denoiser(mu, std, sched, pred):
    """The exact E[x0 | x_t] for x0 ~ N(mu, std^2) per dimension, returned as the eps or v it implies."""
    def model_fn(x, t, cond):
        abar = sched.alphas_cumprod[t].float()[:, None]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        x0 = mu + a * std ** 2 / (a ** 2 * std ** 2 + b ** 2) * (x - a * mu)
        eps = (x - a * x0) / b
        return eps if pred == "eps" else a * eps - b * x0
    return model_fn


def matches_data(x0):
    """Sample mean within 5% of a standard deviation and standard deviation within 6% of the data's.
    50-step DDIM itself undershoots the std by 2.5-4% here (it shrinks with more steps)."""
    return bool(((x0.mean(0) - MU).abs() < 0.05 * STD).all() and ((x0.std(0) / STD - 1).abs() < 0.06).all())


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ddim_with_the_optimal_denoiser_recovers_gaussian_data(kind, pred):
    sched = make_schedule(kind)
    x_T = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0))
    x0 = ddim_sample(gaussian_denoiser(MU, STD, sched, pred), x_T, sched, steps=50, pred=pred)
    assert matches_data(x0)
    # The same check rejects a denoiser that assumes unit data variance...
    unit_var = gaussian_denoiser(MU, torch.ones(3), sched, pred)
    assert not matches_data(ddim_sample(unit_var, x_T, sched, steps=50, pred=pred))
    # ...and the sampler reading the output in the other parameterisation.
    wrong_pred = "v" if pred == "eps" else "eps"
    assert not matches_data(ddim_sample(gaussian_denoiser(MU, STD, sched, pred), x_T, sched, steps=50, pred=wrong_pred))
