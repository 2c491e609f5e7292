"""The Dask executor: a batch on an in-process LocalCluster (2 workers) gives the same statuses,
reports and output bytes as the local process pool, with a shared filesystem and with shipped bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_batch import GOOD, RECIPE, _check_outputs, _mm, _statuses, zoo  # noqa: F401  (fixture)

from onnxcompress import batch as B
from onnxcompress import cli, cli_batch, io
from onnxcompress.errors import OnnxCompressError

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None, silence_logs=40
    ) as c:
        yield c


def _hashes(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("batch-report")
    }


@pytest.mark.parametrize("ship", [False, True], ids=["shared-fs", "ship-bytes"])
def test_dask_batch_matches_local(zoo: Path, tmp_path: Path, cluster, ship: bool) -> None:  # noqa: F811
    local = B.run_batch([zoo], tmp_path / "local", RECIPE, jobs=2)
    with distributed.Client(cluster, set_as_default=False) as client:
        report = B.run_batch([zoo], tmp_path / "dask", RECIPE, executor="dask", scheduler=client, ship=ship)
    assert _statuses(report) == _statuses(local)
    assert report.exit_code == local.exit_code == 2
    for r in report.results:
        if r.status == B.ERROR:
            assert "not a valid ONNX model" in r.reason and not Path(r.output).exists()
    _check_outputs(zoo, tmp_path / "dask", GOOD)
    assert (tmp_path / "dask" / "b" / "m3.onnx.data").is_file()
    assert _hashes(tmp_path / "dask") == _hashes(tmp_path / "local")  # same bytes as the local path
    assert not list((tmp_path / "dask").rglob(io.TMP_PREFIX + "*"))

    # resume works the same: nothing is submitted again
    with distributed.Client(cluster, set_as_default=False) as client:
        again = B.run_batch([zoo], tmp_path / "dask", RECIPE, executor="dask", scheduler=client, ship=ship)
    assert all(r.resumed for r in again.results)


def test_dask_cli_with_scheduler_address(zoo: Path, tmp_path: Path, cluster, capsys) -> None:  # noqa: F811
    cli_batch.register(cli.app)
    code = cli.main(
        [
            "batch", str(zoo / "a"), "-o", str(tmp_path / "o"), "--recipe", "edge-int8",
            "--executor", "dask", "--scheduler", cluster.scheduler_address,
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr()
    assert (tmp_path / "o" / "m1.onnx").is_file() and (tmp_path / "o" / "deep" / "m2.onnx").is_file()


def test_dask_usage_errors(zoo: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(OnnxCompressError, match="needs --scheduler"):
        B.run_batch([zoo], tmp_path / "o", RECIPE, executor="dask")
    with pytest.raises(OnnxCompressError, match="go with --executor dask"):
        B.run_batch([zoo], tmp_path / "o", RECIPE, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(OnnxCompressError, match="cannot reach the Dask scheduler"):
        B.run_batch([zoo], tmp_path / "o", RECIPE, executor="dask", scheduler="tcp://127.0.0.1:9")
