"""`synth4d preview SUBJECT OUT.png|OUT.gif`, and the preview `generate --preview` writes per subject.

SUBJECT is a subject as the loader finds it: a 4D image file of a plain folder or generated set, or
an ACDC subject folder. The PNG is a mosaic of up to 8 heart slices (rows ED and ES, masks outlined:
RV blue, MYO green, LV red); the GIF the mid-ventricular slice over the cycle, mask outlined.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from synth4d.cine import UserError
from synth4d.cine.datasets import scan
from synth4d.cine.measures import volume_curve
from synth4d.cine.preview import cine_frames, heart_slices, mosaic, write_gif, write_png


def find_subject(path: Path):
    """The loaded subject at `path` (a 4D image file or an ACDC subject folder)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    root = path.parent
    ds = scan(root)
    for ref in ds.refs:
        if (path.is_dir() and ref.id == path.name) or (path.is_file() and Path(ref.path).resolve() == path.resolve()):
            return ref.load()
    raise UserError(f"{path} is not a subject of the data set in {root} ({ds.layout} layout: give a 4D image file "
                    "or an ACDC subject folder)")


def render(image4d, mask4d, ed: int, es, frame_ms, out) -> Path:
    """Write the preview of one cine (+ optional full-cycle mask) to out (.png or .gif)."""
    out = Path(out)
    masks = {t: mask4d[..., t] for t in range(mask4d.shape[3])} if mask4d is not None else {}
    if es is None and mask4d is not None:
        es = int(np.argmin(volume_curve(mask4d, (1, 1, 1))["lv"]))
    if out.suffix.lower() == ".png":
        frames = {"ED": ed} if es is None or es == ed else {"ED": ed, "ES": es}
        return write_png(out, mosaic(image4d, frames, masks))
    if out.suffix.lower() == ".gif":
        zs = heart_slices(masks.get(ed), image4d.shape[2])
        return write_gif(out, cine_frames(image4d, mask4d, zs[len(zs) // 2]), frame_ms or 40.0)
    raise UserError(f"{out}: the preview is a .png (mosaic) or a .gif (cine)")


def preview(subject_path, out) -> Path:
    s = find_subject(subject_path)
    mask4d = s.full_mask
    if mask4d is None and s.masks:
        mask4d = np.zeros(s.image.shape, np.uint8)
        for t, m in s.masks.items():
            mask4d[..., t] = m
    es = s.es
    if es is None and s.masks and len(s.masks) < s.n_frames:
        es = next((t for t in sorted(s.masks) if t != s.ed), None)
    return render(s.image, mask4d, s.ed, es, s.frame_ms, out)
