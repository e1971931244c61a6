"""`python -m synth4d` runs the command-line interface."""
from synth4d.synth4d import main

main()
