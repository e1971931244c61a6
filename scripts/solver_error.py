"""Diagnostic: how far each sampler setting lands from a many-step solution of the same ODE (static stage).

`python scripts/solver_error.py [--weights DIR] [--n 6] [--reference 250]` samples the ED latent of N
requests (diagnoses in turn, scalar conditions around their training mean) from the same noise with
DDIM at `--reference` steps, taken as the probability-flow ODE's solution, and with DDIM at 10, 15,
25 and 50 steps and DPM-Solver++(2M) at 8, 10 and 15 steps on three step grids: the trailing one
`generate` uses, one uniform in log-SNR after the first (noisiest) step, and one uniform in t ending
at t = 5. It prints the RMS distance to the reference relative to the reference's RMS, per setting
(mean over requests): whether a solver or a grid gets nearer the ODE's end point in fewer steps.
Guidance 2, as `generate`. It asserts nothing (see weights/EXPERIMENTS.md for measured figures).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from synth4d.nets import diffusion
from synth4d.nets.conditions import cond_tensors, null_conditions
from synth4d.nets.device import autocast
from synth4d.nets.memory import keep_freed_memory
from synth4d.weights import DIR
from synth4d.weights.checkpoint import load_chain


def log_snr_grid(sched, steps: int, t_end: int = 5) -> list[int]:
    """t = T - 1 first, then steps - 1 timesteps uniform in log-SNR from the trailing grid's second one to t_end.
    (Uniform from T - 1 itself would crowd the grid near T: log-SNR falls to -10 at the zero-SNR end.)"""
    lam = np.array([diffusion.half_log_snr(float(a)) for a in sched.alphas_cumprod])
    t1 = round(sched.n_steps - sched.n_steps / steps) - 1
    return [sched.n_steps - 1] + [int(np.argmin(np.abs(lam - v))) for v in np.linspace(lam[t1], lam[t_end], steps - 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=DIR)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--reference", type=int, default=250)
    args = ap.parse_args()
    keep_freed_memory()
    chain = load_chain(args.weights, "cpu")
    sched = chain.sched

    def model_fn(x, t, c):
        with autocast("cpu"):
            return chain.static(x, t, c).float()

    def sample(sampler, steps, grid, cond, uncond, x_T):
        return diffusion.SAMPLERS[sampler](model_fn, x_T, sched, steps=steps, guidance=2.0, cond=cond,
                                           uncond=uncond, pred=chain.pred, timesteps=grid)

    settings = {f"DDIM {n}": ("ddim", n, None) for n in (10, 15, 25, 50)}
    for n in (8, 10, 15):
        settings[f"DPM++ {n}, trailing"] = ("dpmpp_2m", n, None)
        settings[f"DPM++ {n}, log-SNR"] = ("dpmpp_2m", n, log_snr_grid(sched, n))
        settings[f"DPM++ {n}, uniform to 5"] = ("dpmpp_2m", n, [round(v) for v in np.linspace(sched.n_steps - 1, 5, n)])
    errors = {k: [] for k in settings}
    for i in range(args.n):
        rng = np.random.RandomState(i)
        values = {"dx": chain.dx_vocab[i % len(chain.dx_vocab)],   # scalars: mean + 0.5 sd x N(0, 1), in mL, g, %
                  **{k: m + 0.5 * sd * float(rng.randn()) for k, (m, sd) in chain.static_norm.items()}}
        cond = cond_tensors([values], chain.static_norm, chain.dx_vocab)
        uncond = null_conditions(cond, chain.static.cond_embed.null_dx)
        x_T = torch.randn((1, chain.static.cfg.in_ch) + chain.latent_size, generator=torch.Generator().manual_seed(i))
        ref = sample("ddim", args.reference, None, cond, uncond, x_T)
        for name, (sampler, steps, grid) in settings.items():
            out = sample(sampler, steps, grid, cond, uncond, x_T)
            errors[name].append(float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()))
    print(f"relative RMS distance of the ED latent to DDIM {args.reference} (mean of {args.n} requests):")
    for name, e in errors.items():
        print(f"  {name:<24}{np.mean(e):.3f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
