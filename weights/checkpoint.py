"""The checkpoint format, and every load: the shipped weights, a user's run, a fine-tuning init.

A checkpoint (`<stage>.safetensors`, stage vae, static or motion) holds model weights only, plus
metadata from which the file alone rebuilds the model: "format" ("synth4d"), "stage", a
"format_version", the network "config" as JSON and any measured values (latent scale, grid,
condition normalisation, priors, training history), each JSON-encoded. Writes are atomic.
Anything that is not a usable checkpoint raises cine.DataError naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from synth4d.cine import DataError, UserError, atomic_write, first_line
from synth4d.nets.config import GridConfig, UNetConfig, VAEConfig
from synth4d.nets.device import select_device
from synth4d.nets.diffusion import make_schedule
from synth4d.nets.pipeline import Generator4D
from synth4d.nets.unet import UNet
from synth4d.nets.vae import VAE
from synth4d.weights import DIR

FORMAT_VERSION = "1"
STAGES = ("vae", "static", "motion")
_RESERVED = ("format", "stage", "format_version", "config")
REMOVED_AT = "5a66601"  # the last commit with the temporal layer and the other loss weightings


def save_checkpoint(path, model, stage: str, config, meta: dict | None = None) -> Path:
    """Write model weights (a module or a state dict) with stage, format version, config and meta."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {"format": "synth4d", "stage": stage, "format_version": FORMAT_VERSION,
                "config": json.dumps(dataclasses.asdict(config))}
    for key, value in (meta or {}).items():
        if key in _RESERVED:
            raise ValueError(f"meta key {key!r} is reserved")
        metadata[key] = json.dumps(value)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path, stage: str | None = None) -> tuple[dict, dict, dict]:
    """Read a checkpoint -> (state_dict, config dict, meta dict); DataError if it is not the expected one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for foreign or truncated files
        raise DataError(path, f"not a readable safetensors checkpoint ({type(e).__name__})") from None
    if metadata.get("format") != "synth4d" or "stage" not in metadata or "config" not in metadata:
        raise DataError(path, "not a synth4d checkpoint (no synth4d metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DataError(path, f"checkpoint format version {metadata.get('format_version')!r} is not "
                              f"supported (this synth4d reads {FORMAT_VERSION!r})")
    if stage is not None and metadata["stage"] != stage:
        raise DataError(path, f"a {metadata['stage']!r} checkpoint, expected a {stage!r} one")
    try:
        config = json.loads(metadata["config"])
        meta = {k: json.loads(v) for k, v in metadata.items() if k not in _RESERVED}
    except json.JSONDecodeError:
        raise DataError(path, "checkpoint metadata is not valid JSON") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DataError(path, f"tensor {bad} holds NaN or infinite values")
    if not isinstance(config, dict):
        raise DataError(path, "checkpoint config is not a JSON object")
    return state, config, meta


def config_from_dict(cls, d: dict):
    """Rebuild a (frozen) config dataclass from its JSON dict: lists become tuples, nested configs recurse."""
    hints = typing.get_type_hints(cls)

    def convert(value, hint):
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            return config_from_dict(hint, value)
        if isinstance(value, list):
            return tuple(convert(v, None) for v in value)
        return value

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return cls(**{k: convert(v, hints.get(k)) for k, v in d.items()})


def export_half(src, dst) -> Path:
    """Copy a checkpoint with its float tensors stored as float16: half the size, for shipping.

    Loading needs nothing special: load_state_dict casts them back into the float32 parameters.
    """
    read_checkpoint(src)  # a clear DataError for anything that is not a synth4d checkpoint
    with safe_open(str(src), framework="pt", device="cpu") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    return atomic_write(Path(dst), lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---- models from checkpoints ---------------------------------------------------------------

def _build(path, cls, cfg, state: dict):
    """The network of `cfg` with `state` loaded; DataError naming the file when they do not fit. The network
    is first built on the meta device (no memory), so a config that does not match the file's tensors,
    however large it claims to be, is refused before anything is allocated."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(path, f"unusable network config ({first_line(e)})") from None
    given = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != given:
        key = next(k for k in sorted(set(shapes) | set(given)) if shapes.get(k) != given.get(k))
        raise DataError(path, f"weights do not match their config (tensor {key}: config {shapes.get(key)}, "
                              f"file {given.get(key)})")
    model = cls(cfg)
    model.load_state_dict(state)
    return model


def unet_config(path, config: dict) -> UNetConfig:
    """A denoiser's config from its checkpoint. Checkpoints written before the temporal layer was removed
    name it (false); one trained with it cannot be loaded by this version."""
    config = dict(config)
    if config.pop("temporal", False):
        raise DataError(path, f"trained with the temporal attention layer, which synth4d no longer has "
                              f"(it was last in commit {REMOVED_AT})")
    try:
        return config_from_dict(UNetConfig, config)
    except (TypeError, ValueError) as e:
        raise DataError(path, f"unusable denoiser config ({first_line(e)})") from None


def load_vae(path, device="cpu") -> tuple[VAE, dict]:
    """Rebuild the VAE from a checkpoint file alone -> (model in eval mode on device, metadata).
    The metadata's "grid", when present, becomes a GridConfig."""
    state, config, meta = read_checkpoint(path, stage="vae")
    try:
        cfg = config_from_dict(VAEConfig, config)
        if "grid" in meta:
            meta["grid"] = config_from_dict(GridConfig, meta["grid"])
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(path, f"unusable VAE config or grid ({first_line(e)})") from None
    scale = meta.get("scale", 1.0)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise DataError(path, f"latent scale {scale!r} is not a positive number")
    return _build(path, VAE, cfg, state).to(select_device(str(device))).eval(), meta


def load_denoiser(path, stage: str, device="cpu") -> tuple[UNet, dict]:
    """Rebuild a static or motion denoiser -> (model in eval mode on device, metadata)."""
    state, config, meta = read_checkpoint(path, stage=stage)
    cfg = unet_config(path, config)
    motion = stage == "motion"
    if bool(cfg.ctx_ch) != motion or cfg.phase != motion:
        raise DataError(path, f"its network is not a {stage} denoiser (context channels {cfg.ctx_ch}, phase {cfg.phase})")
    return _build(path, UNet, cfg, state).to(select_device(str(device))).eval(), meta


def weights_folder(folder=None) -> Path:
    """The folder holding vae/static/motion .safetensors: `folder`, else the shipped weights."""
    folder = Path(folder) if folder is not None else DIR
    missing = [s for s in STAGES if not (folder / f"{s}.safetensors").is_file()]
    if missing:
        raise UserError(f"no {', '.join(f'{s}.safetensors' for s in missing)} in {folder}; "
                        "train them (synth4d train-vae, train-static, train-motion) or pass --weights")
    return folder


def weights_identity(folder=None) -> str:
    """A short digest of the vae/static/motion files in `folder` (default: the shipped weights): which weights
    made a generated subject."""
    h = hashlib.sha256()
    for stage in STAGES:
        with open(weights_folder(folder) / f"{stage}.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_chain(folder=None, device="cpu") -> Generator4D:
    """The generation chain from vae/static/motion .safetensors in `folder` (default: the shipped weights),
    on `device`, in the layout that runs conv3d fastest on the CPU (channels_last_3d)."""
    folder = weights_folder(folder)
    dev = select_device(device)
    vae, vae_meta = load_vae(folder / "vae.safetensors", dev)
    static, smeta = load_denoiser(folder / "static.safetensors", "static", dev)
    motion, mmeta = load_denoiser(folder / "motion.safetensors", "motion", dev)
    grid = vae_meta.get("grid")
    if grid is None or smeta.get("grid") != dataclasses.asdict(grid) or mmeta.get("grid") != smeta["grid"]:
        raise DataError(folder, "the vae, static and motion checkpoints were trained on different grids")
    try:
        sched = make_schedule(smeta["schedule"])
        norms = [_norm(m["norm"], net.cfg.scalars) for m, net in ((smeta, static), (mmeta, motion))]
        scales = [float(smeta["vae_scale"]), float(mmeta["residual_scale"])]
        if not all(math.isfinite(x) and x > 0 for x in scales) or smeta["pred"] not in ("eps", "v"):
            raise ValueError(f"scales {scales}, prediction {smeta['pred']!r}")
        if not (static.cfg.in_ch == motion.cfg.in_ch == vae.cfg.latent_ch and static.cfg.dx_vocab == motion.cfg.dx_vocab
                and {"fields", "all", "dx"} <= set(smeta["priors"])):
            raise ValueError("the three networks do not belong together (latent channels, diagnoses or priors)")
        chain = Generator4D(vae.to(memory_format=torch.channels_last_3d),
                            static.to(memory_format=torch.channels_last_3d),
                            motion.to(memory_format=torch.channels_last_3d), sched, *scales,
                            (grid.size // vae.cfg.factor,) * 2 + (grid.slices,),
                            norms[0], norms[1], grid, smeta["priors"], pred=smeta["pred"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(folder, f"checkpoint metadata incomplete or invalid ({type(e).__name__}: {e})") from None
    return chain


def _norm(norm: dict, names) -> dict:
    """A checkpoint's condition normalisation, checked: exactly the network's scalars, finite, std > 0."""
    out = {k: (float(v[0]), float(v[1])) for k, v in norm.items()}
    if list(out) != list(names) or not all(math.isfinite(m) and math.isfinite(s) and s > 0 for m, s in out.values()):
        raise ValueError(f"condition normalisation {norm} does not fit the scalars {list(names)}")
    return out


def load_init(path, model: UNet, stage: str, vae_scale: float) -> dict:
    """Load the weights at `path` into `model` to fine-tune them; returns their metadata. They must be of
    this stage, built like the model (same preset and diagnoses) and trained on latents of a VAE with the
    same scale; otherwise they would mean something else here."""
    state, config, meta = read_checkpoint(path, stage)
    if unet_config(path, config) != model.cfg:
        raise DataError(path, f"its network differs from this run's (preset or diagnoses {list(model.cfg.dx_vocab)}); "
                              "fine-tune with the same --preset on data with the same diagnoses")
    if not math.isclose(meta.get("vae_scale", float("nan")), vae_scale, rel_tol=1e-3):
        raise DataError(path, "it was trained on the latents of another VAE; give that VAE with --vae")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return meta
