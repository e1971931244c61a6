"""The `paper` preset exercised on the CPU: built, one training step of each stage, one 30-frame subject generated
with 2 sampler steps and 2 motion keyframes (every frame decoded).

Slow (minutes on a 2-core CPU), so it runs only with SYNTH4D_SLOW=1; CI skips it. It prints the parameter
counts, the seconds of each part and the process's peak memory.
"""
import dataclasses
import os
import resource
import time

import pytest
import torch

from synth4d.nets import conditions
from synth4d.nets.config import get_preset
from synth4d.nets.diffusion import diffusion_loss, make_schedule, q_sample
from synth4d.nets.pipeline import Generator4D
from synth4d.nets.unet import UNet
from synth4d.nets.vae import VAE
from synth4d.train.vae import vae_loss

pytestmark = pytest.mark.skipif(os.environ.get("SYNTH4D_SLOW") != "1",
                                reason="minutes on a CPU: set SYNTH4D_SLOW=1 to run the paper preset")
VOCAB = ("DCM", "HCM", "MINF", "NOR", "RV")


def _step(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clock = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    return time.perf_counter() - clock


def test_paper_preset_trains_and_generates():
    torch.manual_seed(0)
    p = get_preset("paper")
    vae = VAE(p.vae)
    static = UNet(dataclasses.replace(p.static, dx_vocab=VOCAB))
    motion = UNet(dataclasses.replace(p.motion, dx_vocab=VOCAB))
    counts = {name: sum(x.numel() for x in m.parameters()) / 1e6 for name, m in
              (("vae", vae), ("static", static), ("motion", motion))}
    print("parameters (M):", {k: round(v, 1) for k, v in counts.items()})
    X, Z = p.grid.size, p.grid.slices
    C, x, y, z = p.latent_shape()
    assert (C, x, y, z) == (8, 24, 24, 16)
    sched = make_schedule("cosine")
    times = {}
    frame = torch.rand(1, 1, X, X, Z) * 2 - 1
    mask = torch.randint(0, 4, (1, X, X, Z))

    def vae_step():
        image, logits, post = vae(frame)
        return vae_loss(image, logits, post, frame, mask, torch.ones(1), torch.ones(1, 1, 1, 1, Z))["loss"]
    times["vae step"] = _step(vae, vae_step)
    rows = [{"dx": "NOR"}]
    for name, net in (("static", static), ("motion", motion)):
        cond = conditions.cond_tensors(rows, {n: (0.0, 1.0) for n in net.cfg.scalars}, list(VOCAB))
        if name == "motion":
            cond["phase"] = torch.tensor([0.3])
        ctx = torch.randn(1, C + 1, x, y, z) if name == "motion" else None
        x0, eps, t = torch.randn(1, C, x, y, z), torch.randn(1, C, x, y, z), torch.tensor([500])
        times[f"{name} step"] = _step(net, lambda: diffusion_loss(net(q_sample(x0, t, eps, sched), t, cond, ctx=ctx),
                                                                  x0, eps, t, sched, pred="v").mean())
    chain = Generator4D(vae.eval(), static.eval(), motion.eval(), sched, 1.0, 1.0, (x, y, z),
                        {n: (0.0, 1.0) for n in conditions.STATIC}, {n: (0.0, 1.0) for n in conditions.MOTION},
                        p.grid, {})
    clock = time.perf_counter()
    image, labels = chain.generate({"dx": "NOR"}, n_slices=12, phases=[t / 30 for t in range(30)], seed=0, steps=2,
                                   guidance=2.0, keyframes=2)
    times["generate 30 frames, 2 steps, 2 keyframes"] = time.perf_counter() - clock
    assert image.shape == (X, X, Z, 30) and labels.shape == image.shape and torch.isfinite(image).all()
    print("seconds:", {k: round(v, 1) for k, v in times.items()},
          f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
