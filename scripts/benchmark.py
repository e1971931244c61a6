"""Benchmark: generation time by stage for `--sampler ddim --steps 25` (the reference), the default and other
settings (and their ratios to the reference), peak memory, training steps/s and FLOP efficiency in fp32 and
bf16, paper preset.

Run `python scripts/benchmark.py [--weights DIR]` on an otherwise idle machine; it prints figures, it
asserts nothing (timed tests are noise). Medians over repeats, all measured in this one run; the generation
settings are timed in rounds, one subject of each per round, so that a slow spell of the host falls on all alike.
Without --weights, networks are randomly initialised: timing does not depend on the values.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from synth4d.nets.config import get_preset
from synth4d.nets.device import autocast, native_bf16_cpu, set_precision, uses_bf16
from synth4d.nets.diffusion import make_schedule
from synth4d.nets.memory import keep_freed_memory
from synth4d.nets.pipeline import Generator4D
from synth4d.nets.unet import UNet
from synth4d.nets.vae import VAE
from synth4d.jobs.synthesize import Sampling

CL = torch.channels_last_3d
VOCAB = ("DCM", "HCM", "MINF", "NOR", "RV")


def median_time(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_gflops(n=2048, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, repeats=10) / 1e9


@torch.no_grad()
def conv_gflops(dtype=torch.float32) -> float:
    """A dense 3x3x3 convolution, 64 -> 64 channels on 32 x 32 x 16 x 2, channels-last: what oneDNN attains on
    the layers the networks are made of. On an AMD EPYC, MKL's matmul (the other baseline) ran at under half
    this rate, so the networks' convolutions ran faster than it."""
    x = torch.randn(2, 64, 32, 32, 16).to(memory_format=CL)
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return flops(lambda: conv(x)) / median_time(lambda: conv(x), repeats=5) / 1e9


def cond_for(cfg, batch):
    c = {"dx": torch.zeros(batch, dtype=torch.long), "scalars": torch.zeros(batch, len(cfg.scalars)),
         "present": torch.ones(batch, len(cfg.scalars), dtype=torch.bool)}
    if cfg.phase:
        c["phase"] = torch.linspace(0, 0.9, batch)
    return c


def networks(preset, weights=None):
    p = get_preset(preset)
    if weights:
        from synth4d.weights.checkpoint import load_chain
        chain = load_chain(weights, "cpu")
        return p, chain.vae, chain.static, chain.motion
    static = UNet(dataclasses.replace(p.static, dx_vocab=VOCAB)).eval()
    motion = UNet(dataclasses.replace(p.motion, dx_vocab=VOCAB)).eval()
    return p, VAE(p.vae).eval(), static, motion


@torch.no_grad()
def forward_costs(p, vae, static, motion, frames, decode_batch):
    """(FLOPs, seconds) of one forward of each network at the batch the generation loop uses, `frames` the motion
    frames it samples (vae None: denoisers only; the decoder at `decode_batch` frames, Generator4D's)."""
    C, X, Y, Z = p.latent_shape()
    out = {}
    for name, net, batch in (("static", static, 2), ("motion", motion, 2 * frames)):
        x = torch.randn(batch, C, X, Y, Z).to(memory_format=CL)
        ctx = torch.randn(batch, net.cfg.ctx_ch, X, Y, Z).to(memory_format=CL) if net.cfg.ctx_ch else None
        t = torch.full((batch,), 500)
        cond = cond_for(net.cfg, batch)
        call = lambda: net(x, t, cond, ctx=ctx)  # noqa: E731
        out[name] = (flops(call), median_time(lambda: _autocast(call), repeats=3), batch)
    if vae is None:
        return out
    z = torch.randn(decode_batch, C, X, Y, Z).to(memory_format=CL)
    out["decoder"] = (flops(lambda: vae.decode(z)), median_time(lambda: _autocast(lambda: vae.decode(z)), repeats=3),
                      decode_batch)
    return out


def _autocast(fn):
    with autocast("cpu"):
        return fn()


def train_steps_per_s(p, vae, static, motion):
    C, X, Y, Z = p.latent_shape()
    rates = {}
    for name, net, batch, make in (
            ("vae", VAE(p.vae), p.train_vae.batch_size, lambda b: (torch.randn(b, 1, p.grid.size, p.grid.size, p.grid.slices),)),
            ("static", UNet(static.cfg), p.train_static.batch_size, None),
            ("motion", UNet(motion.cfg), p.train_motion.batch_size, None)):
        net = net.to(memory_format=CL).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        if name == "vae":
            (x,) = make(batch)
            x = x.to(memory_format=CL)
            loss_fn = lambda: sum(o.float().mean() for o in _autocast(lambda: net(x))[:2])  # noqa: E731
        else:
            x = torch.randn(batch, C, X, Y, Z).to(memory_format=CL)
            ctx = torch.randn(batch, net.cfg.ctx_ch, X, Y, Z).to(memory_format=CL) if net.cfg.ctx_ch else None
            t, cond = torch.randint(0, 1000, (batch,)), cond_for(net.cfg, batch)
            loss_fn = lambda: _autocast(lambda: net(x, t, cond, ctx=ctx)).float().square().mean()  # noqa: E731

        def step():
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        rates[name] = (1.0 / median_time(step, repeats=3), batch)
    return rates


def parse_setting(text: str) -> tuple:
    """sampler:steps:keyframes:precision[:guidance[:guided fraction[:motion final t]]], sampler, steps, guidance
    and guided fraction each one value (both models) or STATIC/MOTION -> (Sampling, precision)."""
    sampler, steps, keyframes, precision, *rest = text.split(":")
    (sampler, *m_sampler), (steps, *m_steps) = sampler.split("/"), steps.split("/")
    guidance, *m_guidance = rest[0].split("/") if rest else ["2"]
    guided, *m_guided = rest[1].split("/") if len(rest) > 1 else [None]
    return Sampling(sampler, int(steps), float(guidance), int(keyframes), (m_sampler or [None])[0],
                    int(m_steps[0]) if m_steps else None, float(m_guidance[0]) if m_guidance else None,
                    None if guided is None else float(guided), float(m_guided[0]) if m_guided else None,
                    int(rest[2]) if len(rest) > 2 else None), precision


def setting_name(sampling: Sampling, precision: str) -> str:
    """The inverse of parse_setting."""
    pair = lambda a, b: f"{a:g}" if a == b else f"{a:g}/{b:g}"  # noqa: E731
    sampler = sampling.sampler if sampling.sampler == sampling.motion_sampler else \
        f"{sampling.sampler}/{sampling.motion_sampler}"
    guided = (sampling.guided_fraction, sampling.motion_guided_fraction)
    end = sampling.motion_final_t
    return (f"{sampler}:{pair(sampling.steps, sampling.motion_steps)}:{sampling.keyframes}:{precision}:"
            f"{pair(sampling.guidance, sampling.motion_guidance)}"
            + (f":{pair(*guided)}" if guided != (1, 1) or end is not None else "")
            + (f":{end}" if end is not None else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--weights", default=None, help="a weights folder (default: random networks of the cpu preset)")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps of the reference setting and of the paper ratio")
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--keyframes", type=int, default=12, help="as `synth4d generate --keyframes` (0: every frame)")
    ap.add_argument("--compare", nargs="*", default=["ddim:25:12:fp32", "dpmpp_2m:15:12:auto", "dpmpp_2m:10:12:auto"],
                    help="sampler:steps:keyframes:precision settings timed beside DDIM (the reference, precision auto) "
                         "and the default, with their ratio to the reference; an optional fifth field is the guidance "
                         "[2], a sixth the guided fraction [1], a seventh the motion model's final timestep [the "
                         "trailing grid]; "
                         "sampler, steps and guidance may each be STATIC/MOTION (ddim/dpmpp_2m:25/8:12:auto:2/1 is "
                         "--sampler ddim --steps 25 --guidance 2 --motion-sampler dpmpp_2m --motion-steps 8 "
                         "--motion-guidance 1)")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="leave glibc's allocator as it is (the CLI raises its mmap threshold: nets/memory.py)")
    args = ap.parse_args()
    kept = False if args.glibc_malloc else keep_freed_memory()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; freed memory kept for reuse "
          f"(nets/memory.py, as the CLI does): {kept}")
    peak_gflops = matmul_gflops()
    native = native_bf16_cpu()
    # without native bf16 the bf16 matmul is emulated (under 1 GFLOP/s: minutes for one 2048^3 product)
    bf16 = f"{matmul_gflops(dtype=torch.bfloat16):.1f} GFLOP/s" if native else "not measured (emulated)"
    conv_rate = {"fp32": conv_gflops()}
    if native:
        conv_rate["bf16"] = conv_gflops(torch.bfloat16)
    print("dense conv3d (64 ch, 3x3x3, oneDNN): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in conv_rate.items()))
    print(f"fp32 matmul (2048^3): {peak_gflops:.1f} GFLOP/s; bf16: {bf16}; native bf16 on this CPU: {native} "
          f"(--precision auto computes in {'bf16' if native else 'fp32'})")

    p, vae, static, motion = networks("cpu", args.weights)
    for net in (vae, static, motion):
        net.to(memory_format=CL)
    C, X, Y, Z = p.latent_shape()
    norm = lambda cfg: {k: (0.0, 1.0) for k in cfg.scalars}  # noqa: E731  every condition given, at its mean
    chain = Generator4D(vae, static, motion, make_schedule("cosine"), 1.0, 1.0, (X, Y, Z), norm(static.cfg),
                        norm(motion.cfg), p.grid, {})
    values = {"dx": static.cfg.dx_vocab[0], **{k: 0.0 for k in static.cfg.scalars + motion.cfg.scalars}}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = (Sampling("ddim", args.steps, keyframes=args.keyframes), "auto")   # `generate --sampler ddim --steps 25`
    default = (Sampling(), "auto")                                                  # `generate`
    settings = list(dict.fromkeys([reference, default] + [parse_setting(c) for c in args.compare]))
    # Round by round, one subject of every setting in turn: a slow spell of the host (a shared machine's
    # neighbours) then falls on every setting alike instead of on whichever setting's block it meets.
    per_subject = {s: [] for s in settings}
    stages = {s: [] for s in settings}
    for i in range(args.subjects):
        for setting in settings:
            sampling, precision = setting
            set_precision(precision)
            timings = {}
            t = time.perf_counter()
            chain.generate(values, Z, [k / args.frames for k in range(args.frames)], seed=i, timings=timings,
                           **sampling.chain_args())
            per_subject[setting].append(time.perf_counter() - t)
            stages[setting].append(timings)
    medians = {s: statistics.median(v) for s, v in per_subject.items()}
    for setting in settings:
        sampling, precision = setting
        set_precision(precision)
        print(f"\ngeneration, {args.frames}-frame subject, {sampling.keyframes or args.frames} motion keyframes, "
              f"{sampling.describe()}, precision {precision} "
              f"({'bf16' if uses_bf16('cpu') else 'fp32'}) (median of {args.subjects}): "
              f"{medians[setting]:.2f} s" + (" (the default)" if setting == default else ""))
        for k in ("static", "motion", "decode"):
            print(f"  {k:<8}{statistics.median(s[k] for s in stages[setting]):8.2f} s")
    print(f"\nrounds: {args.subjects}, each setting once per round, in the order above")
    for setting, seconds in medians.items():
        if setting != reference:
            rounds = [a / b for a, b in zip(per_subject[setting], per_subject[reference])]
            print(f"{setting_name(*setting)} / {setting_name(*reference)}: {seconds / medians[reference]:.2f} of the time"
                  f" (round by round {min(rounds):.2f}-{max(rounds):.2f})" + (" (the default)" if setting == default else ""))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak_mb:.0f} MB (before generating: {rss0 / 1024:.0f} MB)")

    precisions = ("fp32", "bf16") if native else ("fp32",)
    all_costs = {}
    for precision in precisions:
        set_precision(precision)
        print(f"\nFLOP efficiency in {precision} (one forward at the generation loop's batch; % of the fp32 matmul; "
              f"% of the dense conv3d in {precision}):")
        sampled = (args.keyframes or args.frames) - 1   # motion frames per subject (ED is not sampled)
        costs = all_costs[precision] = forward_costs(p, vae, static, motion, sampled, chain.decode_batch)
        for name, (f, sec, batch) in costs.items():
            rate = f / sec / 1e9
            print(f"  {name:<8} batch {batch:3d}: {f / 1e9:8.1f} GFLOP in {sec:6.3f} s = {rate:6.1f} GFLOP/s "
                  f"({100 * rate / peak_gflops:.0f}% of matmul, {100 * rate / conv_rate[precision]:.0f}% of conv3d)")
    for precision in precisions:
        set_precision(precision)
        print(f"\ntraining steps/s at the cpu preset's default batch sizes, {precision}:")
        for name, (rate, batch) in train_steps_per_s(p, vae, static, motion).items():
            print(f"  {name:<8} batch {batch:3d}: {rate:.3f} steps/s")
    set_precision("fp32")   # the paper comparison is in fp32
    costs = all_costs["fp32"]

    if not args.skip_paper:
        pp, _, pstatic, pmotion = networks("paper")
        pc = forward_costs(pp, None, pstatic.to(memory_format=CL), pmotion.to(memory_format=CL), 2, None)
        f_static, t_static, _ = pc["static"]          # batch 2 = one subject with guidance
        f_motion, t_motion, _ = pc["motion"]          # batch 4 = two frames with guidance
        implied = args.steps * (t_static + t_motion / 2 * args.frames)
        ours = args.steps * (costs["static"][1] + costs["motion"][1])   # both at the generation loop's batch
        print(f"\npaper preset: {f_static / 2 / 1e12:.2f} TFLOP per denoiser forward (one sample); "
              f"{args.steps} steps x (static + {args.frames} motion frames), guided, imply {implied:.0f} s "
              f"of denoising per subject here vs {ours:.1f} s for the cpu preset: ratio {implied / ours:.0f}x")


if __name__ == "__main__":
    main()
