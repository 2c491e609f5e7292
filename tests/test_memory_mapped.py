"""Memory handed back between onnxruntime runs (validation, calibration taps), outputs unchanged.

* ``drop_mapped_pages``: the pages of a model's mapped external-data weights that a run faulted in
  (an embedding ``Gather`` reads a few rows, the pages around them become resident, run after run)
  are unmapped between runs; the next run reads the same bytes again;
* validation and calibration taps call it (and ``trim_heap``) between the slices of a feed;
* int8-dynamic hands ``prepare_hessian`` a matrix it can free once copied (the same factorisation).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import matmul_model, save
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcompress import io
from onnxcompress.passes.calibrate import ActivationTap
from onnxcompress.passes.quantize.dynamic import _MatrixOf
from onnxcompress.passes.quantize.gptq import PackedHessian, prepare_hessian
from onnxcompress.validate import (
    DROP_MIN_BYTES,
    compare,
    drop_mapped_pages,
    make_session,
    run_session,
)

MB = 2**20
ROWS, WIDTH = 8192, 1024  # a 32 MB embedding table

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")


def _table_model(folder: Path) -> Path:
    """ids[batch, seq] -> Gather(table [ROWS, WIDTH]) -> Relu, the table in an external-data file."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, WIDTH), dtype=np.float32)
    g = h.make_graph(
        [
            h.make_node("Gather", ["table", "ids"], ["e"], name="gather"),
            h.make_node("Relu", ["e"], ["y"], name="relu"),
        ],
        "table",
        [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", WIDTH])],
        [nh.from_array(table, "table")],
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "table.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="table.onnx.data", size_threshold=1024)
    return path


def _resident(folder: Path) -> int:
    """Resident bytes of the mappings of files under ``folder``."""
    prefix = os.path.join(str(folder.resolve()), "")
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                ours = len(head) >= 6 and head[5].startswith(prefix)
            elif ours and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def _feeds(n: int = 6, seq: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, ROWS, size=(8, seq), dtype=np.int64)} for _ in range(n)]


@needs_proc
def test_drop_mapped_pages_unmaps_what_runs_read_and_keeps_the_values(tmp_path: Path) -> None:
    path = _table_model(tmp_path / "m")
    sess = make_session(path)
    feeds = _feeds()
    first = [sess.run(None, f)[0] for f in feeds]
    grown = _resident(tmp_path / "m")
    assert grown >= 8 * MB  # 6 x 512 random rows: the pages around them are resident
    assert drop_mapped_pages(tmp_path / "m") >= DROP_MIN_BYTES
    assert _resident(tmp_path / "m") < MB
    again = [sess.run(None, f)[0] for f in feeds]  # read back from the file: the same values
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert drop_mapped_pages(tmp_path / "elsewhere") == 0  # other folders are left alone
    assert _resident(tmp_path / "m") >= 8 * MB


@needs_proc
def test_drop_mapped_pages_leaves_a_prefix_folder_and_unmapped_files_alone(tmp_path: Path) -> None:
    path = _table_model(tmp_path / "mm")
    sess = make_session(path)
    for f in _feeds(3):
        sess.run(None, f)
    before = _resident(tmp_path / "mm")
    assert drop_mapped_pages(tmp_path / "m") == 0  # "/x/m" is not "/x/mm"
    assert _resident(tmp_path / "mm") == pytest.approx(before, abs=MB)
    assert drop_mapped_pages(tmp_path / "missing") == 0


def test_run_session_calls_between_after_each_slice(tmp_path: Path) -> None:
    sess = make_session(save(matmul_model(), tmp_path / "m.onnx"))
    feed = {"x": np.random.default_rng(0).standard_normal((10, 4, 64)).astype(np.float32)}
    calls = []
    sliced = run_session(sess, [feed, feed], "m", rows=4, between=lambda: calls.append(1))
    assert len(calls) == 6  # 3 slices per feed
    whole = run_session(sess, [feed], "m")
    for name in whole:
        np.testing.assert_allclose(sliced[name][0], whole[name][0], rtol=1e-5, atol=1e-6)


@needs_proc
def test_validation_drops_the_mapped_pages_after_each_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _table_model(tmp_path / "m")
    feeds = [{"ids": np.concatenate([f["ids"] for f in _feeds(seq=4)])}]  # 48 samples: 6 slices of 8
    seen: list[tuple[int, int]] = []  # resident bytes before and after each call
    v = importlib.import_module("onnxcompress.validate")  # the package re-exports a function of that name
    real = v.drop_mapped_pages

    def spy(folder: str | Path, evict: bool = False) -> int:
        before = _resident(Path(folder))
        dropped = real(folder, evict)
        seen.append((before, _resident(Path(folder))))
        return dropped

    monkeypatch.setattr(v, "drop_mapped_pages", spy)
    monkeypatch.setattr(v, "SLICE_MIN_BYTES", 1)  # slice this small test model like a large one
    report = compare(path, path, feeds, ["max_abs<=0"], parts=False)
    assert report.passed, report.failures  # both runs read the same values, page drops or not
    assert len(seen) == 12  # after each of the 6 slices, for the original and for the candidate
    assert all(after < MB for _, after in seen)
    assert max(before for before, _ in seen) >= DROP_MIN_BYTES


@needs_proc
def test_tap_release_drops_the_mapped_pages(tmp_path: Path) -> None:
    model = io.load(_table_model(tmp_path / "m"))
    with ActivationTap(model, ["e"]) as tap:
        grown, first = [], []
        for feed in _feeds():
            first.append(tap.run(feed)["e"])
            grown.append(_resident(tap._dir))
            tap.release()  # unmapped and evicted from the page cache: read from the file again
            assert _resident(tap._dir) < MB
        assert max(grown) >= DROP_MIN_BYTES
        for feed, want in zip(_feeds(), first):
            np.testing.assert_array_equal(tap.run(feed)["e"], want)
            tap.release()
    table = nh.to_array(onnx.load(str(tmp_path / "m" / "table.onnx")).graph.initializer[0], str(tmp_path / "m"))
    np.testing.assert_array_equal(first[0], table[_feeds()[0]["ids"]])


@pytest.mark.parametrize("smooth", [False, True])
def test_prepare_hessian_of_a_lazy_matrix_is_the_same(smooth: bool) -> None:
    rng = np.random.default_rng(3)
    ph = PackedHessian(48)
    for _ in range(3):
        ph.add(rng.standard_normal((40, 48)).astype(np.float32))
    if smooth:
        ph.smooth = rng.uniform(0.5, 2.0, 48).astype(np.float32)
    a = prepare_hessian(ph.matrix(), 1, 0.01)
    b = prepare_hessian(_MatrixOf(ph), 1, 0.01)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.u, b.u)
    np.testing.assert_array_equal(a.col_weight, b.col_weight)
    np.testing.assert_array_equal(a.dead, b.dead)
    assert np.asarray(_MatrixOf(ph)).dtype == (np.float64 if smooth else np.float32)
