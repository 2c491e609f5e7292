"""What a model is made of: sizes, parameters, dtypes, ops, opsets, inputs and outputs."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Model, iter_graphs, iter_nodes


@dataclasses.dataclass
class ModelSummary:
    """The ``inspect`` report of one model."""

    path: str
    file_size_bytes: int
    external_data_bytes: int
    parameters: int
    bytes_by_dtype: dict[str, int]
    ops: dict[str, int]
    nodes: int
    subgraphs: int
    opsets: dict[str, int]
    ir_version: int | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    largest_initializers: list[dict[str, Any]]

    @property
    def size_bytes(self) -> int:
        """File size including external data."""
        return self.file_size_bytes + self.external_data_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        d["size_bytes"] = self.size_bytes
        return d


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "unknown"
    if isinstance(dtype, int):
        import onnx

        return onnx.TensorProto.DataType.Name(dtype).lower()
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return "unknown"


def _shape(t: gs.Tensor) -> list[int | str | None] | None:
    return None if t.shape is None else [d if isinstance(d, (int, str)) else None for d in t.shape]


def external_files(model: Model) -> set[Path]:
    """The external-data files a loaded model reads from."""
    from .io import ExternalValues

    files = set()
    for g in iter_graphs(model.graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and isinstance(t._values, ExternalValues):
                files.add(t._values.path)
    return files


def model_size(model: Model) -> int:
    """Bytes on disk of a loaded model: its file plus its external-data files."""
    if model.path is None:
        return 0
    return os.path.getsize(model.path) + sum(f.stat().st_size for f in external_files(model))


def summarize(model: Model) -> ModelSummary:
    """Build the ``inspect`` summary of a loaded model (values are not loaded)."""
    consts: dict[int, gs.Constant] = {}
    for g in iter_graphs(model.graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                consts[id(t)] = t
        for n in g.nodes:
            for v in n.attrs.values():
                if isinstance(v, gs.Constant):
                    consts[id(v)] = v
    params = 0
    by_dtype: Counter[str] = Counter()
    sizes = []
    for c in consts.values():
        v = c._values
        shape = tuple(int(d) for d in v.shape)
        count = int(np.prod(shape)) if shape else 1
        nbytes = int(getattr(v, "nbytes", 0) or np.asarray(v).nbytes)
        name = _dtype_name(v.dtype)
        params += count
        by_dtype[name] += nbytes
        sizes.append({"name": c.name, "shape": list(shape), "dtype": name, "bytes": nbytes})
    sizes.sort(key=lambda s: -s["bytes"])
    ops: Counter[str] = Counter()
    for _, n in iter_nodes(model.graph):
        ops[n.op if n.domain in ("", None, "ai.onnx") else f"{n.domain}.{n.op}"] += 1
    graphs = list(iter_graphs(model.graph))
    opsets = {(d.domain or "ai.onnx"): int(d.version) for d in (model.graph.import_domains or [])}
    opsets.setdefault("ai.onnx", model.opset)
    path = str(model.path) if model.path else ""
    file_size = os.path.getsize(model.path) if model.path else 0
    ext = sum(f.stat().st_size for f in external_files(model))
    return ModelSummary(
        path=path,
        file_size_bytes=file_size,
        external_data_bytes=ext,
        parameters=params,
        bytes_by_dtype=dict(by_dtype.most_common()),
        ops=dict(ops.most_common()),
        nodes=sum(ops.values()),
        subgraphs=len(graphs) - 1,
        opsets=opsets,
        ir_version=model.ir_version,
        inputs=[{"name": t.name, "dtype": _dtype_name(t.dtype), "shape": _shape(t)} for t in model.graph.inputs],
        outputs=[{"name": t.name, "dtype": _dtype_name(t.dtype), "shape": _shape(t)} for t in model.graph.outputs],
        largest_initializers=sizes[:10],
    )
