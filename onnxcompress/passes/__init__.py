"""Graph transforms. One technique per module; register new passes in ``onnxcompress.recipes``."""
