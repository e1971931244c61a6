"""synth4d: controllable 4D cine cardiac MRI synthesis with paired segmentation masks.

The installed package (the repository root). The command-line interface and the Python API live in
synth4d.py, which is the module synth4d.synth4d here:

    import synth4d
    model = synth4d.load()
    subject = model.generate(dx="HCM", seed=1)
"""
from synth4d.synth4d import __version__, cli, load, main  # noqa: F401
