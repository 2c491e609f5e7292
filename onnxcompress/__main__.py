"""``python -m onnxcompress`` runs the command line."""

from .cli import run

run()
