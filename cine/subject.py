"""The Subject record every data set layout produces.

Axis vocabulary: a 4D cine image is (X, Y, Z, T): X, Y in-plane, Z the short-axis slice
(base to apex where known), T the cardiac frame. A 3D frame or mask is (X, Y, Z).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


@dataclass
class Subject:
    """One cine subject, loaded: image, sparse masks, geometry and clinical metadata."""

    id: str
    image: np.ndarray                     # (X, Y, Z, T) float32
    affine: np.ndarray                    # (4, 4) voxel -> world (mm), of the 4D image
    spacing: tuple                        # (sx, sy, sz) in mm
    frame_ms: Optional[float]             # duration of one frame in ms, None if unknown
    masks: dict = field(default_factory=dict)   # frame index (0-based) -> (X, Y, Z) uint8, labels 0 bg 1 RV 2 MYO 3 LV
    ed: int = 0                           # 0-based end-diastolic frame
    es: Optional[int] = None              # 0-based end-systolic frame, None if unknown
    dx: Optional[str] = None              # NOR, DCM, HCM, MINF, RV, or None (unknown)
    meta: dict = field(default_factory=dict)    # height, weight, vendor, centre, age, sex, ... where known
    full_mask: Optional[np.ndarray] = None      # (X, Y, Z, T) uint8; phantom ground truth, evaluation only
    path: str = ""                        # the 4D image file

    @property
    def n_frames(self) -> int:
        return int(self.image.shape[3])

    @property
    def labelled(self) -> bool:
        return bool(self.masks)


@dataclass
class SubjectRef:
    """A subject found by a layout scan, not yet loaded: metadata without the image."""

    id: str
    layout: str                           # "acdc", "mnms" or "folder"
    path: str                             # the 4D image file
    ed: int = 0
    es: Optional[int] = None
    dx: Optional[str] = None
    meta: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)   # role -> path, for provenance and cache keys
    loader: Optional[Callable[[], Subject]] = field(default=None, repr=False)

    def load(self) -> Subject:
        """Read the files; raises cine.DataError naming the file on any problem."""
        return self.loader()
