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
