"""The compact segmenter's fit and use: labelled slices in, a trained nets.segmenter.Segmenter2D out,
class probabilities of whole cines back. Shared by `eval --realism` and `eval --downstream`.

A fit is reproducible: the same slices, settings and thread count give the same weights (batches
and augmentation come from its own numpy generator, the initialisation from a seeded, forked
torch generator; the caller's random state is left alone). Augmentation is what a segmenter needs
to cross scanners and what a slice takes without resampling: in-plane shifts, intensity gamma,
contrast and offset, Gaussian noise. No turns or flips: short-axis orientation is a convention the
data sets share.

Axis vocabulary: a slice set is images (N, X, Y) float32 in [-1, 1] and labels (N, X, Y) uint8; a
frame (X, Y, Z); a cine (X, Y, Z, T); class probabilities (C, X, Y, Z[, T]).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from synth4d.nets.segmenter import CLASSES, Segmenter2D

NOT_NNUNET = ("a compact 2D UNet fitted here (synth4d.nets.segmenter, ~0.5 M parameters), not nnU-Net: "
              "absolute Dice is lower than nnU-Net's; compare arms, not papers")


@dataclass(frozen=True)
class FitSettings:
    """One fit of the compact segmenter; every field is reported with the figures it made."""

    steps: int = 600
    batch: int = 16
    lr: float = 2e-3
    width: int = 16
    seed: int = 0
    shift: int = 6             # largest in-plane shift (voxels) of the augmentation
    max_frames: int = 8        # frames per subject taken from full-cycle (generated) masks


@dataclass
class Slices:
    """Labelled 2D slices, each with the subject and frame it came from."""

    images: np.ndarray         # (N, X, Y) float32
    labels: np.ndarray         # (N, X, Y) uint8
    subject: np.ndarray        # (N,) index into `ids`
    frame: np.ndarray          # (N,) frame of its subject
    ids: list

    def __len__(self):
        return len(self.images)

    def frames(self):
        """(subject index, frame, slice indices) of every labelled frame, in order."""
        key = self.subject * (1 + int(self.frame.max(initial=0))) + self.frame
        _, first = np.unique(key, return_index=True)
        for k in np.sort(first):
            yield int(self.subject[k]), int(self.frame[k]), np.flatnonzero(key == key[k])


def frames_with_labels(prepared, max_frames: int) -> list:
    """[(t, mask (X, Y, Z))] of a cine.prep.Prepared: its labelled frames (at most max_frames, evenly
    spaced, where every frame has a mask, as in a generated subject), else as many frames of its
    full-cycle mask."""
    if prepared.masks:
        ts = sorted(prepared.masks)
        if len(ts) > max_frames:
            ts = [ts[i * len(ts) // max_frames] for i in range(max_frames)]
        return [(t, prepared.masks[t]) for t in ts]
    if prepared.full_mask is None:
        return []
    T = prepared.full_mask.shape[3]
    ts = sorted({int(round(i * T / max_frames)) % T for i in range(min(max_frames, T))})
    return [(t, prepared.full_mask[..., t]) for t in ts]


def collect(prepared, max_frames: int = 8) -> Slices:
    """Every slice with data of the labelled frames (frames_with_labels) of each cine.prep.Prepared in
    the iterable `prepared` (all on one grid); subjects without labels add nothing."""
    images, labels, subject, frame, ids = [], [], [], [], []
    for p in prepared:
        chosen = frames_with_labels(p, max_frames)
        if not chosen:
            continue
        n = p.n_slices
        for t, mask in chosen:
            images.append(np.moveaxis(p.image[:, :, :n, t], 2, 0))
            labels.append(np.moveaxis(mask[:, :, :n], 2, 0))
            subject += [len(ids)] * n
            frame += [t] * n
        ids.append(p.id)
    return from_arrays(images, labels, subject, frame, ids)


def from_arrays(images, labels, subject, frame, ids) -> Slices:
    """Slices from lists of (n, X, Y) image and label blocks and per-slice subject / frame lists."""
    if not images:
        return Slices(np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), np.uint8), np.zeros(0, int),
                      np.zeros(0, int), [])
    return Slices(np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.uint8),
                  np.asarray(subject, dtype=np.int64), np.asarray(frame, dtype=np.int64), list(ids))


def _augment(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, shift: int):
    """A batch (B, X, Y) of images and labels, each shifted, its intensities remapped, noise added."""
    x, y = x.copy(), y.copy()
    for i in range(len(x)):
        dx, dy = rng.integers(-shift, shift + 1, size=2)
        x[i] = np.roll(x[i], (dx, dy), axis=(0, 1))
        y[i] = np.roll(y[i], (dx, dy), axis=(0, 1))
        u = (x[i] + 1) / 2                                   # [0, 1]
        u = np.clip(u, 0, 1) ** np.exp(rng.uniform(-0.4, 0.4))
        u = u * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
        x[i] = u * 2 - 1 + rng.normal(0, rng.uniform(0, 0.06), size=u.shape)
    return x.astype(np.float32), y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (batch-wise)."""
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, CLASSES).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return ce + (1 - (2 * inter + 1) / (denom + 1)).mean()


def fit(real: Slices, settings: FitSettings, synthetic: Slices | None = None, ratio: float = 0.0,
        device="cpu", desc: str = "compact segmenter") -> Segmenter2D:
    """Train a Segmenter2D on `real` slices (and `synthetic` ones: ratio synthetic per real slice in
    every batch) for settings.steps steps; returns it in eval mode on `device`."""
    if len(real) == 0:
        raise ValueError("no labelled slices to fit on")
    n_syn = 0
    if synthetic is not None and len(synthetic) and ratio > 0:
        n_syn = min(settings.batch - 1, max(1, int(round(settings.batch * ratio / (1 + ratio)))))
    rng = np.random.default_rng(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = Segmenter2D(settings.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    warmup = max(1, settings.steps // 20)
    model.train()
    for step in tqdm(range(settings.steps), desc=desc, unit="step", file=sys.stderr, leave=False):
        lr = settings.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        i = rng.integers(0, len(real), size=settings.batch - n_syn)
        x, y = real.images[i], real.labels[i]
        if n_syn:
            j = rng.integers(0, len(synthetic), size=n_syn)
            x, y = np.concatenate([x, synthetic.images[j]]), np.concatenate([y, synthetic.labels[j]])
        x, y = _augment(rng, x, y, settings.shift)
        xt = torch.from_numpy(x)[:, None].to(device)
        yt = torch.from_numpy(y.astype(np.int64)).to(device)
        loss = _loss(model(xt), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: Segmenter2D, volume: np.ndarray, batch: int = 64) -> np.ndarray:
    """(X, Y, Z[, T]) images in [-1, 1] -> (C, X, Y, Z[, T]) float32 class probabilities, slice by slice."""
    shape = volume.shape
    slices = np.moveaxis(volume.reshape(shape[0], shape[1], -1), 2, 0)          # (Z*T, X, Y)
    device = next(model.parameters()).device
    out = []
    for k in range(0, len(slices), batch):
        x = torch.from_numpy(np.ascontiguousarray(slices[k:k + batch], dtype=np.float32))[:, None].to(device)
        out.append(model(x).softmax(dim=1).float().cpu().numpy())
    prob = np.concatenate(out)                                                    # (Z*T, C, X, Y)
    return np.moveaxis(prob, 0, -1).reshape((prob.shape[1],) + shape)


def settings_dict(settings: FitSettings) -> dict:
    return dataclasses.asdict(settings)
