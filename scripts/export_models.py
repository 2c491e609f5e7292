"""Regenerate the example models shipped under ``models/``.

Three small, real, trained models are built from scratch, exported to ONNX and
checked in onnxruntime:

``digits_cnn``
    PyTorch CNN (Conv+BatchNorm+ReLU blocks, MaxPool, two Linear layers) trained
    on scikit-learn's ``load_digits``. Input ``input`` float32 [N, 1, 8, 8] with
    pixels scaled to [0, 1]; output ``logits`` float32 [N, 10]. BatchNorm is kept
    as separate ``BatchNormalization`` nodes so that fusion passes have work.
``digits_keras``
    Keras (TensorFlow) CNN trained on the same split, converted with tf2onnx.
    NHWC input ``input`` float32 [N, 8, 8, 1]; output ``logits`` float32 [N, 10].
``tiny_transformer``
    PyTorch transformer encoder (2 pre-LayerNorm layers, d_model 128, 4 heads,
    FFN 512 with GELU, attention written with plain MatMul/Softmax) trained on a
    synthetic task: which of 4 token-id ranges is the most frequent among the
    non-padding tokens. Inputs ``input_ids`` and ``attention_mask`` int64
    [batch, sequence]; outputs ``logits`` float32 [batch, 4] and
    ``last_hidden_state`` float32 [batch, sequence, 128].

``resnet_cnn``
    PyTorch ResNet-style CNN, randomly initialised (not trained): a stem
    Conv+BatchNorm+ReLU, three residual blocks (32, 64 and 128 channels, the
    last two with stride 2 and a 1x1 projection shortcut), global average
    pooling and a Linear head. The BatchNorm running statistics are set from
    noise images so that activations have realistic ranges. Input ``input``
    float32 [N, 3, 32, 32]; output ``logits`` float32 [N, 10]; no labels.
    It gives the static quantizer residual Adds and a GlobalAveragePool to place.

Next to each ``<stem>.onnx`` the script writes the sidecars that onnxcompress
discovers automatically: ``<stem>.inputs.npz`` (one feed, keys = graph input
names, samples batched along axis 0), ``<stem>.labels.npy`` (int64 labels) and
``<stem>.calibration.npz`` (one feed of calibration inputs for int8-static and
GPTQ, disjoint from the held-out inputs: drawn from the digits training split,
or generated with another seed).

Everything is seeded; running the script again reproduces the models. Usage::

    python scripts/export_models.py [--out models/] [--only digits_cnn]

The calibration sidecars do not change the models: they are drawn after
training, from data the models already use.

This is a development tool that needs the ``export`` extra (torch, tensorflow,
tf2onnx, onnxscript, scikit-learn); the onnxcompress package never imports it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnxscript.rewriter.rules import common as rules
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0
OPSET = 18
DIGITS_TEST_SIZE = 0.2
MIN_DIGITS_ACCURACY = 0.95
MIN_TRANSFORMER_ACCURACY = 0.95
# Calibration sets: samples of the digits training split, generated transformer sequences, noise images.
DIGITS_CALIBRATION = 512
TRANSFORMER_CALIBRATION = 128
RESNET_INPUTS = 48
RESNET_CALIBRATION = 96
# Largest |framework - onnxruntime| difference tolerated on any output.
MAX_ABS_DIFF = 1e-3


@dataclass
class ExportSummary:
    """What one builder produced, printed at the end of the run."""

    name: str
    framework_accuracy: float
    onnx_accuracy: float
    max_abs_diff: float
    seconds: float
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``x_train, x_test, y_train, y_test`` for scikit-learn's digits.

    Images are float32 [N, 8, 8] scaled from 0..16 to [0, 1]; labels are int64.
    The split is the fixed, stratified 80/20 split used by every digits model.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def make_token_range_task(
    rng: np.random.Generator,
    count: int,
    seq_len: int,
    *,
    vocab_size: int,
    num_classes: int,
    min_len: int,
    margin: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample the synthetic "most frequent token range" classification task.

    Token ids ``0..3`` are reserved (0 is padding); ids ``4..vocab_size-1`` are
    split into ``num_classes`` equal ranges. Each sequence has a random length
    in ``[min_len, seq_len]`` and is right-padded with 0. Tokens are drawn from
    a random mixture over the ranges; the label is the range holding the most
    tokens. Sequences where the winner leads the runner-up by fewer than
    ``margin`` tokens are redrawn, so every label is exact and unambiguous.

    Returns ``input_ids`` int64 [count, seq_len], ``attention_mask`` int64
    [count, seq_len] and ``labels`` int64 [count].
    """
    first = 4
    width = (vocab_size - first) // num_classes
    input_ids = np.zeros((count, seq_len), dtype=np.int64)
    attention_mask = np.zeros((count, seq_len), dtype=np.int64)
    labels = np.zeros(count, dtype=np.int64)
    row = 0
    while row < count:
        length = int(rng.integers(min_len, seq_len + 1))
        mixture = rng.dirichlet(np.full(num_classes, 0.7))
        ranges = rng.choice(num_classes, size=length, p=mixture)
        counts = np.bincount(ranges, minlength=num_classes)
        runner_up, winner = np.sort(counts)[-2:]
        if winner - runner_up < margin:
            continue
        tokens = first + ranges * width + rng.integers(0, width, size=length)
        input_ids[row, :length] = tokens
        attention_mask[row, :length] = 1
        labels[row] = int(np.argmax(counts))
        row += 1
    return input_ids, attention_mask, labels


# --------------------------------------------------------------------------- ONNX helpers


def check_and_run(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate ``path`` with the ONNX checker and run ``feeds`` in onnxruntime.

    Returns the outputs by name. Raises if the checker rejects the model, if the
    feed names differ from the graph inputs, or if an initializer is stored as
    external data (the examples must be self-contained single files).
    """
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"{path.name}: initializer {tensor.name} uses external data")
    input_names = [value.name for value in model.graph.input]
    if sorted(input_names) != sorted(feeds):
        raise RuntimeError(f"{path.name}: graph inputs {input_names} != feeds {sorted(feeds)}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def describe(path: Path) -> str:
    """One-paragraph description of an ONNX file: size, opset, I/O, op histogram."""
    model = onnx.load(str(path))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in model.opset_import)

    def signature(values: list[onnx.ValueInfoProto]) -> str:
        parts = []
        for value in values:
            tensor_type = value.type.tensor_type
            dims = [d.dim_param or str(d.dim_value) for d in tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            parts.append(f"{value.name}: {dtype}[{', '.join(dims)}]")
        return "; ".join(parts)

    ops = Counter(node.op_type for node in model.graph.node)
    histogram = ", ".join(f"{op}={n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    weight_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    return (
        f"  file     {path.name}: {path.stat().st_size:,} bytes "
        f"({weight_bytes:,} in {len(model.graph.initializer)} initializers)\n"
        f"  opset    {opsets}\n"
        f"  inputs   {signature(list(model.graph.input))}\n"
        f"  outputs  {signature(list(model.graph.output))}\n"
        f"  nodes    {len(model.graph.node)}: {histogram}"
    )


def save_sidecars(out_dir: Path, stem: str, feeds: Mapping[str, np.ndarray], labels: np.ndarray | None) -> list[Path]:
    """Write ``<stem>.inputs.npz`` (and ``<stem>.labels.npy`` when labelled)."""
    inputs_path = out_dir / f"{stem}.inputs.npz"
    np.savez_compressed(inputs_path, **dict(feeds))
    paths = [inputs_path]
    if labels is not None:
        labels_path = out_dir / f"{stem}.labels.npy"
        np.save(labels_path, labels.astype(np.int64))
        paths.append(labels_path)
    return paths


def save_calibration(out_dir: Path, stem: str, feeds: Mapping[str, np.ndarray]) -> Path:
    """Write ``<stem>.calibration.npz`` (one feed, samples batched along axis 0)."""
    path = out_dir / f"{stem}.calibration.npz"
    np.savez_compressed(path, **dict(feeds))
    return path


def digits_calibration(x_train: np.ndarray) -> np.ndarray:
    """A fixed, seeded sample of ``DIGITS_CALIBRATION`` training images (never the held-out ones)."""
    rng = np.random.default_rng(SEED + 10)
    return x_train[np.sort(rng.choice(len(x_train), DIGITS_CALIBRATION, replace=False))]


def torch_to_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, dict[int, object]],
    doc: str,
    fuse_batchnorm: bool = True,
) -> None:
    """Export a PyTorch module to a single self-contained ONNX file at ``OPSET``.

    Uses the torch.export-based exporter and its onnxscript optimizer. With
    ``fuse_batchnorm=False`` that optimizer (which folds BatchNormalization into
    Conv) is replaced by a reduced cleanup: constant folding plus a few shape
    and no-op rewrites, so the BatchNormalization nodes survive. The exporter's
    per-node debug metadata (stack traces, FX node text) is dropped to keep the
    file small; names and shapes are kept.
    """
    program = torch.onnx.export(
        module,
        example_inputs,
        input_names=input_names,
        output_names=output_names,
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        optimize=fuse_batchnorm,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    if not fuse_batchnorm:
        model = program.model
        onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        onnxscript.rewriter.rewrite(
            model,
            [
                rules.materialize_reshape_shape_rule,
                rules.reshape_reshape_rule,
                rules.no_op_cast_rule,
                rules.no_op_expand_rule,
                rules.remove_optional_bias_from_conv_rule,
            ],
        )
        onnxscript.optimizer.remove_unused_nodes(model)
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.doc_string = doc
    onnx.save_model(proto, str(path), save_as_external_data=False)


# --------------------------------------------------------------------------- digits CNN


class DigitsCNN(nn.Module):
    """Three Conv+BatchNorm+ReLU blocks, two MaxPools and a two-layer classifier.

    About 124k parameters (~0.5 MB float32), almost all in Conv and Gemm weights.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 2 * 2, 256)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(images)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))  # 8x8 -> 4x4
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))  # 4x4 -> 2x2
        x = self.dropout(torch.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


def build_digits_cnn(out_dir: Path) -> ExportSummary:
    """Train the PyTorch digits CNN and export ``digits_cnn.onnx`` + sidecars."""
    start = time.perf_counter()
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_digits_split()
    model = DigitsCNN()

    xs = torch.from_numpy(x_train[:, None])
    ys = torch.from_numpy(y_train)
    epochs, batch = 40, 32
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * ((len(xs) + batch - 1) // batch)
    )
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for i in range(0, len(xs), batch):
            idx = order[i : i + batch]
            # Light augmentation: shift the whole batch by up to one pixel.
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(xs[idx], shifts=shift, dims=(2, 3))
            optimizer.zero_grad()
            loss_fn(model(images), ys[idx]).backward()
            optimizer.step()
            scheduler.step()
    model.eval()

    test_input = x_test[:, None].astype(np.float32)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(test_input)).numpy()

    path = out_dir / "digits_cnn.onnx"
    torch_to_onnx(
        model,
        (torch.from_numpy(test_input[:4]),),
        path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        fuse_batchnorm=False,
        doc="Digits CNN (sklearn load_digits, 8x8 in [0, 1]); built by scripts/export_models.py.",
    )
    feeds = {"input": test_input}
    onnx_logits = check_and_run(path, feeds)["logits"]
    files = [path, *save_sidecars(out_dir, "digits_cnn", feeds, y_test)]
    calib = {"input": digits_calibration(x_train)[:, None].astype(np.float32)}
    files.append(save_calibration(out_dir, "digits_cnn", calib))
    return _summarize("digits_cnn", torch_logits, onnx_logits, y_test, start, files)


# --------------------------------------------------------------------------- digits Keras


def build_digits_keras(out_dir: Path) -> ExportSummary:
    """Train the Keras digits CNN and export ``digits_keras.onnx`` + sidecars."""
    # TensorFlow is imported here only: it is slow to load and chatty.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    import tf2onnx

    start = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    x_train, x_test, y_train, y_test = load_digits_split()
    layers = keras.layers

    inputs = keras.Input(shape=(8, 8, 1), name="input")
    x = inputs
    for filters, pool in ((32, False), (64, True), (64, True)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        if pool:
            x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, logits, name="digits_keras")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train[..., None], y_train, epochs=40, batch_size=32, shuffle=True, verbose=0)

    test_input = x_test[..., None].astype(np.float32)
    keras_logits = np.asarray(model(test_input, training=False))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="input")])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"logits": model(images, training=False)}

    path = out_dir / "digits_keras.onnx"
    onnx_model, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=OPSET)
    _tidy_tf2onnx(onnx_model, batch_dim="batch")
    onnx_model.graph.doc_string = ""  # names a per-process TF function id
    onnx_model.doc_string = (
        "Digits CNN in Keras (NHWC, sklearn load_digits, 8x8 in [0, 1]); built by scripts/export_models.py."
    )
    onnx.save_model(onnx_model, str(path), save_as_external_data=False)
    input_name = onnx_model.graph.input[0].name
    feeds = {input_name: test_input}
    onnx_logits = check_and_run(path, feeds)["logits"]
    files = [path, *save_sidecars(out_dir, "digits_keras", feeds, y_test)]
    calib = {input_name: digits_calibration(x_train)[..., None].astype(np.float32)}
    files.append(save_calibration(out_dir, "digits_keras", calib))
    return _summarize("digits_keras", keras_logits, onnx_logits, y_test, start, files)


def _tidy_tf2onnx(model: onnx.ModelProto, batch_dim: str) -> None:
    """Make tf2onnx's output readable and repeatable, without changing the maths.

    * the anonymous batch dimension ``unk__N`` becomes ``batch_dim``;
    * the unused ``ai.onnx.ml`` opset import is dropped;
    * tf2onnx's numbered names (``Transpose__46``, ``const_starts__27:0``) are
      renumbered in graph order. Its counter, and which name survives when it
      merges equal constants, vary from run to run; without this the file is
      not byte-for-byte repeatable. Merged helper constants become
      ``tf2onnx_const_K``, other names keep their prefix.
    """
    anonymous = set()
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_param:
            anonymous.add(dim.dim_param)
            dim.dim_param = batch_dim
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in anonymous:
                dim.dim_param = batch_dim
    used = {node.domain for node in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    _renumber_tf2onnx_names(model)


def _renumber_tf2onnx_names(model: onnx.ModelProto) -> None:
    """Rename tf2onnx's ``<prefix>__<N>[:<M>]`` node and tensor names in graph order."""
    numbered = re.compile(r"^(.*?)__\d+(:\d+)?$")
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    protected = {value.name for value in [*graph.input, *graph.output]}
    tensors: dict[str, str] = {}
    nodes = 0
    for node in graph.node:
        for name in [*node.input, *node.output]:
            match = numbered.match(name)
            if match and name not in tensors and name not in protected:
                prefix = "tf2onnx_const" if name in initializers else match.group(1)
                tensors[name] = f"{prefix}_{len(tensors)}"
        match = numbered.match(node.name)
        if match:
            node.name = f"{match.group(1)}_n{nodes}"
            nodes += 1
    for tensor in graph.initializer:
        tensor.name = tensors.get(tensor.name, tensor.name)
    for value in graph.value_info:
        value.name = tensors.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [tensors.get(name, name) for name in node.input]
        node.output[:] = [tensors.get(name, name) for name in node.output]
    # Initializers in order of first use, so that their order is repeatable too.
    first_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            first_use.setdefault(name, index)
    ordered = sorted(graph.initializer, key=lambda t: (first_use.get(t.name, len(graph.node)), t.name))
    copies = [onnx.TensorProto() for _ in ordered]
    for copy, tensor in zip(copies, ordered, strict=True):
        copy.CopyFrom(tensor)
    del graph.initializer[:]
    graph.initializer.extend(copies)


# --------------------------------------------------------------------------- tiny transformer


class EncoderLayer(nn.Module):
    """Pre-LayerNorm encoder layer with explicit multi-head attention."""

    def __init__(self, d_model: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.norm1 = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn_in = nn.Linear(d_model, ffn)
        self.act = nn.GELU()
        self.ffn_out = nn.Linear(ffn, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        h = self.norm1(x)
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim**-0.5) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        context = context.transpose(1, 2).reshape(batch, seq, d_model)
        x = x + self.out(context)
        return x + self.ffn_out(self.act(self.ffn_in(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, encoder layers, masked mean pool, head."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        num_classes: int,
        d_model: int = 128,
        heads: int = 4,
        ffn: int = 512,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = input_ids.shape[1]
        x = self.tokens(input_ids) + self.positions.weight[:seq].unsqueeze(0)
        mask = attention_mask.to(x.dtype)
        # -1e4 (not -inf) keeps the graph safe for float16 conversion.
        mask_bias = (1.0 - mask)[:, None, None, :] * -1e4
        for layer in self.layers:
            x = layer(x, mask_bias)
        hidden = self.norm(x)
        weights = mask.unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled), hidden


def build_tiny_transformer(out_dir: Path) -> ExportSummary:
    """Train the tiny transformer encoder and export ``tiny_transformer.onnx``."""
    start = time.perf_counter()
    vocab_size, max_len, num_classes = 1000, 128, 4
    seq_len = 32
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    task = dict(vocab_size=vocab_size, num_classes=num_classes, min_len=4)
    train_ids, train_mask, train_labels = make_token_range_task(rng, 8000, seq_len, **task)
    test_ids, test_mask, test_labels = make_token_range_task(rng, 128, seq_len, **task)

    model = TinyTransformer(vocab_size, max_len, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    epochs, batch = 5, 64
    steps = epochs * (len(train_ids) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    ids_t, mask_t = torch.from_numpy(train_ids), torch.from_numpy(train_mask)
    labels_t = torch.from_numpy(train_labels)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ids_t), generator=generator)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            # Trim the batch to its longest sequence so several lengths are seen.
            longest = int(mask_t[idx].sum(dim=1).max())
            logits, _ = model(ids_t[idx, :longest], mask_t[idx, :longest])
            optimizer.zero_grad()
            loss_fn(logits, labels_t[idx]).backward()
            optimizer.step()
            scheduler.step()
    model.eval()

    with torch.no_grad():
        torch_logits, torch_hidden = model(torch.from_numpy(test_ids), torch.from_numpy(test_mask))

    path = out_dir / "tiny_transformer.onnx"
    batch_dim = torch.export.Dim("batch")
    seq_dim = torch.export.Dim("sequence", min=2, max=max_len)
    dynamic = {0: batch_dim, 1: seq_dim}
    torch_to_onnx(
        model,
        (torch.from_numpy(test_ids[:2, :16]), torch.from_numpy(test_mask[:2, :16])),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits", "last_hidden_state"],
        dynamic_shapes={"input_ids": dynamic, "attention_mask": dynamic},
        doc="Tiny transformer encoder (synthetic token-range task); built by scripts/export_models.py.",
    )
    feeds = {"input_ids": test_ids, "attention_mask": test_mask}
    outputs = check_and_run(path, feeds)
    hidden_diff = float(np.max(np.abs(outputs["last_hidden_state"] - torch_hidden.numpy())))
    if hidden_diff > MAX_ABS_DIFF:
        raise RuntimeError(f"tiny_transformer: last_hidden_state differs by {hidden_diff}")
    _check_other_shapes(path, model, vocab_size, shapes=((3, 7), (5, 33)))
    files = [path, *save_sidecars(out_dir, "tiny_transformer", feeds, test_labels)]
    # Calibration: the same task drawn with another seed, without any held-out or training sequence.
    seen = {row.tobytes() for row in np.concatenate([train_ids, test_ids])}
    calib_rng = np.random.default_rng(SEED + 20)
    calib_ids, calib_mask, _ = make_token_range_task(calib_rng, 2 * TRANSFORMER_CALIBRATION, seq_len, **task)
    fresh = np.array([row.tobytes() not in seen for row in calib_ids])
    calib_ids, calib_mask = calib_ids[fresh][:TRANSFORMER_CALIBRATION], calib_mask[fresh][:TRANSFORMER_CALIBRATION]
    files.append(save_calibration(out_dir, "tiny_transformer", {"input_ids": calib_ids, "attention_mask": calib_mask}))
    return _summarize(
        "tiny_transformer",
        torch_logits.numpy(),
        outputs["logits"],
        test_labels,
        start,
        files,
        min_accuracy=MIN_TRANSFORMER_ACCURACY,
    )


def _check_other_shapes(path: Path, model: nn.Module, vocab_size: int, shapes: tuple[tuple[int, int], ...]) -> None:
    """Run the exported transformer at other (batch, sequence) shapes against torch.

    The first row of each batch is half padding, so the mask path is exercised.
    """
    rng = np.random.default_rng(SEED + 1)
    for batch, seq in shapes:
        ids = rng.integers(4, vocab_size, size=(batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[0, seq // 2 :] = 0
        ids[mask == 0] = 0
        outputs = check_and_run(path, {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            expected, _ = model(torch.from_numpy(ids), torch.from_numpy(mask))
        diff = float(np.max(np.abs(outputs["logits"] - expected.numpy())))
        if diff > MAX_ABS_DIFF:
            raise RuntimeError(f"tiny_transformer: batch {batch} x sequence {seq} differs by {diff}")
        print(f"  tiny_transformer runs at batch {batch} x sequence {seq}: max |logit diff| {diff:.2e}")


# --------------------------------------------------------------------------- ResNet-style CNN


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the shortcut (a 1x1 Conv-BN projection when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Stem, four residual blocks (32, 32, 64/2, 128/2 channels), global average pool, Linear head.

    About 0.5M parameters (~2 MB float32).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(
            ResidualBlock(32, 32, 1), ResidualBlock(32, 32, 1), ResidualBlock(32, 64, 2), ResidualBlock(64, 128, 2)
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(images))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _global_average_pool(path: Path) -> None:
    """Write ``ReduceMean(x, axes=[2, 3], keepdims=1)`` on 4-D ``x`` as ``GlobalAveragePool`` (the same
    maths; the exporter lowers ``adaptive_avg_pool2d(x, 1)`` to ReduceMean)."""
    model = onnx.load(str(path))
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or len(node.input) != 2:
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = consts.get(node.input[1])
        if keepdims == 1 and axes is not None and sorted(int(a) % 4 for a in axes.ravel()) == [2, 3]:
            node.op_type = "GlobalAveragePool"
            del node.input[1:]
            del node.attribute[:]
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save_model(model, str(path), save_as_external_data=False)


def noise_images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Images with some spatial structure: smooth noise (4x4 upsampled to 32x32) plus pixel noise.

    Pixels are rounded to steps of 1/16 (like 8-bit images), which also keeps the sidecars small.
    """
    coarse = rng.standard_normal((count, 3, 4, 4)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    pixels = smooth + 0.5 * rng.standard_normal((count, 3, 32, 32))
    return (np.round(pixels * 16) / 16).astype(np.float32)


def build_resnet_cnn(out_dir: Path) -> ExportSummary:
    """Initialise the ResNet-style CNN (random weights, BatchNorm statistics from noise) and export it."""
    start = time.perf_counter()
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED + 30)
    model = ResNetCNN()
    # Cumulative BatchNorm statistics over noise batches, so that each BatchNorm normalises its input.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(8):
            model(torch.from_numpy(noise_images(rng, 64)))
    model.eval()
    test_input = noise_images(rng, RESNET_INPUTS)
    calib_input = noise_images(rng, RESNET_CALIBRATION)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(test_input)).numpy()
    path = out_dir / "resnet_cnn.onnx"
    torch_to_onnx(
        model,
        (torch.from_numpy(test_input[:4]),),
        path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        fuse_batchnorm=False,
        doc="ResNet-style CNN, random weights (32x32x3 noise images); built by scripts/export_models.py.",
    )
    _global_average_pool(path)
    feeds = {"input": test_input}
    onnx_logits = check_and_run(path, feeds)["logits"]
    diff = float(np.max(np.abs(torch_logits - onnx_logits)))
    if diff > MAX_ABS_DIFF:
        raise RuntimeError(f"resnet_cnn: onnxruntime logits differ from torch by {diff}")
    files = [path, *save_sidecars(out_dir, "resnet_cnn", feeds, None)]
    files.append(save_calibration(out_dir, "resnet_cnn", {"input": calib_input}))
    # No labels: "accuracy" is the agreement of the torch and onnxruntime top-1.
    agree = float(np.mean(torch_logits.argmax(1) == onnx_logits.argmax(1)))
    return ExportSummary("resnet_cnn", agree, agree, diff, time.perf_counter() - start, files)


# --------------------------------------------------------------------------- driver


def _summarize(
    name: str,
    framework_logits: np.ndarray,
    onnx_logits: np.ndarray,
    labels: np.ndarray,
    start: float,
    files: list[Path],
    *,
    min_accuracy: float = MIN_DIGITS_ACCURACY,
) -> ExportSummary:
    """Compare framework and onnxruntime logits and enforce the accuracy floor."""
    framework_accuracy = float(np.mean(framework_logits.argmax(axis=1) == labels))
    onnx_accuracy = float(np.mean(onnx_logits.argmax(axis=1) == labels))
    diff = float(np.max(np.abs(framework_logits - onnx_logits)))
    if diff > MAX_ABS_DIFF:
        raise RuntimeError(f"{name}: onnxruntime logits differ from the framework by {diff}")
    if framework_accuracy != onnx_accuracy:
        raise RuntimeError(f"{name}: accuracy {framework_accuracy} != onnx {onnx_accuracy}")
    if onnx_accuracy < min_accuracy:
        raise RuntimeError(f"{name}: held-out accuracy {onnx_accuracy:.4f} < {min_accuracy}")
    return ExportSummary(name, framework_accuracy, onnx_accuracy, diff, time.perf_counter() - start, files)


BUILDERS: dict[str, Callable[[Path], ExportSummary]] = {
    "digits_cnn": build_digits_cnn,
    "digits_keras": build_digits_keras,
    "tiny_transformer": build_tiny_transformer,
    "resnet_cnn": build_resnet_cnn,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "models", help="output folder (default: models/ in the repository)"
    )
    parser.add_argument(
        "--only",
        choices=sorted(BUILDERS),
        action="append",
        help="build only this model (repeatable; default: all)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the requested models and print a summary of each."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BUILDERS)
    for name in names:
        print(f"building {name} ...", flush=True)
        summary = BUILDERS[name](args.out)
        source = "keras" if name == "digits_keras" else "torch"
        print(
            f"{name}: held-out accuracy {source} {summary.framework_accuracy:.4f}, "
            f"onnxruntime {summary.onnx_accuracy:.4f}, max |logit diff| "
            f"{summary.max_abs_diff:.2e}, {summary.seconds:.1f} s"
        )
        print(describe(summary.files[0]))
        for extra in summary.files[1:]:
            print(f"  sidecar  {extra.name}: {extra.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
