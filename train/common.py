"""The small pieces every training stage shares: resume state, EMA, learning-rate schedule, logging,
the held-out split and the run's random source.

Checkpoints (weights.checkpoint) hold the model; the resume state (`*.state.pt`) holds what a
checkpoint does not: raw training weights, optimizer, EMA, step and every RNG, as tensors and plain
Python values so `torch.load(weights_only=True)` reads it. All writes are atomic.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from synth4d.cine import DataError, UserError, atomic_write, first_line


# ---------------------------------------------------------------------------------------------
# Resume state: everything a checkpoint does not hold


def save_state(path, model, optimizer, ema_model, step: int, extra: dict | None = None) -> Path:
    """Write raw weights, optimizer, EMA weights, step, extra (plain values/tensors) and all RNG states."""
    np_state = np.random.get_state()
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema_model.state_dict(),
        "step": int(step), "extra": extra or {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path, model, optimizer, ema_model) -> tuple[int, dict]:
    """Restore what save_state wrote into model, optimizer and EMA, and the RNGs -> (step, extra)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "resume state not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema_model.load_state_dict(state["ema"])
    except Exception as e:  # unpickling and state-dict mismatches raise many types
        raise DataError(path, f"unusable resume state ({type(e).__name__}: {first_line(e)})") from None
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state["step"], state["extra"]


# ---------------------------------------------------------------------------------------------
# Loop pieces


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` in eval mode, to be updated with update_ema."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model; pass decay 0 on the first update (a plain copy)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of `peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class RunRandom:
    """The run's random source: every draw for batches, augmentation, noise and condition dropout comes
    from one torch.Generator whose state goes into the resume state, so a resumed run draws exactly
    what it would have."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def indices(self, n: int, k: int) -> list[int]:
        """k indices drawn uniformly, with replacement, from range(n)."""
        return torch.randint(n, (k,), generator=self.generator).tolist()

    def uniform(self, *shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator)

    def normal(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def write_split(out, ids, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split subject ids into (train, val) and record it in out/split.json; on resume use read_split."""
    from synth4d.cine.prep import split_ids
    train_ids, val_ids = split_ids(list(ids), val_fraction, seed)
    record = {"seed": seed, "val_fraction": val_fraction, "train": list(train_ids), "val": list(val_ids)}
    atomic_write(Path(out) / "split.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return list(train_ids), list(val_ids)


def read_split(out, ids=None) -> tuple[list, list]:
    """(train, val) ids from out/split.json; with `ids`, check that every recorded subject is still there."""
    path = Path(out) / "split.json"
    try:
        record = json.loads(path.read_text())
        train_ids, val_ids = list(record["train"]), list(record["val"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(path, "missing or unreadable split record; cannot resume this run") from None
    if ids is not None:
        missing = sorted(set(train_ids + val_ids) - set(ids))
        if missing:
            raise UserError(f"the data no longer hold subject(s) {', '.join(missing[:5])} of the run's split "
                            f"({path}); resume on the same data or start a new --out")
    return train_ids, val_ids


def check_finite(loss: torch.Tensor, step: int, out, log) -> None:
    """Stop the run on a non-finite loss, before it reaches the weights: the checkpoints and the resume
    state on disk stay those of the last evaluation."""
    if not torch.isfinite(loss).all():
        log.close()
        raise UserError(f"the training loss became {loss.item()} at step {step + 1}; {out} keeps the checkpoints and "
                        "resume state of the last good evaluation: --resume with a lower --lr, or check the data")


def open_run(out, state_path, products, given: dict, resume: bool, what: str) -> tuple[dict, bool]:
    """The run's settings, and whether its resume state is to be restored.

    --resume continues from the resume state with the recorded settings (those given again, other than
    preset and seed, take over). A run stopped before it wrote its first resume state has nothing to
    restore: --resume starts it again from step 0 with its recorded settings, so a run folder is never
    stuck. Without --resume, a folder that already holds a run (a resume state or any of `products`)
    is refused.
    """
    out, state_path = Path(out), Path(state_path)
    if not resume:
        if state_path.exists() or any(Path(p).exists() for p in products):
            raise UserError(f"{out} already holds a {what} run; pass --resume to continue it or choose another --out")
        return dict(given), False
    record = out / "run.json"
    if not state_path.is_file() and not record.is_file():
        raise UserError(f"nothing to resume in {out} (no {state_path.name}); run without --resume to start")
    try:
        run = json.loads(record.read_text())
        preset = run["preset"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"cannot resume: {record} is missing or unreadable") from None
    if given["preset"] != preset:
        raise UserError(f"this run uses preset {preset!r}; resume it with --preset {preset}")
    return {**run, **{k: v for k, v in given.items() if v is not None and k not in ("preset", "seed")}}, state_path.is_file()


class RunLog:
    """Progress bar (stderr) with the window-mean loss and steps/s, plus a plain-text out/log.txt."""

    def __init__(self, out_dir, total_steps: int, start_step: int = 0, every: int = 25):
        self.path = Path(out_dir) / "log.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.every = every
        self.bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True, unit="step")
        self._sums, self._n, self._t0 = {}, 0, time.perf_counter()

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def step(self, step: int, losses: dict, lr: float) -> None:
        """Record one finished step (0-based) with its loss terms; writes a line every `every` steps."""
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._n += 1
        self._last = (step, lr)
        self.bar.update(1)
        if self._n >= self.every:
            self._flush()

    def _flush(self) -> None:
        """Write the window's mean loss terms and steps/s, and start a new window."""
        step, lr = self._last
        rate = self._n / max(1e-9, time.perf_counter() - self._t0)
        means = {k: v / self._n for k, v in self._sums.items()}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()} | {"it/s": f"{rate:.2f}"}, refresh=False)
        terms = " ".join(f"{k} {v:.5g}" for k, v in means.items())
        self._write(f"step {step + 1} {terms} lr {lr:.3g} steps/s {rate:.3f}")
        self._sums, self._n, self._t0 = {}, 0, time.perf_counter()

    def buckets(self, step: int, losses: dict) -> None:
        """Per-timestep-bucket losses of a diffusion stage, e.g. {"t0-249": 0.12, ...}."""
        self._write(f"step {step + 1} buckets " + " ".join(f"{k} {float(v):.5g}" for k, v in losses.items()))

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (evaluation, checkpoints) out of steps/s."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._t0 += time.perf_counter() - t

    def eval(self, step: int, figures: dict) -> None:
        self._write(f"step {step} eval " + json.dumps(figures))
        self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()
                                                   if isinstance(v, (int, float))), file=sys.stderr)

    def note(self, text: str) -> None:
        self._write(text)
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._n:
            self._flush()
        self.bar.close()


class Processes:
    """The processes of one training run: a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous variables set) or a single process (world 1, every method a no-op).

    Data parallelism the way the loops use it: every rank draws the same global batch from the run's
    RunRandom and trains on its own contiguous slice of it; DistributedDataParallel averages the
    gradients, which equals the global batch's mean loss when the slices are equal (so the batch size
    must divide by the world size) and the loss is a mean over samples. Rank 0 alone writes the run
    folder, logs, evaluates and saves; every rank restores the same resume state.
    """

    def __init__(self):
        import os
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device, batch_size: int) -> None:
        if self.world <= 1:
            return
        if batch_size % self.world:
            raise UserError(f"batch size {batch_size} does not divide among {self.world} processes; "
                            f"use a multiple of {self.world}")
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.group = True

    def part(self, batch_size: int) -> slice:
        """This rank's slice of a global batch."""
        if self.world <= 1:
            return slice(0, batch_size)
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.group:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks (for logging and the finite check)."""
        if not self.group:
            return value
        import torch.distributed as dist
        v = value.detach().clone()
        dist.all_reduce(v)
        return v / self.world

    def average_grads(self, module: torch.nn.Module) -> None:
        """Average `module`'s gradients over the ranks in place (a model trained outside DDP)."""
        if not self.group:
            return
        import torch.distributed as dist
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist
            dist.barrier()

    def agree(self, settings: dict) -> None:
        """Refuse ranks that were given different settings (one line, on every rank)."""
        if not self.group:
            return
        import torch.distributed as dist
        mine = json.dumps(settings, sort_keys=True, default=str)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            raise UserError("the processes of this run were given different settings; launch every rank alike")

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.group = False


class QuietLog:
    """RunLog's interface for ranks other than 0: they train, rank 0 reports."""

    def __getattr__(self, name):
        if name == "paused":
            return contextlib.nullcontext
        return lambda *a, **k: None
