"""Lossless graph simplification: one technique per module, combined by ``recipes`` into ``fold``.

Every pass here preserves the model's outputs (to float rounding of re-associated arithmetic, within
``max_abs <= 1e-5`` relative to the output scale), keeps graph input/output names, dtypes and symbolic
shapes, recurses into subgraphs, and is idempotent: running it on its own output changes nothing.
"""
