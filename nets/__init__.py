"""Torch modules and diffusion math. Knows nothing of files, paths or NIfTI."""
