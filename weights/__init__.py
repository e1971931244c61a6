"""The shipped default checkpoints (vae, static, motion .safetensors); see README.md here."""
from pathlib import Path

DIR = Path(__file__).resolve().parent
