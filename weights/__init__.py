"""The shipped default checkpoints (vae, static, motion .safetensors, see README.md here) and the one
module that reads and writes every checkpoint (weights.checkpoint)."""
from pathlib import Path

DIR = Path(__file__).resolve().parent
