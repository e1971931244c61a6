"""Inception-I3D: shapes on 16-frame clips, piergiaj state-dict names and loading, TorchScript round trip."""
import pytest
import torch

from synth4d.cine import DataError
from synth4d.nets.i3d import InceptionI3d, load_i3d

# torch marks TorchScript deprecated, but it is the format of the I3D file FVD code shares.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
MIXED = ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = InceptionI3d().eval()
    # Random, non-trivial BatchNorm statistics, so that loading them matters.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def clips():
    return torch.rand(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, C, T, H, W)


@pytest.fixture(scope="module")
def features(model, clips):
    with torch.no_grad():
        return model(clips, return_features=True)


def test_shapes_on_16_frame_clips(model, clips, features):
    assert features.shape == (2, 400) and torch.isfinite(features).all()
    with torch.no_grad():
        probs = model(clips[:1])
        rescaled = model((clips[:1] + 1) * 127.5, rescale=True, return_features=True)
    assert probs.shape == (1, 400)
    torch.testing.assert_close(probs.sum(1), torch.ones(1))
    torch.testing.assert_close(rescaled, features[:1], atol=1e-4, rtol=1e-4)


def test_state_dict_uses_piergiaj_names(model):
    units = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
    units += [f"{m}.{b}" for m in MIXED for b in ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")]
    expected = {f"{u}.{p}" for u in units for p in ("conv3d.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                    "bn.running_var", "bn.num_batches_tracked")}
    expected |= {"logits.conv3d.weight", "logits.conv3d.bias"}
    state = model.state_dict()
    assert set(state) == expected
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert state["Mixed_3b.b0.conv3d.weight"].shape == (64, 192, 1, 1, 1)
    assert state["Mixed_5c.b1b.conv3d.weight"].shape == (384, 192, 3, 3, 3)
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)


@pytest.mark.parametrize("wrap", ["bare", "checkpoint"])
def test_state_dict_round_trip(model, clips, features, tmp_path, wrap):
    state = model.state_dict()
    if wrap == "bare":  # as piergiaj's rgb_imagenet.pt: saved before BatchNorm counted its batches
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:               # a DataParallel training checkpoint
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / "i3d.pt")
    loaded = load_i3d(tmp_path / "i3d.pt")
    assert loaded.kind == "state_dict"
    torch.testing.assert_close(loaded(clips), features)


def test_torchscript_round_trip(model, clips, features, tmp_path):
    torch.jit.script(model).save(str(tmp_path / "i3d_torchscript.pt"))
    with pytest.raises(DataError, match="runs code"):   # loading TorchScript executes it: only when asked
        load_i3d(tmp_path / "i3d_torchscript.pt")
    loaded = load_i3d(tmp_path / "i3d_torchscript.pt", allow_torchscript=True)
    assert loaded.kind == "torchscript"
    torch.testing.assert_close(loaded(clips), features)


def test_wrong_files_raise(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("logits")}
    torch.save({**state, "logits.conv3d.weight": torch.zeros(157, 1024, 1, 1, 1),
                "logits.conv3d.bias": torch.zeros(157)}, tmp_path / "charades.pt")
    with pytest.raises(DataError, match="400"):
        load_i3d(tmp_path / "charades.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="logits.conv3d.weight"):
        load_i3d(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DataError, match="neither"):
        load_i3d(tmp_path / "junk.pt")
