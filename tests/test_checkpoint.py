"""The checkpoint format and its loads (weights.checkpoint), and the device choice."""
import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import save_file

from synth4d.cine import DataError, UserError
from synth4d.nets.config import get_preset
from synth4d.nets.device import select_device
from synth4d.weights.checkpoint import config_from_dict, read_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Inner:
    sizes: tuple = (1, 2)
    pairs: tuple = ((2, 2, 1), (2, 2, 2))


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    inner: Inner = field(default_factory=Inner)


def test_config_from_dict_restores_tuples_and_nesting():
    cfg = Outer("y", 0.25, Inner((3,), ((1, 2, 3),)))
    back = config_from_dict(Outer, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)
    vae = get_preset("paper").vae
    assert config_from_dict(type(vae), json.loads(json.dumps(dataclasses.asdict(vae)))) == vae
    with pytest.raises(ValueError, match="no field"):
        config_from_dict(Inner, {"sizes": [1], "bogus": 2})


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Conv3d(2, 3, 3)
    cfg = get_preset("tiny").vae
    path = save_checkpoint(tmp_path / "m.safetensors", model, "vae", cfg,
                           {"scale": 0.75, "grid": {"size": 24}, "eval": {"psnr": 30.0}})
    state, config, meta = read_checkpoint(path, stage="vae")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    assert config_from_dict(type(cfg), config) == cfg
    assert meta == {"scale": 0.75, "grid": {"size": 24}, "eval": {"psnr": 30.0}}
    assert not list(tmp_path.glob(".tmp*"))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "n.safetensors", model, "vae", cfg, {"stage": "x"})


def test_checkpoint_errors(tmp_path):
    cfg = get_preset("tiny").vae
    good = save_checkpoint(tmp_path / "vae.safetensors", torch.nn.Linear(2, 2), "vae", cfg)
    with pytest.raises(DataError, match="expected a 'static'"):
        read_checkpoint(good, stage="static")
    with pytest.raises(DataError, match="not found"):
        read_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a readable"):
        read_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"hello": "world"})
    with pytest.raises(DataError, match="not a synth4d checkpoint") as info:
        read_checkpoint(foreign)
    assert info.value.path == str(foreign)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        select_device("tpu:banana")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            select_device("cuda")


def test_load_chain_from_a_run_folder(tiny_weights, tmp_path):
    """One call gives a ready chain with its grid and priors; missing files and mismatched grids are one-line errors."""
    import shutil

    from synth4d.weights.checkpoint import load_chain
    chain = load_chain(tiny_weights)
    assert chain.grid == get_preset("tiny").grid and chain.dx_vocab == ["DCM", "HCM", "MINF", "NOR", "RV"]
    assert set(chain.static_norm) == set(chain.static.cfg.scalars) and "dx" in chain.priors
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_weights / "vae.safetensors", partial)
    with pytest.raises(UserError, match="no static.safetensors, motion.safetensors in"):
        load_chain(partial)
    for stage in ("static", "motion"):
        shutil.copy(tiny_weights / f"{stage}.safetensors", partial)
    state, config, meta = read_checkpoint(tiny_weights / "vae.safetensors")
    cfg = config_from_dict(type(get_preset("tiny").vae), config)
    save_checkpoint(partial / "vae.safetensors", state, "vae", cfg, {**meta, "grid": {"spacing": 3.0, "size": 24,
                                                                                      "slices": 12}})
    with pytest.raises(DataError, match="different grids"):
        load_chain(partial)


def test_denoiser_configs_of_removed_options(tiny_weights, tmp_path):
    """Checkpoints written with the temporal flag off still load; one trained with the layer is refused by name."""
    from synth4d.nets.config import UNetConfig
    from synth4d.weights.checkpoint import load_denoiser
    state, config, meta = read_checkpoint(tiny_weights / "motion.safetensors")
    cfg = config_from_dict(UNetConfig, config)
    for flag in (False, True):  # the config as versions with the layer wrote it
        save_file(state, str(tmp_path / f"motion_{flag}.safetensors"),
                  metadata={"format": "synth4d", "stage": "motion", "format_version": "1",
                            "config": json.dumps({**config, "temporal": flag}), **{k: json.dumps(v) for k, v in meta.items()}})
    model, _ = load_denoiser(tmp_path / "motion_False.safetensors", "motion")
    assert model.cfg == cfg
    with pytest.raises(DataError, match="temporal attention layer, which synth4d no longer has"):
        load_denoiser(tmp_path / "motion_True.safetensors", "motion")


def _edited(src, dst, config=None, meta=None, stage=None, tensors=None):
    """A copy of checkpoint src with its config, metadata, stage or tensors edited, as a user might."""
    from safetensors import safe_open
    with safe_open(str(src), framework="pt") as f:
        metadata, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if config is not None:
        metadata["config"] = json.dumps(config(json.loads(metadata["config"])))
    for k, v in (meta or {}).items():
        if v is None:
            metadata.pop(k, None)
        else:
            metadata[k] = json.dumps(v)
    if stage is not None:
        metadata["stage"] = stage
    state = tensors(state) if tensors else state
    save_file(state, str(dst), metadata=metadata)


def _nan_first(state):
    k = next(k for k, v in state.items() if v.is_floating_point())
    return {**state, k: state[k] * float("nan")}


HOSTILE_WEIGHTS = {  # stage file edited: (edit, what the error says)
    "static without priors": ("static", dict(meta={"priors": None}), "incomplete or invalid"),
    "static without grid": ("static", dict(meta={"grid": None}), "different grids"),
    "unknown config field": ("motion", dict(config=lambda c: {**c, "bogus": 1}), "no field"),
    "a schedule that does not exist": ("static", dict(meta={"schedule": "quadratic"}), "schedule"),
    "motion weights relabelled static": ("static", dict(stage="static", src="motion"), "not a static denoiser"),
    "200,000 channels": ("static", dict(config=lambda c: {**c, "widths": [200_000, 400_000]}),
                         "do not match their config"),
    "a NaN tensor": ("motion", dict(tensors=_nan_first), "NaN or infinite"),
    "a NaN latent scale": ("vae", dict(meta={"scale": float("nan")}), "latent scale"),
    "a NaN residual scale": ("motion", dict(meta={"residual_scale": float("nan")}), "incomplete or invalid"),
    "a normalisation for other conditions": ("static", dict(meta={"norm": {"x": [0, 1]}}), "incomplete or invalid"),
}


@pytest.mark.parametrize("case", list(HOSTILE_WEIGHTS))
def test_edited_weights_are_refused_in_one_line(tiny_weights, tmp_path, case):
    import shutil

    from synth4d.weights.checkpoint import load_chain
    stage, edit, why = HOSTILE_WEIGHTS[case]
    folder = tmp_path / "w"
    shutil.copytree(tiny_weights, folder)
    src = tiny_weights / f"{edit.pop('src', stage)}.safetensors"
    _edited(src, folder / f"{stage}.safetensors", **edit)
    with pytest.raises(DataError, match=why):
        load_chain(folder)


def test_auto_device_is_the_best_one_here():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    with pytest.raises(UserError, match="use auto, cpu"):
        select_device("gpu0")
