"""Reliability: killed runs leave no partial output, a full disk is a clean error, huge declared tensors
neither allocate nor crash.

The long versions are ``scripts/crash_trials.py`` (SIGKILL at random moments on a ~300 MB model) and
``scripts/fuzz.py`` (10,000+ generated cases).
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as h

TMP_PREFIX = ".onnxcompress-tmp-"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GB = 2**30


def _build(folder: Path, mb: float) -> Path:
    sys.path.insert(0, str(SCRIPTS))
    try:
        from big_model import build_big_model
    finally:
        sys.path.remove(str(SCRIPTS))
    return build_big_model(folder, total_bytes=mb * 1e6, seed=0, dim=512, name="model.onnx")


@pytest.fixture(scope="module")
def model_30mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("src"), 30)


# Runs the CLI, then writes the process's own peak RSS (VmHWM: this program's memory, unlike
# ru_maxrss, which also counts the pytest process it was forked from) to the file in ONNXCOMPRESS_HWM.
_WRAPPER = """
import os, sys
from onnxcompress.cli import main
code = main(sys.argv[1:])
with open('/proc/self/status') as f:
    hwm = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
with open(os.environ['ONNXCOMPRESS_HWM'], 'w') as f:
    f.write(hwm)
sys.exit(code)
"""


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-c", _WRAPPER, *map(str, args)]


def _run(argv: list[str], preexec_fn=None, timeout: float = 120) -> tuple[int, str, int]:
    """Run a fresh subprocess; return (exit code, stderr, its own peak RSS in bytes, VmHWM)."""
    hwm_file = tempfile.NamedTemporaryFile(prefix="oc-hwm-", delete=False)
    hwm_file.close()
    env = {**os.environ, "ONNXCOMPRESS_HWM": hwm_file.name}
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec_fn, env=env)
    deadline = time.monotonic() + timeout
    err = b""
    os.set_blocking(p.stderr.fileno(), False)
    while True:
        chunk = p.stderr.read()
        if chunk:
            err += chunk
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"{argv} took over {timeout}s")
        time.sleep(0.02)
    err += p.stderr.read() or b""
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    text = Path(hwm_file.name).read_text().strip()
    os.unlink(hwm_file.name)
    # Killed before writing it (e.g. by the kernel): fall back to rusage, an upper bound.
    rss = int(text) * 1024 if text else usage.ru_maxrss * 1024
    return p.returncode, err.decode(errors="replace"), rss


def _assert_clean_exit(code: int, err: str) -> None:
    assert code in (0, 1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def _assert_complete_or_absent(out: Path) -> None:
    if out.exists():
        onnx.checker.check_model(str(out))
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_sigkill_at_random_moments_leaves_no_partial_output(model_30mb: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    start = time.perf_counter()
    code, err, _ = _run(_cli("compress", model_30mb, "-o", out, "-q", "int8-weights"))
    full = time.perf_counter() - start
    assert code == 0, err
    out.unlink()
    (tmp_path / "o.onnx.data").unlink(missing_ok=True)
    rng = random.Random(1234)
    killed = 0
    for _ in range(5):
        argv = _cli("compress", model_30mb, "-o", out, "-q", "int8-weights", "--force")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.2, 0.95) * full)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            killed += 1
        p.wait()
        _assert_complete_or_absent(out)
    assert killed >= 1
    # The next successful run into the same folder cleans the temp folders of the killed runs.
    code, err, _ = _run(_cli("compress", model_30mb, "-o", out, "-q", "int8-weights", "--force"))
    assert code == 0, err
    _assert_complete_or_absent(out)
    names = sorted(p.name for p in tmp_path.iterdir())
    # o.onnx and at most one data file: o.onnx.data, or o.onnx.<8 hex>.data when it replaced an output
    assert names[0] == "o.onnx" and len(names) <= 2
    assert all(re.fullmatch(r"o\.onnx(\.[0-9a-f]{8})?\.data", n) for n in names[1:]), names


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("layout", ["--external-data", "--no-external-data"])
def test_disk_full_is_a_clean_error(model_30mb: Path, tmp_path: Path, layout: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = _cli("compress", model_30mb, "-o", out_dir / "o.onnx", "-q", "int8-weights", layout)
    code, err, _ = _run(argv, preexec_fn=_limit_file_size(1 << 20))
    assert code == 2, err
    _assert_clean_exit(code, err)
    assert list(out_dir.iterdir()) == []


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _constant_of_shape_model(elements: int) -> onnx.ModelProto:
    shape = onnx.numpy_helper.from_array(np.array([elements], np.int64), "shape")
    nodes = [
        h.make_node("ConstantOfShape", ["shape"], ["c"], value=h.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        h.make_node("Add", ["x", "c"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "huge_constant",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [elements])],
        [shape],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _limit_address_space(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


# Known bug (reported): `compress --fold` runs shape inference (onnxcompress.shapes) which, on this
# model, grows until it fails (std::bad_alloc): without a limit the child was OOM-killed at ~24 GB RSS
# on a 23 GB machine. The child therefore runs under RLIMIT_AS (4 GB) so that the test can never take
# a CI machine down; it then peaks near 4 GB and (with validation) prints a WARNING line before the
# error line. `inspect` and `validate` stay small and exit cleanly.


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{m}", "--json"],
        ["compress", "{m}", "-o", "{o}", "--fold"],
        ["compress", "{m}", "-o", "{o}", "--fold", "--skip-validation"],
        ["validate", "{m}", "{m}"],
    ],
)
def test_constant_of_shape_1e12_elements_stays_small(tmp_path: Path, args: list[str]) -> None:
    src = _save(_constant_of_shape_model(10**12), tmp_path / "cos.onnx")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    argv = _cli(*(a.format(m=src, o=out) for a in args))
    code, err, rss = _run(argv, preexec_fn=_limit_address_space(4 * GB))
    _assert_clean_exit(code, err)
    assert rss < GB, f"peak RSS {rss / 2**20:.0f} MiB"
    _assert_complete_or_absent(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)]


def _declared_100gb_model(external: bool, folder: Path) -> onnx.ModelProto:
    elements = 25 * GB  # float32: 100 GiB
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[elements])
    if external:
        (folder / "w.bin").write_bytes(b"\0" * 4096)
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(4 * elements))):
            e = w.external_data.add()
            e.key, e.value = k, v
    graph = h.make_graph(
        [h.make_node("Add", ["x", "W"], ["y"])],
        "declared_100gb",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [elements])],
        [w],
    )
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.skipif(
    os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > 120 * GB,
    reason="the default memory budget (75% of RAM) would admit 100 GB",
)
@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_declared_100gb_initializer_is_refused(tmp_path: Path, external: bool, command: str) -> None:
    src = _save(_declared_100gb_model(external, tmp_path), tmp_path / "big.onnx")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    args = ["inspect", src] if command == "inspect" else ["compress", src, "-o", out, "-q", "int8-weights"]
    code, err, rss = _run(_cli(*args))
    assert code == 2, err
    _assert_clean_exit(code, err)
    assert "model refused" in err, err
    assert rss < 512 * 2**20, f"peak RSS {rss / 2**20:.0f} MiB"
    assert list(out.parent.iterdir()) == []


def _cli_main(argv: list[str]) -> int:
    from onnxcompress.cli import main

    return main(argv)


def test_fuzz_found_names_stay_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by scripts/fuzz.py: an op type with a newline, and a producer name that is not UTF-8."""
    nodes = [h.make_node("Constant\nOfShape", ["x"], ["y"], name="s")]
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    assert _cli_main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "-q", "fp16"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Constant\\nOfShape" in err
    good = h.make_model(
        h.make_graph(
            [h.make_node("Relu", ["x"], ["y"])],
            "g",
            [h.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [h.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[h.make_opsetid("", 17)],
    )
    good.producer_name = "pytorch"
    data = good.SerializeToString().replace(b"pytorch", b"py\xfa\xfbrch")
    path.write_bytes(data)
    assert _cli_main(["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--fold"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "UTF-8" in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd"])
def test_every_command_refuses_external_data_outside_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], location: str
) -> None:
    """inspect, compress, validate, diagnose and batch all load through the same checks (exit 2)."""
    from _models import matmul_model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4 * 64 * 32)
    m = matmul_model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    path = model_dir / "m.onnx"
    path.write_bytes(m.SerializeToString())
    out = tmp_path / "out"
    out.mkdir()
    commands = [
        ["inspect", str(path)],
        ["compress", str(path), "-o", str(out / "o.onnx"), "-q", "int8-dynamic"],
        ["validate", str(path), str(path)],
        ["diagnose", str(path), str(path)],
        ["batch", str(model_dir), "-o", str(out / "b"), "-r", "edge-int8", "--jobs", "1"],
    ]
    for argv in commands:
        assert _cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "outside the model folder" in err, (argv, err)
    assert not (out / "o.onnx").exists()
    assert not list((out / "b").rglob("*.onnx")) if (out / "b").exists() else True
