"""One synthetic subject at a time from a ready generation chain: the Python API, and the core of
`synth4d generate`.

    import synth4d
    model = synth4d.load()                      # the shipped weights; synth4d.load("runs/w") for yours
    s = model.generate(dx="HCM", lvedv=170, seed=1)
    s.image, s.mask, s.affine, s.spacing       # (X, Y, Z, T) float32 and uint8, (4, 4), mm

A request names a diagnosis and any subset of the measures (cine.measures.MEASURES) and the slice
count; the rest is drawn from the weights' per-diagnosis prior (cine.priors). Subject `index` of a
run with base `seed` uses its own seed (subject_seed), so it comes out the same alone or in a batch.
Axis vocabulary: a cine and its mask are (X, Y, Z, T), T frames from ED (frame 0) over one cycle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from synth4d.cine import UserError
from synth4d.cine.diagnosis import CRITERIA, NEEDS, meets, volumes_fit
from synth4d.cine.measures import MEASURES, clinical_measures, volume_curve, wall_thickness
from synth4d.cine.grid import OutputGrid, place
from synth4d.cine.nifti import Geometry
from synth4d.cine.priors import ES_PHASE_RANGE, REQUESTABLE, check_request, draw
from synth4d.nets.device import uses_bf16
from synth4d.nets.diffusion import SAMPLERS
from synth4d.nets.pipeline import Generator4D
from synth4d.weights.checkpoint import load_chain

MAX_ATTEMPTS = 3        # draws of a subject that fails the plausibility check
MAX_FRAMES = 200


DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = {"ddim": 25, "dpmpp_2m": 15, "unipc": 15}   # per sampler, when steps are not given
DEFAULT_GUIDANCE = 2.0
DEFAULT_GUIDED = 0.5    # the fraction of the static model's steps (the noisiest) that are guided: 12 of 25
DEFAULT_MOTION = ("unipc", 8, 2.0, 0.25, 20)  # (sampler, steps, guidance, guided fraction: 2 of 8, final timestep)
                                              # of the motion model when none of the static model's four is given


@dataclass(frozen=True)
class Sampling:
    """How the chain samples: the sampler (nets.diffusion.SAMPLERS), its steps, the classifier-free guidance
    scale and the fraction of the steps, the noisiest, that are guided (the others run the conditional branch
    alone: nets.diffusion.guidance_at), and the motion keyframes (0: every frame). A given sampler, steps,
    guidance or guided fraction apply to both models unless the motion_ fields say otherwise; with none of the
    four given, the static model runs DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE and DEFAULT_GUIDED and
    the motion model DEFAULT_MOTION. The motion model's step grid ends at motion_final_t (nets.diffusion.ddim_timesteps):
    DEFAULT_MOTION's end with its sampler and steps, otherwise the trailing grid (None) unless given. None means
    "the default"; the fields hold the resolved values after construction."""

    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    keyframes: int = 12
    motion_sampler: str | None = None
    motion_steps: int | None = None
    motion_guidance: float | None = None
    guided_fraction: float | None = None
    motion_guided_fraction: float | None = None
    motion_final_t: int | None = None

    def __post_init__(self):
        for name in (self.sampler, self.motion_sampler):
            if name is not None and name not in SAMPLERS:
                raise UserError(f"unknown sampler {name!r}; choose {', '.join(SAMPLERS)}")
        for steps in (self.steps, self.motion_steps):
            if steps is not None and not 1 <= steps <= 1000:
                raise UserError(f"steps must be between 1 and 1000, got {steps}")
        for g in (self.guidance, self.motion_guidance):
            if g is not None and not (math.isfinite(g) and g >= 0):
                raise UserError(f"guidance must be a finite number >= 0, got {g}")
        for f in (self.guided_fraction, self.motion_guided_fraction):
            if f is not None and not (math.isfinite(f) and 0 <= f <= 1):
                raise UserError(f"the guided fraction of the steps must be between 0 and 1, got {f}")
        given = any(v is not None for v in (self.sampler, self.steps, self.guidance, self.guided_fraction))
        sampler = self.sampler or DEFAULT_SAMPLER
        steps = self.steps or DEFAULT_STEPS[sampler]
        guidance = DEFAULT_GUIDANCE if self.guidance is None else self.guidance
        # A given sampler, steps or guidance without a fraction guide every step (--sampler ddim --steps 25 is DDIM 25)
        guided = self.guided_fraction if self.guided_fraction is not None else 1.0 if given else DEFAULT_GUIDED
        motion = (sampler, steps, guidance, guided, None) if given else DEFAULT_MOTION
        motion_sampler = self.motion_sampler or motion[0]
        motion_steps = (self.motion_steps or self.steps
                        or (motion[1] if motion_sampler == motion[0] else DEFAULT_STEPS[motion_sampler]))
        motion_guidance = motion[2] if self.motion_guidance is None else self.motion_guidance
        motion_guided = motion[3] if self.motion_guided_fraction is None else self.motion_guided_fraction
        default_end = motion[4] if (motion_sampler, motion_steps) == motion[:2] else None
        motion_final_t = default_end if self.motion_final_t is None else self.motion_final_t
        if motion_final_t is not None and not 0 <= motion_final_t <= 1000 - motion_steps:
            raise UserError(f"the motion model's final timestep must be between 0 and {1000 - motion_steps} for "
                            f"{motion_steps} steps, got {motion_final_t}")
        for k, v in (("sampler", sampler), ("steps", steps), ("guidance", float(guidance)),
                     ("motion_sampler", motion_sampler), ("motion_steps", motion_steps),
                     ("motion_guidance", float(motion_guidance)), ("guided_fraction", float(guided)),
                     ("motion_guided_fraction", float(motion_guided)), ("motion_final_t", motion_final_t)):
            object.__setattr__(self, k, v)

    @staticmethod
    def guided_steps(fraction: float, steps: int) -> int:
        """How many of `steps` steps a guided fraction covers, rounded down (0.5 of 25: 12)."""
        return min(steps, math.floor(fraction * steps + 1e-9))

    def describe(self) -> str:
        """e.g. "ddim 25 steps, guidance 2" or "static ddim 25 steps, guidance 2 on the first 12 steps; motion unipc 8
        steps to t = 20, guidance 2 on the first 2 steps" (the default)."""
        def one(sampler, steps, guidance, fraction, final_t=None):
            guided = self.guided_steps(fraction, steps)
            return (f"{sampler} {steps} steps" + (f" to t = {final_t}" if final_t is not None else "")
                    + f", guidance {guidance:g}"
                    + (f" on the first {guided} step{'s' if guided != 1 else ''}" if guided < steps and guidance != 1
                       else ""))
        static = one(self.sampler, self.steps, self.guidance, self.guided_fraction)
        motion = one(self.motion_sampler, self.motion_steps, self.motion_guidance, self.motion_guided_fraction,
                     self.motion_final_t)
        return static if static == motion else f"static {static}; motion {motion}"

    def chain_args(self) -> dict:
        """The keyword arguments of Generator4D.generate that these settings fill."""
        return {"steps": self.steps, "guidance": self.guidance, "keyframes": self.keyframes, "sampler": self.sampler,
                "motion_sampler": self.motion_sampler, "motion_steps": self.motion_steps,
                "motion_guidance": self.motion_guidance,
                "guided_steps": self.guided_steps(self.guided_fraction, self.steps),
                "motion_guided_steps": self.guided_steps(self.motion_guided_fraction, self.motion_steps),
                "motion_final_t": self.motion_final_t}

    def shared(self) -> bool:
        """Whether both models sample alike (sampler, steps, guidance, guided fraction and the trailing grid)."""
        return ((self.sampler, self.steps, self.guidance, self.guided_fraction, None)
                == (self.motion_sampler, self.motion_steps, self.motion_guidance, self.motion_guided_fraction,
                    self.motion_final_t))


@dataclass
class Synthetic:
    """A generated subject: a 4D image and mask with their geometry, what was asked and what came out."""

    image: np.ndarray           # (X, Y, Z, T) float32 in [-1, 1]; files store round((image + 1) * 500) as int16
    mask: np.ndarray            # (X, Y, Z, T) uint8: 0 background, 1 RV, 2 MYO, 3 LV
    geometry: Geometry          # affine (mm, cine.grid's output grid), spacing (mm), frame duration (ms)
    values: dict                # the completed request: dx, every measure, slices, slice_mm, rr_ms
    measured: dict = field(default_factory=dict)   # measures of the mask: ED = frame 0, ES = smallest LV
    es: int = 0
    seed: int = 0
    attempts: int = 1
    plausible: str = "yes"      # or why the last of MAX_ATTEMPTS draws still failed the check
    precision: str = "fp32"     # the networks' arithmetic (nets.device.uses_bf16)

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def spacing(self) -> tuple:
        return self.geometry.spacing


def subject_seed(base: int, index: int, attempt: int = 0) -> int:
    """The seed of subject `index`'s `attempt`-th draw in a run with seed `base`."""
    return int(np.random.SeedSequence([base & 0xFFFFFFFF, index, attempt]).generate_state(1)[0])


def plausible(labels, measured, es=None) -> str:
    """'' when the ED frame has LV, MYO and RV on contiguous slices, volumes are not absurd and the smallest LV
    (frame `es`) falls in systole (cine.priors.ES_PHASE_RANGE of the cycle), else why not. Synthesizer.subject
    also asks off_diagnosis."""
    ed = labels[..., 0]
    for label, name in ((3, "LV"), (2, "MYO"), (1, "RV")):
        slices = np.flatnonzero((ed == label).any(axis=(0, 1)))
        if len(slices) == 0:
            return f"no {name}"
        if slices[-1] - slices[0] + 1 != len(slices):
            return f"{name} not contiguous across slices"
    if not (10 <= measured["lvedv"] <= 600 and 10 <= measured["rvedv"] <= 600 and 20 <= measured["lv_mass"] <= 500):
        return "volumes out of range"
    if not (0 < measured["lvef"] < 95):
        return "LVEF out of range"
    T = labels.shape[3]
    if es is not None and not ES_PHASE_RANGE[0] <= es / T <= ES_PHASE_RANGE[1]:
        return f"smallest LV at frame {es} of {T}, not in systole"
    return ""


SHOWN = {"lvedv": "LVEDV {:.0f} mL", "rvedv": "RVEDV {:.0f} mL", "lvef": "LVEF {:.0f} %", "rvef": "RVEF {:.0f} %",
         "max_wall": "max wall {:.1f} mm"}


def off_diagnosis(values: dict, labels, measured: dict, spacing) -> str:
    """'' unless the drawn (or asked) values meet their diagnosis' criteria (cine.diagnosis) and the generated
    mask's measures do not; then the criteria and the measures they use, e.g. "NOR criteria not met (LVEF >= 50,
    ...): LVEF 58 %, LVEDV 135 mL, RVEF 35 %, max wall 9.0 mm".
    A request whose own values rule the criteria out (--dx NOR --lvef 40) is not held to them."""
    dx = values.get("dx")
    if dx not in CRITERIA or not volumes_fit(dx, values):
        return ""
    m = dict(measured)
    if "max_wall" in NEEDS[dx]:   # the ED wall, only where the criteria use it (it costs a distance search)
        m["max_wall"] = wall_thickness(labels[..., 0], spacing)
    if meets(dx, m) is not False:
        return ""
    return f"{dx} criteria not met ({CRITERIA[dx]}): " + ", ".join(SHOWN[k].format(m[k]) for k in NEEDS[dx])


class Synthesizer:
    """Generates subjects from a Generator4D (weights.checkpoint.load_chain gives one)."""

    def __init__(self, chain: Generator4D):
        self.chain = chain

    @property
    def dx_vocab(self) -> list:
        return self.chain.dx_vocab

    def check(self, request: dict) -> None:
        """Refuse an impossible request (UserError) before any work."""
        check_request(request, self.dx_vocab)
        slices, frames = request.get("slices"), request.get("frames")
        if slices is not None and not 1 <= slices <= self.chain.grid.slices:
            raise UserError(f"slices must be between 1 and {self.chain.grid.slices} for these weights, got {slices:g}")
        if frames is not None and not 2 <= int(frames) <= MAX_FRAMES:
            raise UserError(f"frames must be between 2 and {MAX_FRAMES}, got {frames}")
        if request.get("es_phase") is not None and not self.chain.priors.get("es_phase"):
            raise UserError("these weights have no ES phase prior, so es_phase cannot be asked of them")

    def subject(self, request: dict, index: int = 0, seed: int = 0, sampling: Sampling = Sampling(),
                output: OutputGrid = OutputGrid()) -> Synthetic:
        """Subject `index` of a run with base `seed`: drawn, generated, measured and checked for plausibility,
        drawn again (a new seed) up to MAX_ATTEMPTS times while the check fails; then placed on the
        `output` grid (cine.grid: by default the model's own voxels in a short-axis-like orientation,
        centred on the world origin) and measured there."""
        T = int(request.get("frames") or 30)
        if output.slice_mm is not None and request.get("slice_mm") is None:
            request = {**request, "slice_mm": output.slice_mm}
        if output.slices is not None and request.get("slices") is None:
            request = {**request, "slices": min(output.slices, self.chain.grid.slices)}
        for attempt in range(MAX_ATTEMPTS):
            s = subject_seed(seed, index, attempt)
            values = draw(self.chain.priors, request, np.random.default_rng(s))
            image, labels = self.chain.generate(values, values["slices"], [t / T for t in range(T)], s,
                                                **sampling.chain_args())
            image, labels = image[..., :values["slices"], :].numpy(), labels[..., :values["slices"], :].numpy()
            spacing = (self.chain.grid.spacing, self.chain.grid.spacing, values["slice_mm"])
            es = int(np.argmin(volume_curve(labels, spacing)["lv"]))
            measured = clinical_measures(labels[..., 0], labels[..., es], spacing)
            why = plausible(labels, measured, es) or off_diagnosis(values, labels, measured, spacing)
            if not why:
                break
        image, labels, affine = place(image, labels, spacing, output, bg=-1.0)
        if output.size is not None or output.spacing is not None:   # measured where the files are
            spacing = (*(output.spacing or spacing[:2]), spacing[2])
            measured = clinical_measures(labels[..., 0], labels[..., es], spacing)
        geometry = Geometry(affine, tuple(float(z) for z in spacing), values["rr_ms"] / T)
        return Synthetic(image, labels, geometry, values, measured, es, s, attempt + 1, why or "yes",
                         "bf16" if uses_bf16(self.chain.device) else "fp32")

    def generate(self, dx=None, seed: int = 0, index: int = 0, frames: int = 30, slices=None,
                 sampling: Sampling = Sampling(), **measures) -> Synthetic:
        """One subject with diagnosis `dx` and any of the measures (lvedv=..., lvef=..., see
        cine.measures.MEASURES) and es_phase (ES after ED as a fraction of the cycle) given; what is not
        given is drawn from the prior."""
        unknown = sorted(set(measures) - set(REQUESTABLE))
        if unknown:
            raise UserError(f"unknown condition(s) {', '.join(unknown)}; known: {', '.join(REQUESTABLE)}")
        request = {"dx": dx.upper() if dx else None, **{k: v for k, v in measures.items() if v is not None},
                   "frames": frames, "slices": slices}
        self.check(request)
        return self.subject(request, index, seed, sampling)


def load(weights=None, device: str = "auto") -> Synthesizer:
    """A Synthesizer on the weights in folder `weights` (vae/static/motion .safetensors), else the shipped ones."""
    return Synthesizer(load_chain(weights, device))


def manifest_row(sid: str, subject: Synthetic, request: dict, sampling: Sampling) -> dict:
    """The manifest columns of one subject (generate's manifest.csv and --json): requested, given, measured."""
    v = subject.values
    row = {"id": sid, "seed": subject.seed, "attempts": subject.attempts, "plausible": subject.plausible,
           "dx": v["dx"] or "", "ed": 0, "es": subject.es,
           "es_phase": round(v["es_phase"], 4) if v.get("es_phase") is not None else "",
           "frames": subject.image.shape[3], "slices": v["slices"],
           "slice_mm": round(v["slice_mm"], 3), "sampler": sampling.sampler, "steps": sampling.steps,
           "motion_sampler": sampling.motion_sampler, "motion_steps": sampling.motion_steps, "guidance": sampling.guidance,
           "motion_guidance": sampling.motion_guidance, "guided_fraction": sampling.guided_fraction,
           "motion_guided_fraction": sampling.motion_guided_fraction,
           "motion_final_t": "" if sampling.motion_final_t is None else sampling.motion_final_t,
           "keyframes": sampling.keyframes,
           "precision": subject.precision}
    for k in MEASURES:
        m = float(subject.measured[k])
        row[f"requested_{k}"] = round(v[k], 3)
        row[f"given_{k}"] = int(request.get(k) is not None)
        row[f"measured_{k}"] = round(m, 3) if math.isfinite(m) else ""
    return row
