"""synth4d: controllable 4D cine cardiac MRI synthesis with paired segmentation masks.

The command-line interface, and the package's front door. Each command parses its options, calls
one library function and prints the result: data (paths, JSON) to stdout, logs and progress bars to
stderr. A user mistake ends with a one-line error and a non-zero exit, never a traceback.

The Python API is `synth4d.load` (see its docstring and the README).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

__version__ = "0.1.0"
if __name__ == "synth4d":
    # Imported from a checkout (the repository root on sys.path, as in its tests): this module stands for
    # the package, whose subpackages (cine, nets, train, jobs, weights) are the folders beside it. Installed,
    # the package is the repository root itself (pyproject.toml) and this module is synth4d.synth4d.
    __path__ = [str(Path(__file__).resolve().parent)]

from synth4d.cine import DataError, UserError  # noqa: E402  (needs __path__)
from synth4d.cine.measures import MEASURES  # noqa: E402
from synth4d.cine.priors import ES_PHASE_RANGE  # noqa: E402
PRESET_NAMES = ("tiny", "cpu", "paper")
DATA = click.Path(exists=True, file_okay=False, path_type=Path)
DEVICE = click.option("--device", default="auto", show_default=True,
                      help="torch device: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:1, mps.")


def _set_precision(ctx, param, value):
    from synth4d.nets.device import set_precision
    set_precision(value)


PRECISION = click.option("--precision", type=click.Choice(("auto", "fp32", "bf16")), default="auto", show_default=True,
                         expose_value=False, callback=_set_precision, is_eager=True,
                         help="Arithmetic of the networks: auto is bf16 on CUDA and on CPUs with native bf16 "
                              "(avx512_bf16, AMX), else fp32.")


def load(weights=None, device: str = "auto"):
    """The Python API: a Synthesizer (synth4d.jobs.synthesize) on the weights in folder `weights`
    (vae/static/motion .safetensors), else the shipped ones. `.generate(dx=..., lvedv=..., seed=...)`
    returns one subject: image and mask (X, Y, Z, T) arrays, affine, spacing, requested and measured values."""
    from synth4d.jobs.synthesize import load as load_synthesizer
    return load_synthesizer(weights, device)


def _echo_json(obj):
    """One line of strict JSON: NaN and infinities become null (json.dumps would write NaN, which is not JSON)."""
    from synth4d.jobs.report import clean
    click.echo(json.dumps(clean(obj), indent=None, default=str, allow_nan=False))


CSV = click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                   help="The information CSV of an M&Ms / M&Ms-2 tree, when it is not in DATA or the folders above.")


def _common_train(f):
    """Options every training stage shares."""
    opts = [
        click.option("--preset", type=click.Choice(PRESET_NAMES), default="cpu", show_default=True,
                     help="Network and grid sizes (tiny: tests; cpu: this tool's default; paper: published, GPU)."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps [preset default]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size [preset default]."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate [preset default]."),
        click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped."),
        DEVICE,
        PRECISION,
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split, initialisation and batches."),
        click.option("--skip-bad", is_flag=True, help="Skip subjects whose files are unusable (listed on stderr) instead of stopping."),
        click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder for prepared arrays [~/.cache/synth4d]."),
        CSV,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="synth4d")
def cli():
    """Synthesise 4D (3D + time) cine cardiac MRI with paired segmentation masks,
    controlled by diagnosis, ventricular volumes and ejection fraction.

    \b
    Typical use:
      synth4d phantom data/ --n 200          # a built-in 4D phantom data set (ACDC layout)
      synth4d info data/                     # what the loader sees
      synth4d train-vae data/                # stage 1: image + mask VAE
      synth4d train-static data/             # stage 2: end-diastolic anatomy
      synth4d train-motion data/             # stage 3: motion over the cycle
      synth4d generate --dx HCM --n 50 out/  # 4D image + mask NIfTI + manifest
      synth4d eval data/ out/                # FVD-style distance, controllability, coherence
      synth4d eval data/ out/ --realism      # a segmenter fitted on real frames judges GENERATED
      synth4d preview out/synth_0000.nii.gz s.png                    # look at a subject
      synth4d export-nnunet data/ out/ nnUNet_raw/ --id 501 --name X  # one nnU-Net v2 data set
    """


@cli.command()
@click.argument("data", type=DATA)
@click.option("--json", "as_json", is_flag=True, help="Print the report, per subject, as JSON on stdout.")
@click.option("--skip-bad", is_flag=True, help="List unusable subjects instead of stopping at the first.")
@CSV
def info(data, as_json, skip_bad, csv_path):
    """Summarise the data set in DATA: layout, subjects, diagnoses, labelled frames, geometry, volumes.

    Layouts: ACDC (patientNNN/ with Info.cfg), M&Ms (<code>/<code>_sa.nii.gz + information CSV), M&Ms-2
    (NNN/NNN_SA_CINE.nii.gz, _SA_ED/_SA_ES volumes and _gt masks + dataset_information.csv), or a
    folder of 4D NIfTI files with an optional CSV.
    """
    from synth4d.cine.info import format_info, info_report
    report = info_report(data, skip_bad=skip_bad, csv_path=csv_path)
    if as_json:
        _echo_json(report)
    else:
        click.echo(format_info(report))


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=100, show_default=True, help="Number of subjects.")
@click.option("--seed", type=int, default=0, show_default=True, help="Makes the data set reproducible.")
@click.option("--dx", type=click.Choice(("NOR", "DCM", "HCM", "MINF", "RV", "mixed")), default="mixed", show_default=True,
              help="Diagnosis of every subject, or an even mix of all five.")
@click.option("--vendor", default="mixed", show_default=True,
              help="Acquisition style (see `synth4d phantom --help` output for names), or mixed.")
@click.option("--overwrite", is_flag=True, help="Replace subjects already in OUT.")
def phantom(out, n, seed, dx, vendor, overwrite):
    """Write a 4D cardiac phantom data set to OUT in ACDC layout.

    Each subject has Info.cfg, the 4D cine, ED/ES frames with their masks, and (for evaluation
    only) a full-cycle mask patientNNN_4d_gt.nii.gz that training never reads.
    Vendors: see cine.phantom.VENDORS (A, B, C, D).
    """
    from synth4d.cine.phantom import write_phantom
    for path in write_phantom(out, n=n, seed=seed, dx=dx, vendor=vendor, overwrite=overwrite):
        click.echo(path)


@cli.command("train-vae")
@click.argument("data", type=DATA)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/vae"), show_default=True,
              help="Run folder: vae.safetensors, resume state, split, log.")
@_common_train
@click.option("--eval-every", type=click.IntRange(min=1), default=500, show_default=True, help="Held-out evaluation interval (steps).")
@click.option("--frequency", type=click.FloatRange(min=0), default=None,
              help="Weight of the in-plane frequency-domain L1 on the image [1; 0: off].")
@click.option("--adversarial", type=click.FloatRange(min=0), default=None,
              help="Weight of the patch adversarial loss on the image, from a quarter of the run on [0.05; 0: off].")
@click.option("--ssim", type=click.FloatRange(min=0), default=None,
              help="Weight of an SSIM term (1 - SSIM of the slices) on the image [0: off].")
@click.option("--finetune-decoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Train only the image decoder of this VAE file; its latents and masks stay the same, so diffusion "
                   "stages trained on it keep working with the result.")
def train_vae(data, out, **kw):
    """Stage 1: train the semi-supervised image + mask VAE on DATA."""
    from synth4d.train.vae import train_vae as run
    click.echo(run(data, out, **kw))


@cli.command()
@click.argument("image", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="vae.safetensors [the shipped default].")
@DEVICE
@PRECISION
@click.option("--json", "as_json", is_flag=True, help="Print measures as JSON lines on stdout.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def segment(image, out, weights, device, as_json, overwrite):
    """Segment a 4D cine (a NIfTI file, or a folder of them) with the VAE's mask head.

    Writes the full-cycle 4D mask on the input's own grid, and reports the LV/RV volume curve,
    LVEDV, LVESV and LVEF.
    """
    from synth4d.jobs.segment import segment as run
    for row in run(image, out, weights=weights, device=device, overwrite=overwrite):
        _echo_json(row) if as_json else click.echo(row["mask"])


def _train_ldm(stage):
    @click.argument("data", type=DATA)
    @click.option("--vae", "vae_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help="vae.safetensors [runs/vae/vae.safetensors].")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(f"runs/{stage}"), show_default=True)
    @click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                  help=f"Start from these {stage}.safetensors weights (e.g. weights/{stage}.safetensors to fine-tune "
                       "the shipped model on your data); optimiser and schedule start afresh.")
    @_common_train
    def command(data, vae_path, out, **kw):
        import importlib
        run = getattr(importlib.import_module(f"synth4d.train.{stage}"), f"train_{stage}")
        click.echo(run(data, vae_path or Path("runs/vae/vae.safetensors"), out, **kw))
    return command


cli.command("train-static", help="Stage 2: train the static LDM (end-diastolic anatomy) on DATA's encoded ED frames.")(
    _train_ldm("static"))
cli.command("train-motion", help="Stage 3: train the motion LDM (residual latents over the cycle) on DATA.")(
    _train_ldm("motion"))


@cli.command("export-weights")
@click.argument("runs", type=DATA)
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace checkpoints already in DEST.")
def export_weights(runs, dest, overwrite):
    """Copy RUNS/{vae,static,motion}/<stage>.safetensors into DEST as float16, ready for --weights.

    This is how the shipped weights/ folder is made (see weights/README.md).
    """
    from synth4d.weights.checkpoint import STAGES, export_half
    for stage in STAGES:
        target = dest / f"{stage}.safetensors"
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists; pass --overwrite to replace it")
        click.echo(export_half(runs / stage / f"{stage}.safetensors", target))


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("shards", type=DATA, nargs=-1, required=True)
def merge(out, shards):
    """Merge folders written by `generate --shard K/N` jobs into OUT, as one run would have written it.

    \b
      for k in 1 2 3 4; do synth4d generate --n 1000 --shard $k/4 part$k/ & done; wait
      synth4d merge synthetic/ part1/ part2/ part3/ part4/
    """
    from synth4d.jobs.merge import merge as run
    ids = run(out, shards)
    click.echo(f"{len(ids)} subjects in {out / 'manifest.csv'}")


@cli.command()
@click.argument("subject", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def preview(subject, out):
    """Picture SUBJECT (a 4D image file or an ACDC subject folder) as OUT.

    OUT.png: a mosaic of up to 8 heart slices at ED and ES with the mask outlined (RV blue, MYO
    green, LV red). OUT.gif: the mid-ventricular slice over the cycle (needs Pillow:
    pip install 'synth4d[preview]').
    """
    from synth4d.jobs.preview import preview as run
    click.echo(run(subject, out))


@cli.command("export-nnunet")
@click.argument("sources", type=DATA, nargs=-1, required=True)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--id", "dataset_id", type=int, required=True, help="nnU-Net data set id (1-999): DatasetNNN_NAME.")
@click.option("--name", required=True, help="Data set name (letters, digits, _ and -).")
@click.option("--frames", type=click.Choice(("ed-es", "all")), default="ed-es", show_default=True,
              help="Frames of synthetic subjects to export (real subjects give their labelled frames).")
@click.option("--ratio", type=click.FloatRange(min=0), default=None,
              help="At most RATIO synthetic cases per real case (synthetic subjects taken in id order) [all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DatasetNNN_NAME folder.")
def export_nnunet(sources, out, **kw):
    """Write SOURCES (real and synthetic data sets) as one nnU-Net v2 raw data set in OUT.

    One 3D case per labelled frame, names prefixed by their source folder, dataset.json with
    nnU-Net's ACDC label names, and splits_final.json: five folds over real subjects, synthetic
    cases only ever in training.

    \b
      synth4d export-nnunet acdc/training synthetic/ nnUNet_raw/ --id 501 --name ACDCsynth
    """
    from synth4d.jobs.export_nnunet import export_nnunet as run
    click.echo(run(list(sources), out, **kw))


def _prior_options(f):
    for name, text in reversed(MEASURES.items()):
        f = click.option(f"--{name.replace('_', '-')}", name, type=float, default=None,
                         help=f"{text}; drawn from the diagnosis prior if not given.")(f)
    return f


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dx", default=None, help="Diagnosis: NOR, DCM, HCM, MINF, RV (those the weights know) [drawn from the training mix].")
@click.option("--n", "n", type=click.IntRange(min=1), default=1, show_default=True, help="Number of subjects.")
@_prior_options
@click.option("--es-phase", "es_phase", type=click.FloatRange(*ES_PHASE_RANGE), default=None,
              help="End-systole as a fraction of the cycle after ED (e.g. 0.35: frame 10.5 of 30); drawn from the "
                   "diagnosis prior if not given.")
@click.option("--conditions", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"CSV, one subject per row: any of dx, {', '.join(MEASURES)}, es_phase, frames.")
@click.option("--frames", type=click.IntRange(min=2, max=200), default=30, show_default=True, help="Frames per cardiac cycle.")
@click.option("--slices", type=click.IntRange(min=1), default=None, help="Short-axis slices [drawn from the prior].")
@click.option("--sampler", type=click.Choice(("ddim", "dpmpp_2m", "unipc")), default=None,
              help="Sampler of both models: ddim, DDIM (Song et al. 2021); dpmpp_2m, DPM-Solver++(2M) (Lu et al. 2022); "
                   "unipc, UniPC-2 (Zhao et al. 2023). Without --sampler, --steps or --guidance: DDIM 25 steps for the "
                   "static model and UniPC 8 steps for the motion model (its grid ending at t = 20), guidance 2 on the "
                   "noisiest 12 and 2 of those steps: 0.39-0.42 of the time of --sampler ddim --steps 25, with every figure "
                   "within the run-to-run noise of it or better, subject by subject on two seeds (every setting "
                   "measured: the model card, weights/README.md).")
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=None,
              help="Sampler steps of each model [ddim 25, dpmpp_2m and unipc 15].")
@click.option("--motion-sampler", type=click.Choice(("ddim", "dpmpp_2m", "unipc")), default=None,
              help="The motion model's own sampler [as --sampler when --sampler, --steps or --guidance is given, "
                   "else unipc].")
@click.option("--motion-steps", type=click.IntRange(min=1, max=1000), default=None,
              help="The motion model's own steps [as --steps when --sampler, --steps or --guidance is given, else 8 "
                   "(25 with --motion-sampler ddim)]; the motion model takes most of the time.")
@click.option("--guidance", type=click.FloatRange(min=0), default=None,
              help="Classifier-free guidance scale of each model [2].")
@click.option("--motion-guidance", type=click.FloatRange(min=0), default=None,
              help="The motion model's own guidance scale [as --guidance, else 2].")
@click.option("--guided-fraction", type=click.FloatRange(min=0, max=1), default=None,
              help="Guide only the noisiest FRACTION of each model's steps (rounded down to whole steps); the others "
                   "run the conditional branch alone, half the work [0.5 for the static model at the default sampling; "
                   "1, every step, when --sampler, --steps or --guidance is given].")
@click.option("--motion-guided-fraction", type=click.FloatRange(min=0, max=1), default=None,
              help="The motion model's own guided fraction [as --guided-fraction when --sampler, --steps, --guidance "
                   "or --guided-fraction is given, else 0.25: 2 of its 8 steps].")
@click.option("--motion-final-t", type=click.IntRange(min=0, max=999), default=None,
              help="The last (least noisy) of the motion model's 1000 timesteps; its steps run evenly from 999 down to it "
                   "[20 at the default motion sampling, which then keeps more of the frame-to-frame detail than the "
                   "trailing grid; otherwise the trailing grid's own, 1000 / steps - 1].")
@click.option("--keyframes", type=click.IntRange(min=0), default=12, show_default=True,
              help="Phases the motion model samples; other frames are interpolated along the cycle (0: sample every frame).")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed; subject i uses a seed derived from it and i.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with vae/static/motion .safetensors [the shipped weights].")
@DEVICE
@PRECISION
@click.option("--layout", type=click.Choice(("flat", "acdc")), default="flat", show_default=True,
              help="flat: OUT/synth_NNNN.nii.gz + synth_NNNN_mask.nii.gz; acdc: a data set the loader reads back.")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, help="Index of the first subject (regenerate one alone).")
@click.option("--prefix", default=None,
              help="Subject names: PREFIX + number [synth_ (flat), patient (acdc)], e.g. synthHCM_ to sit beside a real set.")
@click.option("--labels", type=click.Choice(("acdc", "mnms")), default="acdc", show_default=True,
              help="Mask label order: acdc 1 RV, 2 MYO, 3 LV; mnms 1 LV, 2 MYO, 3 RV (M&Ms). Recorded in the manifest, "
                   "the sidecar and (acdc layout) Info.cfg, so synth4d reads the files back either way.")
@click.option("--like", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Put each subject on this NIfTI's grid: in-plane size and spacing, slice spacing, orientation, "
                   "field-of-view centre (the heart in the middle).")
@click.option("--size", type=(click.IntRange(min=8, max=1024), click.IntRange(min=8, max=1024)), default=None,
              help="In-plane voxels NX NY of the output [the model's, or --like's].")
@click.option("--spacing", type=(float, float, float), default=None,
              help="Output spacing SX SY SZ in mm (SZ, the slice spacing, is asked of the generator) [the model's, or --like's].")
@click.option("--shard", default=None,
              help="Generate only shard K/N of the subjects (contiguous blocks; the same files a single run writes); "
                   "under torchrun each rank takes its own. Merge shard folders with `synth4d merge`.")
@click.option("--preview", is_flag=True, help="Also write a PNG mosaic per subject (ED and ES slices, mask outlined).")
@click.option("--json", "as_json", is_flag=True, help="Manifest rows as JSON lines on stdout instead of paths.")
@click.option("--overwrite", is_flag=True, help="Replace subjects already in OUT (default: skip complete ones).")
def generate(out, **kw):
    """Generate synthetic 4D cine subjects (image + mask NIfTI) and a manifest in OUT.

    Masks: 0 background, 1 RV, 2 MYO, 3 LV (ACDC order; --labels mnms for 1 LV, 3 RV), stored with the
    NIfTI label intent. Every file's header description says "synth4d <version> synthetic", and a
    JSON sidecar per subject holds its requested and measured priors, seed, sampler settings, the
    weights' identity and the label convention.
    """
    from synth4d.jobs.generate import generate as run
    as_json = kw.pop("as_json")
    for row in run(out, **kw):
        if as_json:
            _echo_json(row)
        else:
            for p in row["files"]:
                click.echo(p)


@cli.command("eval")
@click.argument("real", type=DATA, required=False)
@click.argument("generated", type=DATA, required=False)
@click.option("--fvd", is_flag=True, help="Fréchet video distance (I3D with --i3d, else fvd_vae).")
@click.option("--control", is_flag=True, help="Requested vs measured priors and diagnosis consistency.")
@click.option("--coherence", is_flag=True, help="Temporal coherence of volume curves, images and mask topology.")
@click.option("--recon", is_flag=True, help="VAE reconstruction on REAL: PSNR, SSIM, Dice, HD95, LVEF/RVEF of decoded masks.")
@click.option("--agreement", is_flag=True,
              help="Image-mask agreement: the VAE's mask head on GENERATED images vs the generated masks (Dice).")
@click.option("--realism", is_flag=True,
              help="Realism and sharpness: a compact segmenter fitted on REAL's labelled frames scores GENERATED "
                   "(and VAE round trips of held-out REAL; without GENERATED, those alone) against their masks; "
                   "minutes.")
@click.option("--memorisation", is_flag=True,
              help="Distance of each GENERATED subject's ED latent to the nearest REAL (training) subject, "
                   "against real subjects not in REAL; flags copies.")
@click.option("--heldout", type=DATA, default=None,
              help="Real subjects not in REAL, the --memorisation reference [leave-one-out over REAL].")
@click.option("--downstream", is_flag=True,
              help="Fit the compact segmenter on --train alone and with --synthetic added; score both on --test.")
@click.option("--train", type=DATA, default=None, help="--downstream: labelled real training set [REAL].")
@click.option("--synthetic", type=DATA, default=None, help="--downstream: synthetic set to add [GENERATED].")
@click.option("--test", type=DATA, default=None, help="--downstream: labelled target set (e.g. another vendor).")
@click.option("--ratio", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="--downstream: synthetic slices per real slice in each batch.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="--downstream: fits per arm (seeds 0..N-1).")
@click.option("--seg-steps", type=click.IntRange(min=1), default=600, show_default=True,
              help="Training steps of each compact-segmenter fit (--realism, --downstream).")
@click.option("--seg-spacing", type=click.FloatRange(min=0.3, max=5.0), default=1.5, show_default=True,
              help="--downstream, and --realism without GENERATED: in-plane spacing (mm) of the segmenter's grid.")
@click.option("--seg-size", type=click.IntRange(min=16, max=512), default=96, show_default=True,
              help="--downstream, and --realism without GENERATED: in-plane size of the segmenter's grid (rounded up to a multiple of 8).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the realism judge's fit and held-out split.")
@click.option("--i3d", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="I3D weights (PyTorch state dict or TorchScript export) for true FVD.")
@click.option("--i3d-torchscript", is_flag=True,
              help="Allow --i3d to be a TorchScript export (e.g. StyleGAN-V's i3d_torchscript.pt): loading one runs "
                   "code from the file, so trust its source.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with vae.safetensors [the shipped weights].")
@DEVICE
@PRECISION
@click.option("--json", "as_json", is_flag=True, help="Metrics as JSON on stdout (the table then goes to stderr).")
def evaluate(real, generated, **kw):
    """Evaluate GENERATED against REAL (data sets the loader reads); with no metric switch, all that apply
    except the fitted ones (--realism, --memorisation, --downstream).

    \b
      synth4d eval real/ gen/ --realism                 # does a real-trained segmenter see the structures?
      synth4d eval train/ gen/ --memorisation           # does GENERATED copy REAL (its training set)?
      synth4d eval --downstream --train A/ --synthetic gen/ --test B/   # does GENERATED help on vendor B?
    """
    from synth4d.jobs.evaluate import evaluate as run
    from synth4d.jobs.report import format_table
    as_json = kw.pop("as_json")
    result = run(real, generated, **kw)
    if as_json:
        click.echo(format_table(result), err=True)
        _echo_json(result)
    else:
        click.echo(format_table(result))


def main():
    """Console entry point: user errors become one line on stderr and exit status 1."""
    from synth4d.nets.memory import keep_freed_memory
    keep_freed_memory()
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("synth4d: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (DataError, UserError) as e:
        click.echo(f"synth4d: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("synth4d: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
