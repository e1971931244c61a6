"""`synth4d eval TRAIN GENERATED --memorisation`: does the generator copy its training subjects?

Feature space: the VAE's latent (posterior mean) of each subject's end-diastolic frame, on the
VAE's grid (heart-centred crop, intensities per subject to [-1, 1]). It is the space the static
diffusion model samples ED anatomy in, and the decoder turns it into both the image and the mask,
so two subjects close in it have the same anatomy and the same appearance; the crop and the
intensity scaling remove position and scanner gain, which say nothing about who the subject is.
Distance: root mean square difference per latent element.

For each generated subject, the distance to its nearest TRAIN subject; the reference is the same
distance for real subjects not in TRAIN: HELDOUT if given, else each TRAIN subject against the
others (leave-one-out: every real subject held out once). A generated subject is flagged when it is
closer to a training subject than any reference subject ever comes (below the reference minimum).
The closest pairs are listed by id with the Dice of their ED masks (a second, anatomical check).

Axis vocabulary: features (N, D); a frame (X, Y, Z).
"""
from __future__ import annotations

import numpy as np
import torch

from synth4d.cine import UserError
from synth4d.cine.metrics import dice
from synth4d.cine.prep import prepare_subject
from synth4d.nets.pipeline import encode_frames

CLOSEST = 5


def ed_features(ds, vae, meta, device, desc) -> tuple:
    """(ids, features (N, D) float64, ED masks on the grid or None) of every subject of a data set."""
    ids, feats, masks = [], [], []
    for s in ds.load_each(desc):
        p = prepare_subject(s, meta["grid"])
        ed = int(s.ed)
        frame = torch.from_numpy(np.ascontiguousarray(p.image[..., ed]))[None, None]   # (1, 1, X, Y, Z)
        feats.append(encode_frames(vae, frame, device)[0].reshape(-1).double().numpy())
        masks.append(p.masks.get(ed, p.full_mask[..., ed] if p.full_mask is not None else None))
        ids.append(s.id)
    if not ids:
        raise UserError(f"{ds.root}: no subjects")
    return ids, np.stack(feats), masks


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) root mean square differences between rows of a (Na, D) and b (Nb, D)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None) / a.shape[1])


def _summary(d) -> dict:
    d = np.asarray(d, dtype=np.float64)
    return {"n": len(d), "min": float(d.min()), "p05": float(np.percentile(d, 5)), "median": float(np.median(d)),
            "p95": float(np.percentile(d, 95)), "max": float(d.max())}


def memorisation(train_ds, gen_ds, vae, meta, device="cpu", heldout_ds=None) -> dict:
    """The memorisation figures (see the module docstring)."""
    t_ids, t_feat, t_masks = ed_features(train_ds, vae, meta, device, "memorisation (train)")
    g_ids, g_feat, g_masks = ed_features(gen_ds, vae, meta, device, "memorisation (generated)")
    if heldout_ds is not None:
        _, h_feat, _ = ed_features(heldout_ds, vae, meta, device, "memorisation (held out)")
        reference = distances(h_feat, t_feat).min(axis=1)
        how = f"held-out set {heldout_ds.root}"
    else:
        if len(t_ids) < 2:
            raise UserError(f"{train_ds.root}: leave-one-out needs at least 2 training subjects (or give --heldout)")
        d = distances(t_feat, t_feat)
        np.fill_diagonal(d, np.inf)
        reference = d.min(axis=1)
        how = "leave-one-out over TRAIN"
    d = distances(g_feat, t_feat)
    nearest, which = d.min(axis=1), d.argmin(axis=1)
    threshold = float(reference.min())
    flagged = nearest < threshold
    order = np.argsort(nearest)[:CLOSEST]
    pairs = []
    for i in order:
        a, b = g_masks[i], t_masks[which[i]]
        overlap = None
        if a is not None and b is not None and a.shape == b.shape:
            overlap = float(np.mean(list(dice(a, b).values())))
        pairs.append({"generated": g_ids[i], "train": t_ids[which[i]], "distance": float(nearest[i]),
                      "ed_mask_dice": overlap, "flagged": bool(flagged[i])})
    return {"flagged": {"fraction": float(flagged.mean()), "n": int(flagged.sum()), "of": len(g_ids),
                        "ids": [g_ids[i] for i in np.flatnonzero(flagged)]},
            "threshold": threshold, "generated_to_train": _summary(nearest), "real_to_train": _summary(reference),
            "closest": pairs, "train": {"path": str(train_ds.root), "subjects": len(t_ids)},
            "reference": how,
            "protocol": "feature: VAE posterior mean of the ED frame on the VAE grid; distance: RMS per latent "
                        "element to the nearest TRAIN subject; flagged: closer than the closest reference "
                        "(real, not in TRAIN) subject comes; ed_mask_dice: mean Dice (RV, MYO, LV) of the pair's "
                        "ED masks on the grid"}
