"""`synth4d preview` and `generate --preview`: the PNG is a valid file holding the mosaic, masks outlined."""
import struct
import zlib

import numpy as np
from click.testing import CliRunner

from synth4d import cli
from synth4d.cine.preview import COLOURS, mosaic, png_bytes
from tests.conftest import run_cli


def decode_png(data: bytes) -> np.ndarray:
    """A minimal reader of the PNGs png_bytes writes (8-bit RGB, filter 0), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:] == bytes([8, 2, 0, 0, 0])
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    h, w = size[1], size[0]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(h, w, 3)


def test_png_round_trip_and_outlines():
    image = np.random.default_rng(0).normal(size=(20, 24, 5, 3)).astype(np.float32)
    mask = np.zeros((20, 24, 5), np.uint8)
    mask[5:15, 6:18, 1:4] = 2
    mask[8:12, 9:15, 1:4] = 3
    pic = mosaic(image, {"ED": 0, "ES": 2}, {0: mask})
    assert np.array_equal(decode_png(png_bytes(pic)), pic)
    scale = -(-160 // 24)
    assert pic.shape == (2 * 24 * scale + 2, 3 * 20 * scale + 2 * 2, 3)      # rows ED, ES; the 3 slices with heart;
    top, bottom = pic[: 24 * scale], pic[24 * scale + 2:]                     # a tile is Y rows by X columns
    for label in (2, 3):                                                     # outlined at ED, not at ES (no mask)
        assert (top == COLOURS[label]).all(axis=2).any() and not (bottom == COLOURS[label]).all(axis=2).any()


def test_preview_cli_png_and_errors(tiny_phantom, tmp_path):
    out = run_cli("preview", tiny_phantom / "patient001", tmp_path / "p.png").stdout.strip()
    pic = decode_png((tmp_path / "p.png").read_bytes())
    assert out == str(tmp_path / "p.png") and pic.ndim == 3 and pic.shape[0] > 160
    image = tiny_phantom / "patient002" / "patient002_4d.nii.gz"
    result = CliRunner().invoke(cli, ["preview", str(image), str(tmp_path / "p.jpg")])
    assert result.exit_code != 0 and ".png" in str(result.exception) and not (tmp_path / "p.jpg").exists()
    frame = tiny_phantom / "patient002" / "patient002_frame01.nii.gz"
    result = CliRunner().invoke(cli, ["preview", str(frame), str(tmp_path / "q.png")])
    assert result.exit_code != 0 and "not a subject" in str(result.exception)


def test_gif_needs_pillow_or_makes_a_gif(tiny_phantom, tmp_path):
    result = CliRunner().invoke(cli, ["preview", str(tiny_phantom / "patient001"), str(tmp_path / "c.gif")])
    try:
        import PIL  # noqa: F401
    except ImportError:
        assert result.exit_code != 0 and "pip install 'synth4d[preview]'" in str(result.exception)
        return
    assert result.exit_code == 0 and (tmp_path / "c.gif").read_bytes()[:6] == b"GIF89a"


def test_generate_preview_beside_each_subject(tiny_weights, tmp_path):
    for layout, name in (("flat", "synth_0000.png"), ("acdc", "patient001/patient001.png")):
        out = tmp_path / layout
        paths = run_cli("generate", "--weights", tiny_weights, "--n", 1, "--frames", 4, "--steps", 2, "--layout",
                        layout, "--preview", out).stdout.split()
        assert str(out / name) in paths and decode_png((out / name).read_bytes()).shape[2] == 3
