"""The noise schedule, forward noising, the training loss and the samplers (DDIM, DPM-Solver++(2M)) with
classifier-free guidance.

Axis vocabulary: tensors are (B, C, X, Y, Z) (any trailing shape works); t is (B,) long, an index
into the schedule, 0 the least noisy. Names follow the papers: betas, alphas_cumprod, x_t, x0_pred,
eps, v. All functions are pure; the network is passed in as `model_fn(x_t, t, cond) -> output`.

References:
    DDPM   Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
    DDIM   Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"
    cosine Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
    v      Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
    CFG    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"
    minSNR Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
    steps  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"
    DPM++  Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
           Probabilistic Models" (arXiv 2211.01095)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule; float64 so that 1 - alphas_cumprod keeps its precision near t = 0."""

    betas: torch.Tensor            # (n_steps,) float64
    alphas_cumprod: torch.Tensor   # (n_steps,) float64
    n_steps: int


def make_schedule(kind: str = "cosine", n_steps: int = 1000) -> Schedule:
    """The cosine schedule (Nichol & Dhariwal Eq. 17), the only one checkpoints name ("schedule": "cosine")."""
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}; synth4d's denoisers use 'cosine'")
    s = 0.008
    f = torch.cos((torch.arange(n_steps + 1, dtype=torch.float64) / n_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # clipped against the singularity at t = T
    return Schedule(betas, torch.cumprod(1 - betas, dim=0), n_steps)


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as `like`'s dtype and device, shaped (B, 1, 1, ...) to broadcast over it."""
    out = values[t.long().cpu()].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *[1] * (like.dim() - 1))


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sched: Schedule) -> torch.Tensor:
    abar = _at(sched.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # DDPM Eq. 4


def v_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sched: Schedule) -> torch.Tensor:
    abar = _at(sched.alphas_cumprod, t, x0)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0  # Salimans & Ho Sec. 4: v = alpha eps - sigma x


def pred_to_x0_eps(x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, sched: Schedule, pred: str = "eps"):
    """The network output read as eps or v -> (x0_pred, eps)."""
    abar = _at(sched.alphas_cumprod, t, x_t)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if pred == "eps":
        return (x_t - s * out) / a, out                 # DDPM Eq. 4 solved for x0
    if pred == "v":
        return a * x_t - s * out, s * x_t + a * out     # Salimans & Ho Sec. 4: x = alpha z - sigma v
    raise ValueError(f"unknown prediction {pred!r}; choose eps or v")


def diffusion_loss(model_out, x0, eps, t, sched: Schedule, pred: str = "v") -> torch.Tensor:
    """Per-sample (B,) mean squared error of the network output against the eps or v target."""
    if pred not in ("eps", "v"):
        raise ValueError(f"unknown prediction {pred!r}; choose eps or v")
    target = eps if pred == "eps" else v_target(x0, eps, t, sched)
    return (model_out - target).float().square().flatten(1).mean(1)  # (B,)


def min_snr_v_weight(t: torch.Tensor, sched: Schedule, gamma: float = 5.0) -> torch.Tensor:
    """Training weight (B,) float64 of the v loss: min(SNR + 1, gamma) / (SNR + 1).

    The v error is SNR + 1 times the x0 error (squared), so this puts min(SNR + 1, gamma) on the x0
    error: min-SNR's down-weighting of the easy, low-noise steps (Hang et al. Eq. 7 caps the x0 weight
    at min(SNR, gamma)), but with full weight at zero SNR. Hang et al.'s own weight is 0 there, and the
    trailing DDIM schedule starts at zero SNR, where the prediction rests on the conditions alone: a
    model trained with it predicts almost nothing at that step and its samples follow the noise more
    than the conditions (measured; see weights/EXPERIMENTS.md).
    """
    abar = sched.alphas_cumprod[t.long().cpu()]
    snr = abar / (1 - abar)
    return (snr + 1).clamp(max=gamma) / (snr + 1)


def timestep_buckets(t: torch.Tensor, sched: Schedule, n: int = 4) -> torch.Tensor:
    """(B,) long in [0, n): which equal slice of [0, n_steps) each timestep falls in, for per-bucket loss logs."""
    return (t.long() * n) // sched.n_steps


def ddim_timesteps(sched: Schedule, steps: int, final_t: int | None = None) -> list[int]:
    """'Trailing' spacing (Lin et al. Table 2): descending from n_steps - 1, so the first step sees the noisiest
    level, the one pure noise x_T stands for; 'leading' spacing would start at, e.g., 960 of 1000.

    final_t: the last (least noisy) timestep instead of the trailing grid's n_steps / steps - 1, the steps evenly
    spaced from n_steps - 1 down to it (Lin et al.'s 'linspace' spacing, which ends at 0, with another end). The
    last step predicts the clean sample from final_t in one jump; at 8 of 1000 steps the trailing grid jumps from
    t = 124, where the prediction is a posterior mean that has averaged fine detail away."""
    if not 1 <= steps <= sched.n_steps:
        raise ValueError(f"steps must be in [1, {sched.n_steps}], got {steps}")
    if final_t is None:
        return [round(sched.n_steps - i * sched.n_steps / steps) - 1 for i in range(steps)]
    if not 0 <= final_t <= sched.n_steps - steps:
        raise ValueError(f"the final timestep must be in [0, {sched.n_steps - steps}] for {steps} steps, got {final_t}")
    if steps == 1:
        return [sched.n_steps - 1]
    first = sched.n_steps - 1
    return [round(first - i * (first - final_t) / (steps - 1)) for i in range(steps)]


def _cat_cond(cond, uncond):
    """Concatenate two condition dicts (or tensors) along the batch axis, tensor by tensor."""
    if isinstance(cond, dict):
        return {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    return torch.cat([cond, uncond])


def _guided(model_fn, x, t, guidance, cond, uncond):
    """The network output at (x, t), with classifier-free guidance when guidance != 1 (one batched forward)."""
    if guidance == 1.0:
        return model_fn(x, t, cond)
    if uncond is None:
        raise ValueError("guidance != 1 needs the unconditional conditions `uncond`")
    out_cond, out_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(cond, uncond)).chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)  # Ho & Salimans Eq. 6 (w + 1 = guidance)


def guidance_at(i: int, guidance: float, guided_steps: int | None) -> float:
    """The guidance scale of step i (0 = the noisiest): `guidance` on the first guided_steps steps, 1 (the
    conditional branch alone, one forward instead of two) after them; None: every step.

    Guidance in a limited interval (Kynkaanniemi et al. 2024) leaves the low-noise steps unguided: by then the
    sample's layout, which guidance steers, is set, and these steps refine detail."""
    return guidance if guided_steps is None or i < guided_steps else 1.0


@torch.no_grad()
def ddim_sample(model_fn, x_T: torch.Tensor, sched: Schedule, steps: int = 25, guidance: float = 1.0,
                cond=None, uncond=None, pred: str = "v", timesteps=None, guided_steps: int | None = None) -> torch.Tensor:
    """Deterministic DDIM (Song et al. Eq. 12, eta = 0) from caller-supplied noise x_T to x0, with
    classifier-free guidance.

    model_fn(x_t, t, cond) -> eps or v (per `pred`); t is (B,) long. guidance == 1 runs the conditional
    branch only; otherwise cond and uncond go through ONE batched forward. timesteps: another descending step
    grid than ddim_timesteps(sched, steps) (diagnostics compare grids). guided_steps: guidance on the first
    guided_steps steps only (guidance_at); None: on every step.
    """
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1 needs the unconditional conditions `uncond`")
    timesteps = ddim_timesteps(sched, steps) if timesteps is None else list(timesteps)
    x = x_T
    B = x.shape[0]
    for i, step in enumerate(timesteps):
        t = torch.full((B,), step, dtype=torch.long, device=x.device)
        out = _guided(model_fn, x, t, guidance_at(i, guidance, guided_steps), cond, uncond)
        x0_pred, eps = pred_to_x0_eps(x, t, out, sched, pred)
        abar_prev = float(sched.alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        dir_x_t = math.sqrt(max(1 - abar_prev, 0.0)) * eps   # DDIM Eq. 12, "direction pointing to x_t" (sigma = 0)
        x = math.sqrt(abar_prev) * x0_pred + dir_x_t          # DDIM Eq. 12
    return x


def half_log_snr(abar: float) -> float:
    """lambda_t = log(alpha_t / sigma_t) with alpha_t^2 = abar_t, sigma_t^2 = 1 - abar_t (DPM-Solver's lambda)."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


@torch.no_grad()
def dpmpp_2m_sample(model_fn, x_T: torch.Tensor, sched: Schedule, steps: int = 15, guidance: float = 1.0,
                    cond=None, uncond=None, pred: str = "v", timesteps=None,
                    guided_steps: int | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): a second-order multistep solver of the probability-flow
    ODE in the data-prediction parameterisation, for guided sampling in few steps.

    Same signature, timesteps (trailing, ddim_timesteps, unless given), guidance and guided_steps as ddim_sample.
    Each step turns the guided output into x0_pred; the first step is first order (it equals a DDIM step), the
    others combine the last two x0 predictions, and the last step lands on the clean sample (sigma = 0), where
    the update is x0_pred itself.
    """
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1 needs the unconditional conditions `uncond`")
    timesteps = ddim_timesteps(sched, steps) if timesteps is None else list(timesteps)
    x = x_T
    B = x.shape[0]
    x0_last, h_last = None, None
    for i, step in enumerate(timesteps):
        t = torch.full((B,), step, dtype=torch.long, device=x.device)
        out = _guided(model_fn, x, t, guidance_at(i, guidance, guided_steps), cond, uncond)
        x0_pred, _ = pred_to_x0_eps(x, t, out, sched, pred)
        if i + 1 == len(timesteps):
            return x0_pred                                   # Eq. (9) with sigma_next = 0, alpha_next = 1
        abar_t, abar_next = float(sched.alphas_cumprod[step]), float(sched.alphas_cumprod[timesteps[i + 1]])
        h = half_log_snr(abar_next) - half_log_snr(abar_t)  # Algorithm 2: h_i = lambda_{t_i} - lambda_{t_{i-1}}
        if x0_last is None:
            d = x0_pred                                      # Algorithm 2, first step: first order
        else:
            r = h_last / h                                   # Algorithm 2: r_i = h_{i-1} / h_i
            d = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * x0_last   # Algorithm 2: D_i
        sigma_ratio = math.sqrt((1 - abar_next) / (1 - abar_t))
        # Algorithm 2: x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x = sigma_ratio * x - math.sqrt(abar_next) * math.expm1(-h) * d
        x0_last, h_last = x0_pred, h
    return x


def _unipc_weights(rs: list[float], h: float) -> list[float]:
    """UniPC's weights a_m of the differences D_m taken at r_m = (lambda_m - lambda_s) / h (Zhao et al. 2023,
    B(h) = e^h - 1, their "bh2", in the data-prediction form, where the functions are taken at x = -h).

    They solve R a = g: R[k][m] = r_m^k and g_k = (k + 1)! x phi_{k+2}(x) / B(x) for k = 0 .. len(rs) - 1, with
    phi_1(x) = (e^x - 1) / x and phi_{k+1}(x) = (phi_k(x) - 1 / k!) / x: the coefficients of the expansion of the
    ODE's exact solution in powers of the step. For a small step the weights tend to 1/2 (one difference) and to
    the pair that meets sum a_m = 1/2, sum a_m r_m = 1/3 (two)."""
    hh = -h
    phi, fact, g = math.expm1(hh) / hh - 1.0, 1.0, []   # x phi_2(x); then x phi_3(x), x phi_4(x), ...
    for k in range(1, len(rs) + 1):
        g.append(phi * fact / math.expm1(hh))
        fact *= k + 1
        phi = phi / hh - 1.0 / fact
    R = torch.tensor([[r ** k for r in rs] for k in range(len(rs))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64)).tolist()


@torch.no_grad()
def unipc_sample(model_fn, x_T: torch.Tensor, sched: Schedule, steps: int = 15, guidance: float = 1.0,
                 cond=None, uncond=None, pred: str = "v", timesteps=None,
                 guided_steps: int | None = None) -> torch.Tensor:
    """UniPC-2 (Zhao et al. 2023, the multistep predictor UniP-2 with the corrector UniC, B(h) = e^h - 1): the
    DPM-Solver++ family's data-prediction update, whose error terms are estimated from earlier x0 predictions
    (predictor) and then once more with the network's output at the predicted point (corrector). The corrector
    uses the evaluation the next step needs anyway, so it raises the order by one at no extra network call.

    Same signature, timesteps, guidance and guided_steps as ddim_sample. The first step is first order (DDIM's
    update), then corrected with its own end point; the last evaluation, like DPM-Solver++'s, returns its x0
    prediction (the jump to sigma = 0), so its correction is not used.
    """
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1 needs the unconditional conditions `uncond`")
    timesteps = ddim_timesteps(sched, steps) if timesteps is None else list(timesteps)
    x = x_T
    B = x.shape[0]
    earlier = None     # (lambda, x0_pred) of the evaluation before the last, for the second-order terms
    step_in = None     # the last step's first-order part, its start and its h, for the corrector

    def update(first_order, alpha, h, lam_s, x0_s, points):
        """UniPC's update in the data-prediction form: first_order - alpha_next B(-h) sum_m a_m D_m, with
        D_m = (x0_m - x0_s) / r_m the differences of the x0 predictions at `points` from the one at the start."""
        rs = [(lam - lam_s) / h for lam, _ in points]
        a = _unipc_weights(rs, h)
        return first_order - alpha * math.expm1(-h) * sum(w * (x0 - x0_s) / r for w, r, (_, x0) in zip(a, rs, points))

    for i, step in enumerate(timesteps):
        t = torch.full((B,), step, dtype=torch.long, device=x.device)
        out = _guided(model_fn, x, t, guidance_at(i, guidance, guided_steps), cond, uncond)
        x0_pred, _ = pred_to_x0_eps(x, t, out, sched, pred)
        abar_t = float(sched.alphas_cumprod[step])
        lam_t = half_log_snr(abar_t)
        if i + 1 == len(timesteps):
            return x0_pred                                   # sigma_next = 0: the update is x0_pred itself
        if step_in is not None:                          # UniC: the step into t again, with x0_pred at t (r = 1)
            first_order, alpha, h, lam_s, x0_s, points = step_in
            x = update(first_order, alpha, h, lam_s, x0_s, points + [(lam_t, x0_pred)])
        abar_next = float(sched.alphas_cumprod[timesteps[i + 1]])
        h = half_log_snr(abar_next) - lam_t
        alpha = math.sqrt(abar_next)
        # the first-order (DDIM) part: x_next = (sigma_next / sigma_t) x_t - alpha_next (e^-h - 1) x0_pred
        first_order = math.sqrt((1 - abar_next) / (1 - abar_t)) * x - alpha * math.expm1(-h) * x0_pred
        points = [earlier] if earlier is not None else []
        x = update(first_order, alpha, h, lam_t, x0_pred, points) if points else first_order   # UniP-2
        step_in = (first_order, alpha, h, lam_t, x0_pred, points)
        earlier = (lam_t, x0_pred)
    return x


SAMPLERS = {"ddim": ddim_sample, "dpmpp_2m": dpmpp_2m_sample, "unipc": unipc_sample}
