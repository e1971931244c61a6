"""Schedules, forward noising, losses and the DDIM sampler, checked against independent numpy formulas and a
closed-form optimal denoiser for Gaussian data. Tensors are (B, D): the sampler does not care about X, Y, Z."""
import math

import numpy as np
import pytest
import torch

from synth4d.nets.diffusion import (_unipc_weights, ddim_sample, ddim_timesteps, diffusion_loss, dpmpp_2m_sample,
                                    make_schedule, min_snr_v_weight, pred_to_x0_eps, q_sample, timestep_buckets,
                                    unipc_sample, v_target)


def cosine_abar(t, T=1000):
    """alphas_cumprod of the cosine schedule in numpy, from its betas (Nichol & Dhariwal Eq. 17, betas <= 0.999)."""
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.cumprod([1 - min(1 - f(s + 1) / f(s), 0.999) for s in range(T)])[t]


def test_schedule_matches_its_formula():
    T = 1000
    cos = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    np.testing.assert_allclose(cos.betas.numpy(), betas, rtol=1e-10)
    # Away from the clipped end, alphas_cumprod is the closed form f(t + 1) / f(0) (Nichol & Dhariwal Eq. 17).
    np.testing.assert_allclose(cos.alphas_cumprod[:-1].numpy(), [f(t + 1) / f(0) for t in range(T - 1)], rtol=1e-8)
    assert cos.betas[-1] == 0.999 and cos.betas.dtype == torch.float64 and cos.n_steps == T
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("linear")


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_marginal(t):
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    mu, s, N = 2.0, 0.5, 200_000
    x0 = mu + s * torch.randn(N, 1, generator=g)
    x_t = q_sample(x0, torch.full((N,), t), torch.randn(N, 1, generator=g), sched)
    abar = cosine_abar(t)
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


def test_loss_is_per_sample():
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    t = torch.tensor([5, 400, 999])
    out = torch.zeros_like(x0)
    for pred, target in (("eps", eps), ("v", v_target(x0, eps, t, sched))):
        torch.testing.assert_close(diffusion_loss(out, x0, eps, t, sched, pred), target.square().mean((1, 2)))
        assert diffusion_loss(target, x0, eps, t, sched, pred).abs().max() == 0
    with pytest.raises(ValueError):
        diffusion_loss(out, x0, eps, t, sched, "x0")


def test_min_snr_v_keeps_the_noisiest_steps():
    """min(SNR + 1, 5) / (SNR + 1): 1 while SNR + 1 <= 5 (the noisy steps, zero SNR included), capped above;
    Hang et al.'s min(SNR, 5) / (SNR + 1) on the v loss would give t = T no weight at all."""
    sched = make_schedule("cosine")
    t = torch.tensor([0, 500, 900, 999])
    snr = cosine_abar(t.numpy()) / (1 - cosine_abar(t.numpy()))
    w = min_snr_v_weight(t, sched)
    np.testing.assert_allclose(w.numpy(), np.minimum(snr + 1, 5.0) / (snr + 1), rtol=1e-8)
    assert w[3] == 1.0 and w[2] == 1.0 and w[0] < 0.01                       # zero SNR: full weight
    assert np.minimum(snr, 5.0)[3] / (snr[3] + 1) < 1e-3                      # what min-SNR would give there


def test_timesteps_and_buckets():
    sched = make_schedule("cosine")
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
    run = lambda: ddim_sample(toy_model, x_T, sched, steps=10, cond=cond)  # noqa: E731
    assert torch.equal(run(), run())


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample, unipc_sample], ids=["ddim", "dpmpp_2m", "unipc"])
def test_guidance(sampler):
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x_T, cond, uncond = torch.randn(4, 3, generator=g), conds(4, g), conds(4, g)
    batches = []

    def counting(x, t, c):
        batches.append(x.shape[0])
        return toy_model(x, t, c)

    plain = sampler(toy_model, x_T, sched, steps=8, cond=cond)
    assert torch.equal(sampler(counting, x_T, sched, steps=8, guidance=1.0, cond=cond, uncond=uncond), plain)
    assert batches == [4] * 8
    batches.clear()
    guided = sampler(counting, x_T, sched, steps=8, guidance=3.0, cond=cond, uncond=uncond)
    assert batches == [8] * 8
    def by_hand(x, t, _):
        return toy_model(x, t, uncond) + 3.0 * (toy_model(x, t, cond) - toy_model(x, t, uncond))

    torch.testing.assert_close(guided, sampler(by_hand, x_T, sched, steps=8))
    assert not torch.allclose(guided, plain)
    with pytest.raises(ValueError, match="uncond"):
        sampler(toy_model, x_T, sched, guidance=2.0, cond=cond)


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample, unipc_sample], ids=["ddim", "dpmpp_2m", "unipc"])
def test_guidance_on_the_first_steps_only(sampler):
    """guided_steps = k: the first k (noisiest) steps are guided, batched cond + uncond, the others run the
    conditional branch alone; k = steps (or None) is full guidance, k = 0 none."""
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(1)
    x_T, cond, uncond = torch.randn(4, 3, generator=g), conds(4, g), conds(4, g)
    batches, levels = [], []

    def counting(x, t, c):
        batches.append(x.shape[0])
        return toy_model(x, t, c)

    run = lambda fn, **kw: sampler(fn, x_T, sched, steps=8, guidance=3.0, cond=cond, uncond=uncond, **kw)  # noqa: E731
    part = run(counting, guided_steps=3)
    assert batches == [8] * 3 + [4] * 5

    def by_hand(x, t, _):   # guided while t is one of the first three levels of the grid
        levels.append(int(t[0]))
        guided = len(set(levels)) <= 3
        out = toy_model(x, t, cond)
        return toy_model(x, t, uncond) + 3.0 * (out - toy_model(x, t, uncond)) if guided else out

    torch.testing.assert_close(part, sampler(by_hand, x_T, sched, steps=8))
    assert torch.equal(run(toy_model, guided_steps=8), run(toy_model))
    assert torch.equal(run(toy_model, guided_steps=0), sampler(toy_model, x_T, sched, steps=8, cond=cond))
    assert not torch.allclose(part, run(toy_model)) and not torch.allclose(part, run(toy_model, guided_steps=0))


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


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ddim_with_the_optimal_denoiser_recovers_gaussian_data(pred):
    sched = make_schedule("cosine")
    x_T = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0))
    x0 = ddim_sample(gaussian_denoiser(MU, STD, sched, pred), x_T, sched, steps=50, pred=pred)
    assert matches_data(x0)
    # The same check rejects a denoiser that assumes unit data variance...
    unit_var = gaussian_denoiser(MU, torch.ones(3), sched, pred)
    assert not matches_data(ddim_sample(unit_var, x_T, sched, steps=50, pred=pred))
    # ...and the sampler reading the output in the other parameterisation.
    wrong_pred = "v" if pred == "eps" else "eps"
    assert not matches_data(ddim_sample(gaussian_denoiser(MU, STD, sched, pred), x_T, sched, steps=50, pred=wrong_pred))


def exact_ode_solution(x_T, sched):
    """Where the probability-flow ODE takes x_T (at t = T - 1) for Gaussian data N(MU, STD^2) per dimension: its
    marginals are N(alpha_t MU, alpha_t^2 STD^2 + sigma_t^2) and the flow keeps each sample's standardised value."""
    abar = float(sched.alphas_cumprod[-1])
    z = (x_T - math.sqrt(abar) * MU.double()) / torch.sqrt(abar * STD.double() ** 2 + 1 - abar)
    return MU.double() + STD.double() * z


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_dpmpp_2m_solves_the_probability_flow_ode_to_second_order(pred):
    """Against the exact solution: DPM-Solver++(2M) in 15 steps is closer than DDIM in 25, and doubling its steps
    cuts its error about four times (second order), where DDIM's only halves (first order)."""
    sched = make_schedule("cosine")
    x_T = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact, model = exact_ode_solution(x_T, sched), gaussian_denoiser(MU.double(), STD.double(), sched, pred)
    err = {(name, n): (f(model, x_T, sched, steps=n, pred=pred) - exact).abs().mean().item()
           for name, f in (("ddim", ddim_sample), ("dpm", dpmpp_2m_sample)) for n in (15, 25, 50)}
    assert err["dpm", 15] < err["ddim", 25] and err["dpm", 25] < 0.5 * err["ddim", 25]
    assert err["dpm", 50] / err["dpm", 25] < 0.35 and err["ddim", 50] / err["ddim", 25] > 0.4
    assert err["dpm", 50] < 0.01


def test_dpmpp_2m_starts_with_a_ddim_step():
    """Its first step is first order, which is DDIM's update; with two steps the two samplers agree."""
    sched = make_schedule("cosine")
    x_T = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = gaussian_denoiser(MU.double(), STD.double(), sched, "v")
    torch.testing.assert_close(dpmpp_2m_sample(model, x_T, sched, steps=2), ddim_sample(model, x_T, sched, steps=2))
    assert not torch.allclose(dpmpp_2m_sample(model, x_T, sched, steps=3), ddim_sample(model, x_T, sched, steps=3))


def test_unipc_weights_match_the_taylor_conditions():
    """For a small step UniPC's weights meet the Taylor conditions of a second- and third-order update: one
    difference, a = 1/2; two, sum a = 1/2 and sum a r = 1/3 (the x0' and x0'' terms of the exact solution); for a
    finite step they are the exact phi-function ratios, e.g. (h - 1 + e^-h) / (h (1 - e^-h)) for one."""
    assert _unipc_weights([1.0], 1e-4) == pytest.approx([0.5], abs=1e-4)
    a = _unipc_weights([-0.7, 1.0], 1e-3)
    assert sum(a) == pytest.approx(0.5, abs=1e-3) and a[0] * -0.7 + a[1] == pytest.approx(1 / 3, abs=1e-3)
    for h in (0.3, 2.0):
        assert _unipc_weights([1.0], h) == pytest.approx([(h - 1 + math.exp(-h)) / (h * (1 - math.exp(-h)))])


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_unipc_is_nearer_the_ode_solution_than_dpmpp_2m(pred):
    """Against the exact solution, with the same network calls: UniPC in 8 steps lands less than half as far as
    DPM-Solver++(2M) in 8, about as near as it in 15; doubling its steps from 25 cuts its error more than three
    times (DPM-Solver++'s: about three)."""
    sched = make_schedule("cosine")
    x_T = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact, model = exact_ode_solution(x_T, sched), gaussian_denoiser(MU.double(), STD.double(), sched, pred)
    err = {(name, n): (f(model, x_T, sched, steps=n, pred=pred) - exact).abs().mean().item()
           for name, f in (("dpm", dpmpp_2m_sample), ("uni", unipc_sample)) for n in (8, 15, 25, 50)}
    assert err["uni", 8] < 0.45 * err["dpm", 8] and err["uni", 8] < 1.15 * err["dpm", 15]
    assert err["uni", 15] < 0.6 * err["dpm", 15] and err["uni", 50] / err["uni", 25] < 0.3


def test_unipc_starts_with_a_ddim_step():
    """Its first step is DDIM's; its corrector needs the network at the step's end, which with two steps is the
    last evaluation (its x0 prediction is returned), so the two samplers agree there and differ with three."""
    sched = make_schedule("cosine")
    x_T = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = gaussian_denoiser(MU.double(), STD.double(), sched, "v")
    torch.testing.assert_close(unipc_sample(model, x_T, sched, steps=2), ddim_sample(model, x_T, sched, steps=2))
    three = unipc_sample(model, x_T, sched, steps=3)
    assert not torch.allclose(three, ddim_sample(model, x_T, sched, steps=3))
    assert not torch.allclose(three, dpmpp_2m_sample(model, x_T, sched, steps=3))


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample, unipc_sample], ids=["ddim", "dpmpp_2m", "unipc"])
def test_a_given_step_grid_replaces_the_trailing_one(sampler):
    sched = make_schedule("cosine")
    x_T = torch.randn(50, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = gaussian_denoiser(MU.double(), STD.double(), sched, "v")
    torch.testing.assert_close(sampler(model, x_T, sched, steps=6, timesteps=ddim_timesteps(sched, 6)),
                               sampler(model, x_T, sched, steps=6))
    other = sampler(model, x_T, sched, steps=6, timesteps=[999, 700, 400, 200, 80, 10])
    assert not torch.allclose(other, sampler(model, x_T, sched, steps=6))


def test_a_grid_ending_at_final_t():
    sched = make_schedule("cosine")
    assert ddim_timesteps(sched, 8, None) == ddim_timesteps(sched, 8) == [999, 874, 749, 624, 499, 374, 249, 124]
    grid = ddim_timesteps(sched, 8, 20)
    assert grid == [999, 859, 719, 579, 440, 300, 160, 20]                  # evenly from 999 down to 20
    assert max(abs(a - b - 979 / 7) for a, b in zip(grid, grid[1:])) <= 1
    assert ddim_timesteps(sched, 1000, 0) == list(range(999, -1, -1)) and ddim_timesteps(sched, 1, 7) == [999]
    assert ddim_timesteps(sched, 4, 996) == [999, 998, 997, 996]
    for steps, final_t in ((4, 997), (8, -1), (2, 999)):
        with pytest.raises(ValueError):
            ddim_timesteps(sched, steps, final_t)


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample, unipc_sample], ids=["ddim", "dpmpp_2m", "unipc"])
def test_ending_the_grid_near_t0_keeps_fine_detail(sampler):
    """Gaussian data with components far smaller than the noise at the trailing 8-step grid's last level
    (t = 124, sigma 0.2): its final jump returns E[x0 | x_124], which shrinks them to a quarter of their spread;
    the grid ending at t = 20 keeps more than twice as much, and lands nearer the exact ODE solution."""
    sched = make_schedule("cosine")
    mu, std = torch.zeros(3, dtype=torch.float64), torch.tensor([0.05, 0.1, 0.3], dtype=torch.float64)
    x_T = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = gaussian_denoiser(mu, std, sched, "v")
    abar = float(sched.alphas_cumprod[-1])
    exact = mu + std * (x_T - math.sqrt(abar) * mu) / torch.sqrt(abar * std ** 2 + 1 - abar)
    trailing = sampler(model, x_T, sched, steps=8)
    ended = sampler(model, x_T, sched, steps=8, timesteps=ddim_timesteps(sched, 8, 20))
    kept = lambda x: x.std(0) / std  # noqa: E731
    assert (kept(trailing)[:2] < 0.45).all() and (kept(ended)[:2] > 1.45 * kept(trailing)[:2]).all()
    assert ((ended - exact).abs().mean(0)[:2] < 0.7 * (trailing - exact).abs().mean(0)[:2]).all()
