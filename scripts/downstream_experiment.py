"""The ready experiment of `synth4d eval --downstream`: does synthetic data from a generator that saw
labels of one scanner style only help a segmenter on another style?

Data (all phantom, written into RUN):
  source/     SOURCE labelled subjects of style --source (ED/ES masks and the full-cycle truth);
  corpus/     the generator's training set: source/'s subjects (patient001...) plus UNLABELLED cines of
              every style (patient101... style A, patient201... B, ...; masks removed, the diagnosis
              kept, as a scan's report would give it);
  target/     TARGET labelled subjects of style --target that no stage sees.
Stages, each resumable (a rerun skips what is complete and continues training runs with --resume):
  train-vae, train-static, train-motion on corpus/ (labels from source/ alone), the cpu preset;
  generate SYNTHETIC subjects (mixed diagnoses) with those weights;
  eval --downstream: --train source/ --synthetic synthetic/ --test target/ at each --ratio;
  eval corpus/ synthetic/ --memorisation (and, as the real-only vendor gap, the same fit on source/
  scored on held-out source-style subjects).
Every command is printed before it runs, and the JSON of each evaluation is kept in RUN.

    OMP_NUM_THREADS=1 python scripts/downstream_experiment.py ~/runs/downstream
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

CLI = [sys.executable, "-m", "synth4d"]


def run(argv, log: Path, env=None):
    """Run one synth4d command, stdout to log (kept; in place only once the command succeeded, so a rerun
    never mistakes a half-written result for a finished one), stderr to log.err; stop on failure."""
    argv = [str(a) for a in argv]
    print("$ synth4d " + " ".join(argv), flush=True)
    partial = log.with_name(f".{log.name}.partial")
    with open(partial, "w") as out, open(log.with_suffix(log.suffix + ".err"), "w") as err:
        code = subprocess.call(CLI + argv, stdout=out, stderr=err, env={**os.environ, **(env or {})})
    if code:
        sys.exit(f"failed ({code}): see {log}.err")
    partial.replace(log)


def start(argv, log: Path, env=None) -> subprocess.Popen:
    argv = [str(a) for a in argv]
    print("$ synth4d " + " ".join(argv) + " &", flush=True)
    return subprocess.Popen(CLI + argv, stdout=open(log, "w"), stderr=open(log.with_suffix(log.suffix + ".err"), "w"),
                            env={**os.environ, **(env or {})})


def phantom(out: Path, n: int, seed: int, vendor: str, log: Path):
    run(["phantom", out, "--n", n, "--seed", seed, "--vendor", vendor], log)


def add(corpus: Path, src: Path, first: int, labelled: bool):
    """Copy each subject of an ACDC-layout phantom set into corpus as patient<first + i>, masks only if labelled."""
    for i, folder in enumerate(sorted(p for p in src.iterdir() if p.is_dir())):
        sid = f"patient{first + i:03d}"
        dst = corpus / sid
        if (dst / "Info.cfg").is_file():
            continue
        tmp = corpus / f".{sid}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name == "params.json" or (not labelled and "_gt" in f.name) or (not labelled and "_frame" in f.name):
                continue
            shutil.copy(f, tmp / f.name.replace(folder.name, sid))
        tmp.rename(dst)


def training(stage: str, argv: list, out: Path, logs: Path, background=False):
    """A training stage, continued with --resume if its folder holds a run; None if already complete
    (a `<stage>.done` marker beside the folder, written when the command exits 0)."""
    done = out.parent / f"{stage}.done"
    if done.is_file():
        return None
    argv = argv + ["--out", out] + (["--resume"] if (out / "run.json").is_file() else [])
    if not background:
        run(argv, logs / f"train_{stage}.log")
        done.touch()
        return None
    return stage, done, start(argv, logs / f"train_{stage}.log", env={"OMP_NUM_THREADS": "1"})


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--source", default="A", show_default=True, help="Style whose labels the generator and segmenter see.")
@click.option("--target", default="B", show_default=True, help="Style of the unseen test subjects.")
@click.option("--labelled", default=20, show_default=True, help="Labelled source subjects.")
@click.option("--unlabelled", default=30, show_default=True, help="Unlabelled cines per style in the corpus.")
@click.option("--test", "n_test", default=20, show_default=True, help="Target subjects.")
@click.option("--synthetic", "n_syn", default=40, show_default=True, help="Generated subjects.")
@click.option("--ratio", "ratios", multiple=True, type=float, default=(1.0,), show_default=True)
@click.option("--seeds", default=3, show_default=True)
@click.option("--seg-steps", default=600, show_default=True, help="Steps of each compact-segmenter fit.")
@click.option("--vae-steps", default=500, show_default=True)
@click.option("--ldm-steps", default=1800, show_default=True)
def main(run_dir, source, target, labelled, unlabelled, n_test, n_syn, ratios, seeds, seg_steps, vae_steps, ldm_steps):
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    styles = "ABCD"
    phantom(run_dir / "source", labelled, 301, source, logs / "phantom_source.log")
    phantom(run_dir / "target", n_test, 302, target, logs / "phantom_target.log")
    phantom(run_dir / "source_test", n_test, 303, source, logs / "phantom_source_test.log")
    corpus = run_dir / "corpus"
    add(corpus, run_dir / "source", 1, labelled=True)
    for i, style in enumerate(styles):
        raw = run_dir / f"unlabelled_{style}"
        phantom(raw, unlabelled, 310 + i, style, logs / f"phantom_unlabelled_{style}.log")
        add(corpus, raw, 100 * (i + 1) + 1, labelled=False)

    cache = ["--cache", run_dir / "cache"]
    vae = run_dir / "vae" / "vae.safetensors"
    training("vae", ["train-vae", corpus, "--steps", vae_steps, "--eval-every", 250, *cache], run_dir / "vae", logs)
    jobs = [training(stage, [f"train-{stage}", corpus, "--vae", vae, "--steps", ldm_steps, *cache], run_dir / stage,
                     logs, background=True) for stage in ("static", "motion")]
    for job in filter(None, jobs):
        stage, done, proc = job
        if proc.wait():
            sys.exit(f"train-{stage} failed: see {logs}")
        done.touch()
    weights = run_dir / "weights"
    if not all((weights / f"{s}.safetensors").is_file() for s in ("vae", "static", "motion")):
        run(["export-weights", run_dir, weights, "--overwrite"], logs / "export.log")

    synthetic = run_dir / "synthetic"
    run(["generate", "--n", n_syn, "--weights", weights, "--layout", "acdc", "--seed", 7, synthetic],
        logs / "generate.log")
    for ratio in ratios:
        out = run_dir / f"downstream_ratio{ratio:g}.json"
        if not out.is_file():
            run(["eval", "--downstream", "--train", run_dir / "source", "--synthetic", synthetic, "--test",
                 run_dir / "target", "--ratio", ratio, "--seeds", seeds, "--seg-steps", seg_steps, "--json"], out)
    out = run_dir / "source_style.json"
    if not out.is_file():
        run(["eval", "--downstream", "--train", run_dir / "source", "--test", run_dir / "source_test", "--seeds",
             seeds, "--seg-steps", seg_steps, "--json"], out)
    out = run_dir / "memorisation.json"
    if not out.is_file():
        run(["eval", corpus, synthetic, "--memorisation", "--weights", weights, "--json"], out)
    summary = {p.stem: json.loads(p.read_text()) for p in sorted(run_dir.glob("*.json"))}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
