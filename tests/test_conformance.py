"""Every pass against a fast subset of onnx's own backend test data (see ``scripts/conformance.py``).

The subset: the ``simple``, ``pytorch-operator``, ``pytorch-converted`` and ``light`` suites (the
fold acceptance set) and a deterministic sample of about 150
``node`` cases (picked by a hash of the case name, so onnx releases that add cases keep the old
picks) plus a few node cases that once exposed a bug, each as given and ``frozen`` (inputs baked in
as initializers, so ``fold`` evaluates whole graphs); and the Conv/Gemm/MatMul/Gather node cases with
their weights baked in and ``min_elements=1`` (so the int8 passes quantize every weight). Lossless
passes must not fail at all; lossy passes must never write a broken model (exception, checker error,
onnxruntime load/run error, changed interface, timeout, crash); their accuracy mismatches are
reported by the script, not asserted here. The loader must not refuse any of these valid models.

Known failures of today's onnxcompress are listed in ``KNOWN_FAILURES``/``KNOWN_BAD_REFUSALS`` and
run as strict xfails: when a fix lands, its entry XPASSes and must be removed.

The node cases are generated from onnx's own test case definitions into a temp folder (about 5 s);
set ``ONNXCOMPRESS_CONFORMANCE_CACHE`` to a folder to keep them between runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # spawned workers import it too
import conformance  # noqa: E402

from onnxcompress.recipes import PASSES  # noqa: E402

NODE_SAMPLE_MODULUS = 12  # ~1/12 of onnx's ~1900 node cases
# Node cases that exposed bugs (see KNOWN_FAILURES) or cover dtypes the sample may miss.
EXTRA_NODE_CASES = (
    "test_size",
    "test_lstm_defaults",
    "test_string_concat",
    "test_cast_INT2_to_FLOAT",
    "test_affine_grid_2d_expanded",
    "test_loop11",
    "test_dynamicquantizelinear_expanded",
)
SUITES = ("simple", "pytorch-operator", "pytorch-converted", "light")
VARIANTS = ("as-is", "frozen")
INT8_CASE_PREFIXES = (
    "test_conv",
    "test_basic_conv",
    "test_gemm",
    "test_matmul",
    "test_gather_",
    "test_nllloss_NCd1_weight",
)

# (case id, pass) -> why it fails today, one group per root cause. Case ids as the script prints them.
# (Empty today: the last entry, fold-if exposing AffineGrid's [1]-shaped Range inputs, is fixed.)


def _known(reason: str, items: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    return dict.fromkeys(items, reason)


KNOWN_FAILURES: dict[tuple[str, str], str] = {}
# Loader refusals that are bugs (a refusal is otherwise a legitimate outcome, not a failure).
KNOWN_BAD_REFUSALS: dict[str, str] = {}


def in_node_sample(name: str) -> bool:
    """The deterministic node sample: a hash of the name, stable across onnx releases."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return digest % NODE_SAMPLE_MODULUS == 0 or name in EXTRA_NODE_CASES


def subset(cache: Path) -> list[conformance.Case]:
    """The CI subset (see module docstring)."""
    node = conformance.discover(["node"], cache_dir=cache)
    cases = conformance.discover(SUITES) + [c for c in node if in_node_sample(c.name)]
    out = [dataclasses.replace(c, variant=v) for v in VARIANTS for c in cases]
    # The int8 passes only meet constant weights of >= 256 values in a handful of these models: run
    # the weight-op cases with their second operand baked in and every weight quantized (cluster: K=4).
    weight_ops = [c for c in node if c.name.startswith(INT8_CASE_PREFIXES)]
    out += [dataclasses.replace(c, variant="weights", config=(("min_elements", 1), ("k", 4))) for c in weight_ops]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    env_cache = os.environ.get("ONNXCOMPRESS_CONFORMANCE_CACHE")
    cache = Path(env_cache) if env_cache else tmp_path_factory.mktemp("conformance-cache")
    cases = subset(cache)
    jobs = max(1, min(4, os.cpu_count() or 1))
    rows = conformance.run_all(cases, list(PASSES), jobs=jobs, timeout=60)
    out = {(r["case"], r["pass"]): r for r in rows}
    assert len(out) == len(rows) == len(cases) * len(PASSES), "every case runs every pass exactly once"
    return out


def _describe(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"{r['case']} [{r['pass']}] {r['kind']}: {r['reason']}" for r in rows)


def _is_bad(row: dict[str, Any]) -> bool:
    """A failure for a lossless pass; a broken model for a lossy one; a refusal that is a known bug."""
    if row["status"] == "refused":
        return row["case"] in KNOWN_BAD_REFUSALS
    if row["status"] != "failed":
        return False
    return not conformance.is_lossy(row["pass"]) or row["kind"] in conformance.BROKEN_KINDS


@pytest.mark.parametrize("pass_name", [p for p in PASSES if not conformance.is_lossy(p)])
def test_lossless_pass_conforms(results: dict, pass_name: str) -> None:
    bad = [
        r
        for (case, p), r in sorted(results.items())
        if p == pass_name and r["status"] == "failed" and (case, p) not in KNOWN_FAILURES
    ]
    assert not bad, f"{len(bad)} failures:\n{_describe(bad)}"


@pytest.mark.parametrize("pass_name", [p for p in PASSES if conformance.is_lossy(p)])
def test_lossy_pass_writes_valid_models(results: dict, pass_name: str) -> None:
    bad = [
        r
        for (case, p), r in sorted(results.items())
        if p == pass_name and _is_bad(r) and r["status"] == "failed" and (case, p) not in KNOWN_FAILURES
    ]
    assert not bad, f"{len(bad)} broken models:\n{_describe(bad)}"


def test_refusals_are_legitimate(results: dict) -> None:
    refused = sorted({r["case"]: r["reason"] for r in results.values() if r["status"] == "refused"}.items())
    unexpected = [f"{case}: {why}" for case, why in refused if case not in KNOWN_BAD_REFUSALS]
    assert not unexpected, "the loader refuses valid models:\n" + "\n".join(unexpected)


@pytest.mark.parametrize(
    ("case", "pass_name"),
    [pytest.param(c, p, marks=pytest.mark.xfail(strict=True, reason=why)) for (c, p), why in KNOWN_FAILURES.items()],
)
def test_known_failure(results: dict, case: str, pass_name: str) -> None:
    row = results[(case, pass_name)]
    assert not _is_bad(row) and row["status"] != "failed", f"{row['kind']}: {row['reason']}"


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=why)) for c, why in KNOWN_BAD_REFUSALS.items()]
)
def test_known_bad_refusal(results: dict, case: str) -> None:
    rows = [r for (c, _), r in results.items() if c == case]
    assert rows and all(r["status"] != "refused" for r in rows), rows[0]["reason"]


# Passes that can act on fewer cases: the node cases are mostly one layer whose output is the graph
# output, and prune-channels never prunes the channels of a graph output (it would change its shape).
# prune prunes 50% by default (many cases then miss the tolerance: "mismatch", not a failure); lowrank
# only factorises where it saves parameters; tune keeps float32 where the tiny weights gain nothing.
MIN_TRANSFORMED = {"prune-channels": 10, "prune": 8, "lowrank": 6, "tune": 3}


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_subset_exercises_the_pass(results: dict, pass_name: str) -> None:
    """Guard against a harness that silently runs nothing (everything excluded or baseline-fail)."""
    rows = [r for (_, p), r in results.items() if p == pass_name]
    count = {s: sum(r["status"] == s for r in rows) for s in conformance.STATUSES}
    assert count["baseline-fail"] + count["excluded"] <= len(rows) // 4, count
    assert count["transformed-within-tolerance"] >= (
        len(rows) // 4 if pass_name == "fold" else MIN_TRANSFORMED.get(pass_name, 15)
    ), count


def test_timeout_guard_kills_a_slow_step() -> None:
    case = next(c for c in conformance.discover(["light"]) if c.name == "test_vgg19")  # ~1 s per step
    rows = conformance.run_all([case], ["fold"], jobs=1, timeout=0.05)
    assert len(rows) == 1 and rows[0]["status"] in ("baseline-fail", "failed"), rows
    assert "timed out" in rows[0]["reason"], rows
