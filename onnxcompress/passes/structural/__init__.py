"""Structural compression passes: pruning (unstructured, N:M, structured channels), low-rank factorisation,
weight clustering."""
