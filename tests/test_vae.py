"""The VAE: shapes, posterior, semi-supervised loss, checkpoint, exact resume, CLI train + segment."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import synth4d.train.vae as tv
import synth4d.jobs.segment
from synth4d.cine import DataError, UserError, nifti
from synth4d.cine.prep import prepare_dataset
from synth4d.nets.config import VAEConfig, get_preset
from synth4d.nets.vae import VAE, DiagonalGaussian
from synth4d import cli
from synth4d.weights.checkpoint import load_vae, read_checkpoint, save_checkpoint
from synth4d.jobs.segment import segment
from tests.conftest import interrupt_each_write

TINY = get_preset("tiny")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a busy machine they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from synth4d.cine.phantom import write_phantom
    root = tmp_path_factory.mktemp("phantom")
    list(write_phantom(root, n=3, seed=0, frames=6, matrix=48, progress=False))
    return root


@pytest.mark.parametrize("cfg", [TINY.vae, get_preset("cpu").vae], ids=["factor2", "factor4"])
def test_odd_sizes_are_padded_and_cropped_back(cfg):
    torch.manual_seed(0)
    model = VAE(cfg)
    image, logits, posterior = model(torch.randn(1, 1, 18, 22, 5))
    assert image.shape == (1, 1, 18, 22, 5) and logits.shape == (1, cfg.n_classes, 18, 22, 5)
    f = cfg.factor
    assert posterior.mean.shape == (1, cfg.latent_ch, -(-18 // f), -(-22 // f), 5)
    assert model.decode(posterior.mode())[0].shape[2:4] == (-(-18 // f) * f, -(-22 // f) * f)


def test_planar_levels_convolve_in_plane_only():
    """planar=2: the two finest levels' convolutions have 3x3x1 kernels, the coarsest 3x3x3; an old
    checkpoint's config (no planar field) builds the all-3D network it was trained with."""
    cfg = get_preset("cpu").vae
    assert cfg.planar == 2
    vae = VAE(cfg)
    first, last = vae.encoder.body[0].conv1, vae.encoder.body[-1].conv1
    assert first.kernel_size == (3, 3, 1) and last.kernel_size == (3, 3, 3)
    assert vae.image_decoder.out[-1].kernel_size == (3, 3, 1)
    x = torch.zeros(1, 1, 96, 96, 5)
    z = vae.encode(x).mean
    assert z.shape == (1, 4, 24, 24, 5) and vae.decode(z)[0].shape == x.shape
    assert VAE(VAEConfig(widths=(12, 24, 48))).encoder.body[0].conv1.kernel_size == (3, 3, 3)


def test_posterior():
    mean, logvar = torch.randn(2, 3, 4, 4, 2), torch.randn(2, 3, 4, 4, 2)
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(q.mode(), mean)
    a, b = q.sample(torch.Generator().manual_seed(1)), q.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(q.kl(), ref)
    assert q.kl().shape == (2,)
    zero = DiagonalGaussian(torch.zeros(1, 2, 3, 3, 1))
    assert torch.equal(zero.kl(), torch.zeros(1))
    huge = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 1e4)], dim=1))
    assert torch.isfinite(huge.kl()).all() and huge.logvar.max() == 20.0


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 24, 24, 12, generator=g) * 2 - 1
    mask = torch.randint(0, 4, (n, 24, 24, 12), generator=g)
    zmask = torch.ones(n, 1, 1, 1, 12)
    zmask[:, ..., 9:] = 0
    return x, mask, zmask


def test_mask_loss_ignores_unlabelled_frames():
    torch.manual_seed(0)
    model = VAE(TINY.vae)
    x, mask, zmask = _batch()

    def run(label_w, mask=mask):
        model.zero_grad()
        image, logits, posterior = model(x, sample=False)
        losses = tv.vae_loss(image, logits, posterior, x, mask, label_w, zmask)
        losses["loss"].backward()
        return losses, [p.grad.clone() for p in model.mask_decoder.parameters()]

    losses, grads = run(torch.zeros(3))
    assert losses["ce"] == 0 and losses["dice"] == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    losses, grads = run(torch.tensor([0.0, 1.0, 0.0]))
    assert losses["ce"] > 0 and torch.count_nonzero(grads[-2]) > 0  # the output conv's weight
    # Whatever the unlabelled frames' (dummy) masks hold, nothing changes.
    other = mask.clone()
    other[0], other[2] = 0, 3
    losses2, grads2 = run(torch.tensor([0.0, 1.0, 0.0]), other)
    assert losses2["ce"] == losses["ce"] and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    # Padding slices count in no loss.
    beyond = mask.clone()
    beyond[..., 9:] = (beyond[..., 9:] + 1) % 4
    losses3, _ = run(torch.tensor([0.0, 1.0, 0.0]), beyond)
    assert losses3["ce"] == losses["ce"] and losses3["dice"] == losses["dice"]


def test_frequency_term_against_numpy_and_its_padding():
    """Mean |rfft2(image - target)| (orthonormal) over the real slices' coefficients, as numpy computes it;
    padding slices count in no term; a blurred copy scores worse than a shifted-intensity copy of equal L1."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 16, 12, 5, generator=g) * 2 - 1
    image = target + 0.1 * torch.randn(target.shape, generator=g)
    zmask = torch.ones(2, 1, 1, 1, 5)
    zmask[1, ..., 3:] = 0
    got = tv.frequency_l1(image, target, zmask).item()
    diff = (image - target).numpy()[:, 0]                                       # (B, X, Y, Z)
    coeffs = [np.abs(np.fft.rfft2(diff[b, :, :, z], norm="ortho")) for b in range(2) for z in range(5)
              if zmask[b, 0, 0, 0, z] > 0]
    assert got == pytest.approx(np.mean(coeffs), rel=1e-5)
    junk = image.clone()
    junk[1, ..., 3:] = 5.0
    assert tv.frequency_l1(junk, target, zmask).item() == pytest.approx(got, rel=1e-6)
    # An edge blurred vs the same edge with a constant offset of the same pixel L1: the blur costs more
    edge = torch.zeros(1, 1, 32, 32, 1)
    edge[:, :, 10:22, 10:22] = 1.0
    blurred = torch.nn.functional.avg_pool3d(edge, (3, 3, 1), stride=1, padding=(1, 1, 0), count_include_pad=False)
    offset = edge + (blurred - edge).abs().mean()
    one = torch.ones(1, 1, 1, 1, 1)
    assert (blurred - edge).abs().mean() == pytest.approx((offset - edge).abs().mean().item())
    assert tv.frequency_l1(blurred, edge, one) > 2 * tv.frequency_l1(offset, edge, one)


def test_ssim_term_against_the_metric_and_its_padding():
    """slice_ssim is cine.metrics.ssim per slice, differentiably; the term is 1 - SSIM averaged over the real
    slices only, 0 for a perfect image, and larger for a blurred copy than for a shifted-intensity copy of equal L1."""
    from synth4d.cine.metrics import ssim
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 16, 12, 5, generator=g) * 2 - 1
    image = (target + 0.2 * torch.randn(target.shape, generator=g)).requires_grad_(True)
    zmask = torch.ones(2, 1, 1, 1, 5)
    zmask[1, ..., 3:] = 0
    scores = tv.slice_ssim(tv.real_slices(image, zmask), tv.real_slices(target, zmask))
    want = [ssim(image[b, 0, :, :, z].detach().numpy(), target[b, 0, :, :, z].numpy(), data_range=2.0)
            for b in range(2) for z in range(5) if zmask[b, 0, 0, 0, z] > 0]
    assert scores.detach().numpy() == pytest.approx(want, abs=1e-5)
    totals = tv.loss_totals(target, torch.zeros(2), zmask)
    terms = tv.image_loss(image, target, zmask, totals, ssim=1.0)
    assert terms["ssim"].item() == pytest.approx(1 - np.mean(want), abs=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["l1"].item() + terms["ssim"].item(), rel=1e-6)
    terms["loss"].backward()
    assert torch.count_nonzero(image.grad[1, ..., 3:]) == 0 and torch.count_nonzero(image.grad[0]) > 0
    junk = image.detach().clone()
    junk[1, ..., 3:] = 5.0
    assert tv.image_loss(junk, target, zmask, totals, ssim=1.0)["ssim"].item() == pytest.approx(terms["ssim"].item())
    assert tv.image_loss(target, target, zmask, totals, ssim=1.0)["ssim"].item() == pytest.approx(0.0, abs=1e-6)
    assert "ssim" not in tv.image_loss(image, target, zmask, totals)
    edge = torch.full((1, 1, 32, 32, 1), -1.0)
    edge[:, :, 10:22, 10:22] = 1.0
    blurred = torch.nn.functional.avg_pool3d(edge, (3, 3, 1), stride=1, padding=(1, 1, 0), count_include_pad=False)
    offset = edge + (blurred - edge).abs().mean()
    one = torch.ones(1, 1, 1, 1, 1)
    single = tv.loss_totals(edge, torch.zeros(1), one)
    assert tv.image_loss(blurred, edge, one, single, ssim=1.0)["ssim"] > tv.image_loss(offset, edge, one, single,
                                                                                        ssim=1.0)["ssim"]


def test_finetune_decoder_trains_the_image_decoder_alone(phantom, tmp_path, monkeypatch):
    """--finetune-decoder: encoder and mask decoder bit for bit the file's (the latents, their scale and the
    masks stay), the image decoder moves; it resumes exactly; a VAE of another preset is refused before
    anything is written."""
    cache = tmp_path / "cache"
    prepare_dataset(phantom, TINY.grid, cache_dir=cache, progress=False)
    start = tv.train_vae(phantom, tmp_path / "vae", preset="tiny", steps=2, batch_size=2, eval_every=2, cache=cache)
    run = dict(preset="tiny", steps=6, batch_size=2, eval_every=3, cache=cache, ssim=1.0, finetune_decoder=start)
    tv.train_vae(phantom, tmp_path / "a", **run)
    before, _, meta0 = read_checkpoint(start, stage="vae")
    after, _, meta1 = read_checkpoint(tmp_path / "a" / "vae_last.safetensors", stage="vae")
    assert before.keys() == after.keys()
    for part in ("encoder.", "mask_decoder."):
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(part))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("image_decoder."))
    assert meta1["scale"] == pytest.approx(meta0["scale"], rel=1e-6)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["finetune_decoder"] == str(start)
    assert "image decoder only" in (tmp_path / "a" / "log.txt").read_text()

    _killed_in_step_4(monkeypatch, lambda: tv.train_vae(phantom, tmp_path / "b", **run))
    tv.train_vae(phantom, tmp_path / "b", resume=True, preset="tiny", cache=cache, eval_every=3)
    a, b = load_file(tmp_path / "a" / "vae_last.safetensors"), load_file(tmp_path / "b" / "vae_last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    cpu_vae = tmp_path / "cpu_vae.safetensors"
    save_checkpoint(cpu_vae, VAE(get_preset("cpu").vae), "vae", get_preset("cpu").vae, {"scale": 1.0})
    with pytest.raises(UserError, match="cpu_vae.safetensors: a VAE of another preset"):
        tv.train_vae(phantom, tmp_path / "c", preset="tiny", steps=2, finetune_decoder=cpu_vae)
    assert not (tmp_path / "c").exists()


def test_patch_critic_scores_patches_and_real_slices_skip_padding():
    from synth4d.nets.vae import PatchDiscriminator
    critic = PatchDiscriminator()
    assert critic(torch.zeros(3, 1, 96, 96)).shape == (3, 1, 12, 12)
    volume = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 1, 1, 1, 4).expand(2, 1, 8, 8, 4)
    zmask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32).reshape(2, 1, 1, 1, 4)
    slices = tv.real_slices(volume, zmask)
    assert slices.shape == (5, 1, 8, 8) and slices[:, 0, 0, 0].tolist() == [0, 1, 4, 5, 6]


def test_checkpoint_rebuilds_identical_model(tmp_path):
    torch.manual_seed(0)
    cfg = VAEConfig(widths=(8, 16), latent_ch=2, blocks=2)
    model = VAE(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised heads would make any model look alike
    path = save_checkpoint(tmp_path / "vae.safetensors", model, "vae", cfg,
                           {"grid": {"spacing": 6.0, "size": 24, "slices": 12}, "scale": 1.5})
    loaded, meta = load_vae(path)
    assert loaded.cfg == cfg and meta["scale"] == 1.5 and meta["grid"] == TINY.grid
    x = torch.randn(2, 1, 24, 24, 12)
    with torch.no_grad():
        a, b = model(x, sample=False), loaded(x, sample=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _killed_in_step_4(monkeypatch, train):
    """Run train() with a kill in step 4, after the resume state of step 3 was written."""
    real = tv.lr_at

    def crash_in_step_4(step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(tv, "lr_at", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(tv, "lr_at", real)


def test_resume_equals_uninterrupted(phantom, tmp_path, monkeypatch):
    run = dict(preset="tiny", steps=6, batch_size=2, eval_every=3, cache=tmp_path / "cache")
    # Fill the cache first: cine.prep stores images as float16, so a fresh preparation differs from a cached one.
    prepare_dataset(phantom, TINY.grid, cache_dir=tmp_path / "cache", progress=False)
    tv.train_vae(phantom, tmp_path / "a", **run)

    _killed_in_step_4(monkeypatch, lambda: tv.train_vae(phantom, tmp_path / "b", **run))
    with pytest.raises(UserError, match="--resume"):
        tv.train_vae(phantom, tmp_path / "b", **run)
    tv.train_vae(phantom, tmp_path / "b", resume=True, preset="tiny", cache=tmp_path / "cache", eval_every=3)

    for name in ("vae_last.safetensors", "vae.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "a" / "vae.state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "vae.state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    with pytest.raises(UserError, match="nothing to resume"):
        tv.train_vae(phantom, tmp_path / "c", resume=True, preset="tiny")

    # Killed after the first checkpoints were written but before the first resume state: not stuck.
    real_save = tv.save_state

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tv, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        tv.train_vae(phantom, tmp_path / "d", **run)
    monkeypatch.setattr(tv, "save_state", real_save)
    assert (tmp_path / "d" / "vae.safetensors").is_file() and not (tmp_path / "d" / "vae.state.pt").exists()
    with pytest.raises(UserError, match="--resume"):
        tv.train_vae(phantom, tmp_path / "d", **run)
    tv.train_vae(phantom, tmp_path / "d", resume=True, preset="tiny", cache=tmp_path / "cache", eval_every=3)
    a, d = load_file(tmp_path / "a" / "vae.safetensors"), load_file(tmp_path / "d" / "vae.safetensors")
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_cli_train_then_segment(phantom, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(cli, ["train-vae", str(phantom), "--out", str(out), "--preset", "tiny", "--steps", "4",
                                 "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    ckpt = Path(result.stdout.strip().splitlines()[-1])
    assert ckpt == out / "vae.safetensors" and ckpt.is_file()
    _, _, meta = read_checkpoint(ckpt, stage="vae")
    assert meta["preset"] == "tiny" and meta["scale"] > 0 and "psnr" in meta["eval"]
    assert (out / "split.json").is_file() and (out / "log.txt").is_file()

    cine_path = sorted(phantom.rglob("*_4d.nii.gz"))[0]
    dest = tmp_path / "seg" / "mask.nii.gz"
    result = runner.invoke(cli, ["segment", str(cine_path), str(dest), "--weights", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dest)
    image, geom = nifti.read(cine_path, ndim=4)
    mask, mgeom = nifti.read(dest, ndim=4, kind="mask")
    assert mask.shape == image.shape and np.allclose(mgeom.affine, geom.affine) and mgeom == geom
    assert mask.max() <= 3
    with pytest.raises(UserError, match="--overwrite"):
        next(segment(cine_path, dest, weights=ckpt))
    row = next(segment(cine_path, dest, weights=ckpt, overwrite=True))
    assert len(row["lv_curve"]) == image.shape[3] and row["lvedv"] >= row["lvesv"]
    monkeypatch.setattr(synth4d.jobs.segment, "DIR", tmp_path / "no_weights_here")
    with pytest.raises(UserError, match="no shipped VAE weights"):
        next(segment(cine_path, tmp_path / "x.nii.gz"))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(phantom, tmp_path, monkeypatch):
    run = dict(preset="tiny", steps=6, batch_size=2, eval_every=2, cache=tmp_path / "cache")
    real = tv.vae_loss
    calls = []

    def nan_at_step_4(*args, **kw):
        calls.append(1)
        losses = real(*args, **kw)
        return {**losses, "loss": losses["loss"] * float("nan")} if len(calls) == 4 else losses

    monkeypatch.setattr(tv, "vae_loss", nan_at_step_4)
    with pytest.raises(UserError, match="loss became nan at step 4"):
        tv.train_vae(phantom, tmp_path / "a", **run)
    state = torch.load(tmp_path / "a" / "vae.state.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "a" / "vae.safetensors").values())


def test_json_output_is_strict(tmp_path):
    """A cine with no heart in it has no ejection fraction: segment --json says null, never NaN."""
    geom = nifti.Geometry.from_spacing((1.5, 1.5, 8.0), frame_ms=40.0)
    nifti.write(tmp_path / "empty.nii.gz", np.zeros((40, 40, 4, 3), np.float32), geom)
    result = CliRunner().invoke(cli, ["segment", str(tmp_path / "empty.nii.gz"), str(tmp_path / "m.nii.gz"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert row["lvedv"] == 0.0 and row["lvef"] is None


def test_segment_is_all_or_nothing_and_checks_its_outputs_first(tmp_path):
    """A bad file among good ones leaves no mask behind; outputs under a file or onto a folder are refused
    before the model runs."""
    geom = nifti.Geometry.from_spacing((1.5, 1.5, 8.0), frame_ms=40.0)
    cines = tmp_path / "cines"
    for name in ("a", "b", "c"):
        nifti.write(cines / f"{name}.nii.gz", np.zeros((40, 40, 4, 3), np.float32), geom)
    bad = np.zeros((40, 40, 4, 3), np.float32)
    bad[0, 0, 0, 0] = np.nan
    nifti.write(cines / "b.nii.gz", bad, geom)
    with pytest.raises(DataError, match="NaN or infinite"):
        list(segment(cines, tmp_path / "masks"))
    assert not (tmp_path / "masks").exists() or not list((tmp_path / "masks").glob("*.nii.gz"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        list(segment(cines / "a.nii.gz", tmp_path / "a_file" / "mask.nii.gz"))
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        list(segment(cines / "a.nii.gz", tmp_path / "dir.nii.gz", overwrite=True))


def test_a_fault_at_any_atomic_write_of_training_is_recovered(phantom, tmp_path, monkeypatch):
    """Interrupt at the k-th atomic write of a run (run.json, split.json, checkpoints, resume state), then
    --resume (or start, when nothing was written): the run always ends with the weights, metadata and split of
    an uninterrupted one."""
    import synth4d.train.common as common
    import synth4d.weights.checkpoint as checkpoint
    run = dict(preset="tiny", steps=4, batch_size=2, eval_every=2, cache=tmp_path / "cache")
    prepare_dataset(phantom, TINY.grid, cache_dir=tmp_path / "cache", progress=False)
    tv.train_vae(phantom, tmp_path / "whole", **run)
    names = ("vae.safetensors", "vae_last.safetensors", "split.json")

    def contents(folder):  # safetensors writes its metadata in a per-process order: compare what it holds
        out = {n: read_checkpoint(folder / n)[::2] for n in names[:2]}
        return {n: ({k: v.numpy().tobytes() for k, v in state.items()}, meta) for n, (state, meta) in out.items()} | {
            "split.json": (folder / "split.json").read_bytes()}

    def train(out, resume=False):
        tv.train_vae(phantom, out, resume=resume, **({**run, "steps": None} if resume else run))

    k = interrupt_each_write(train, (tv, common, checkpoint), monkeypatch, tmp_path, contents,
                             contents(tmp_path / "whole"))
    # run.json, split.json, then the last checkpoint, the best one (at step 4 only if it scored better) and the
    # resume state, twice; the critic of the adversarial term (on from step 1) resumes with the state
    best_again = read_checkpoint(tmp_path / "whole" / "vae.safetensors")[2]["step"] == 4
    assert k == 8 + best_again
