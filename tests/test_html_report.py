"""The --html report: every section present, its numbers equal to the JSON report's, self-contained."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

pytest.importorskip("jinja2")
pytest.importorskip("matplotlib")

from onnxcompress import api, html_report  # noqa: E402
from onnxcompress.diagnose import diagnose  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.validate import compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn.onnx"
COMMON = {"summary", "tolerances", "outputs", "size-by-op", "largest-layers", "error-histogram"}
SECTIONS = {
    "compress": COMMON | {"passes"},
    "validate": COMMON,
    "diagnose": {"summary", "local-error"},
    "tune": COMMON | {"passes", "precision-map"},
}


class Page(HTMLParser):
    """What the tests read from a page: sections, value cells per (section, row, key), tags, text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[str] = []
        self.cells: dict[tuple[str, str | None, str], list[tuple[str, str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: dict[str, list[str]] = {}
        self.svgs: dict[str, int] = {}
        self._section: str | None = None
        self._row: str | None = None
        self._cell: tuple[tuple[str, str | None, str], str] | None = None
        self._buf: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self._section = a.get("id")
            self.sections.append(str(a.get("id")))
        elif tag == "tr":
            self._row = a.get("data-row")
        elif tag == "svg" and self._section:
            self.svgs[self._section] = self.svgs.get(self._section, 0) + 1
        if "data-key" in a:
            self._cell = ((self._section or "", self._row, str(a["data-key"])), str(a.get("data-value")))
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "div") and self._cell is not None:
            key, value = self._cell
            self.cells.setdefault(key, []).append((value, "".join(self._buf).strip()))
            self._cell = None
        elif tag == "section":
            self._section = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._buf.append(data)
        self.text.setdefault(self._section or "", []).append(data)

    def value(self, section: str, row: str | None, key: str) -> object:
        """The JSON value of the one cell at (section, row, key); asserts its shown text agrees."""
        found = self.cells.get((section, row, key))
        assert found, f"no {key!r} cell in {section}/{row}"
        raw, shown = found[0]
        value = json.loads(raw)
        if isinstance(value, float):
            assert _shown_close(shown, value), f"{section}/{row}/{key}: shows {shown!r} for {value}"
        return value


def _shown_close(shown: str, value: float) -> bool:
    """The displayed text (6 significant digits, maybe with a unit) is the value."""
    token = shown.split()[0].replace(",", "") if shown else ""
    try:
        return math.isclose(float(token), value, rel_tol=1e-5, abs_tol=1e-12)
    except ValueError:
        return False


def _json(obj: dict) -> dict:
    """The report as the CLI writes it (a JSON round trip)."""
    return json.loads(json.dumps(obj))


def _check_self_contained(page: Page) -> None:
    names = {t for t, _ in page.tags}
    assert not names & {"script", "link", "img", "iframe", "object", "embed"}, names
    for _tag, attrs in page.tags:
        for k in ("src", "href", "xlink:href", "action"):
            v = attrs.get(k)
            assert v is None or v.startswith("#"), f"{k}={v!r} is a reference out of the page"
        assert "@import" not in (attrs.get("style") or "")


def concat_model() -> onnx.ModelProto:
    """x[N,8] -> {boxes: Sigmoid(x W1) * 640, scores: Sigmoid(x W2)} -> Concat(axis 1) -> y[N, 6]."""
    rng = np.random.default_rng(0)
    g = h.make_graph(
        [
            h.make_node("MatMul", ["x", "W1"], ["m1"], name="box_mm"),
            h.make_node("Sigmoid", ["m1"], ["s1"], name="box_sig"),
            h.make_node("Mul", ["s1", "k"], ["boxes"], name="box_scale"),
            h.make_node("MatMul", ["x", "W2"], ["m2"], name="cls_mm"),
            h.make_node("Sigmoid", ["m2"], ["scores"], name="cls_sig"),
            h.make_node("Concat", ["boxes", "scores"], ["y"], name="head", axis=1),
        ],
        "det",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 6])],
        [
            nh.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W1"),
            nh.from_array(rng.standard_normal((8, 2)).astype(np.float32), "W2"),
            nh.from_array(np.array(640.0, np.float32), "k"),
        ],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def one_scale_head(model: onnx.ModelProto) -> onnx.ModelProto:
    """The Concat output through one uint8 QDQ over [0, 640]: the scores collapse."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node[-1].output[0] = "y_f"
    m.graph.initializer.extend([nh.from_array(np.array(640 / 255, np.float32), "s"), nh.from_array(np.uint8(0), "z")])
    m.graph.node.extend(
        [
            h.make_node("QuantizeLinear", ["y_f", "s", "z"], ["y_q"], name="q"),
            h.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"], name="dq"),
        ]
    )
    return m


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """digits_cnn compressed with int8-dynamic: the compress and diagnose reports and the extras."""
    tmp = tmp_path_factory.mktemp("html")
    out = tmp / "cnn8.onnx"
    report = _json(api.compress(CNN, out, ["int8-dynamic"]).to_dict())
    model = api.load(CNN)
    feeds, source, _ = api.resolve_feeds(model, CNN, api.FeedOptions())
    diag = _json(diagnose(CNN, out, feeds, feeds_source=source, compress_report=report).to_dict())
    errors = html_report.errors_from_models(CNN, out, feeds)
    return {"tmp": tmp, "out": out, "report": report, "diag": diag, "errors": errors, "feeds": feeds}


def test_compress_page_matches_json(cnn: dict) -> None:
    r, path = cnn["report"], cnn["tmp"] / "compress.html"
    extra = {
        "original": CNN,
        "candidate": cnn["out"],
        "errors": cnn["errors"],
        "diagnose": cnn["diag"],
        "latency": {"original_ms": 2.0, "candidate_ms": 1.5},
    }
    html_report.write_html(path, "compress", r, extra=extra)
    page = Page(path.read_text(encoding="utf-8"))
    assert set(page.sections) == SECTIONS["compress"] | {"local-error"}
    _check_self_contained(page)
    # Summary: sizes, ratio, latency, verdict.
    assert page.value("summary", None, "input.size_bytes") == r["input"]["size_bytes"]
    assert page.value("summary", None, "output.size_bytes") == r["output"]["size_bytes"]
    assert page.value("summary", None, "size_ratio") == r["size_ratio"]
    assert page.value("summary", None, "latency.ratio") == pytest.approx(0.75)
    assert page.value("summary", None, "validation.passed") == "PASSED"
    assert page.value("summary", None, "validation.accuracy.drop") == r["validation"]["accuracy"]["drop"]
    assert page.value("", None, "size_ratio") == r["size_ratio"]  # the headline card
    # Tolerances: each checked one passes, with the worst value measured.
    v = r["validation"]
    for tol in v["tolerances"]:
        assert page.value("tolerances", tol, "status") == "PASS"
    assert page.value("tolerances", "cosine>=0.99", "measured") == v["outputs"]["logits"]["cosine"]
    # Per-output metrics.
    for name, od in v["outputs"].items():
        for metric in ("cosine", "cosine_mean", "snr_db", "max_abs", "mean_abs", "max_rel", "top1_agreement"):
            assert page.value("outputs", name, metric) == od[metric]
    # Passes.
    for p in r["passes"]:
        assert page.value("passes", p["name"], "bytes_before") == p["stats"]["bytes_before"]
        assert page.value("passes", p["name"], "bytes_after") == p["stats"]["bytes_after"]
        assert page.value("passes", p["name"], "skipped") == len(p["skipped"])
    # By op type: every constant byte is charged exactly once (totals = the passes' own counts).
    assert page.value("size-by-op", "(total)", "bytes_before") == r["passes"][0]["stats"]["bytes_before"]
    assert page.value("size-by-op", "(total)", "bytes_after") == r["passes"][-1]["stats"]["bytes_after"]
    assert page.value("size-by-op", "Conv", "bytes_after") < page.value("size-by-op", "Conv", "bytes_before")
    assert page.svgs.get("size-by-op") == 1
    # Largest layers: the quantized ones with the pass's own numbers, the others from the models.
    layers = [x for p in r["passes"] for x in p["stats"].get("layers", [])]
    assert layers
    for x in layers:
        assert page.value("largest-layers", x["node"], "bytes_before") == x["bytes_before"]
        assert page.value("largest-layers", x["node"], "bytes_after") == x["bytes_after"]
    assert page.value("largest-layers", "node_Conv_52", "bytes_before") > 0
    # Local error (from the diagnose report given as extra).
    for x in cnn["diag"]["layers"]:
        assert page.value("local-error", x["tensor"], "local_error") == x["local_error"]
    # Histogram: its worst sample is the validation's worst-sample cosine.
    worst = page.value("error-histogram", "logits", "worst_cosine")
    assert worst == pytest.approx(v["outputs"]["logits"]["cosine"], abs=1e-6)
    assert page.value("error-histogram", "logits", "samples") == v["num_samples"]
    assert page.svgs.get("error-histogram") == 1


def test_validate_page_parts_and_failures(tmp_path: Path) -> None:
    """A failing score part: its row, the failing tolerance, the whole output's still-high cosine."""
    a, b = tmp_path / "det.onnx", tmp_path / "det_q.onnx"
    onnx.save(concat_model(), a)
    onnx.save(one_scale_head(concat_model()), b)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((64, 8)).astype(np.float32)}]
    rep = compare(a, b, feeds, ["cosine>=0.99", "max_abs<=1000"])
    assert not rep.passed
    r = _json(rep.to_dict())
    errors = {"y": html_report.sample_errors([np.zeros((2, 3), np.float32)], [np.ones((2, 3), np.float32)])}
    path = tmp_path / "validate.html"
    html_report.write_html(path, "validate", r, extra={"original": a, "candidate": b, "errors": errors})
    page = Page(path.read_text(encoding="utf-8"))
    assert set(page.sections) == SECTIONS["validate"]
    _check_self_contained(page)
    assert page.value("tolerances", "cosine>=0.99", "status") == "FAIL"
    assert page.value("tolerances", "max_abs<=1000", "status") == "PASS"
    parts = r["outputs"]["y"]["parts"]
    assert len(parts) == 2
    worst_part = min(parts, key=lambda p: p["cosine"])
    assert page.value("tolerances", "cosine>=0.99", "measured") == worst_part["cosine"]
    assert page.value("outputs", "y", "cosine") == r["outputs"]["y"]["cosine"] > 0.99
    for p in parts:
        assert page.value("outputs", f"y#part{p['index']}", "cosine") == p["cosine"]
        assert page.value("outputs", f"y#part{p['index']}", "max_abs") == p["max_abs"]
    assert page.value("summary", None, "validation.passed") == "FAILED"
    text = " ".join(page.text["summary"])
    assert r["failures"][0] in text
    # Sizes from the models: the QDQ adds 5 bytes of constants.
    assert page.value("size-by-op", "(total)", "bytes_after") - page.value("size-by-op", "(total)", "bytes_before") == 5
    # Histogram of the given errors: cosine of zeros vs ones is 0.
    assert page.value("error-histogram", "y", "worst_cosine") == 0.0


def test_diagnose_page(cnn: dict) -> None:
    d = cnn["diag"]
    html = html_report.render_html("diagnose", d)
    page = Page(html)
    assert set(page.sections) == SECTIONS["diagnose"]
    _check_self_contained(page)
    assert page.svgs.get("local-error") == 1
    assert page.value("summary", None, "matched") == d["matched"]
    assert page.value("summary", None, "layers[0].local_error") == d["layers"][0]["local_error"]
    for x in d["layers"]:
        for key in ("local_error", "cosine", "snr_db", "max_abs"):
            assert page.value("local-error", x["tensor"], key) == x[key]
    # The chart names the layers that add error, largest first.
    svg_text = " ".join(page.text["local-error"])
    first = d["layers"][0]
    assert f"{first['node']} ({first['op_type']})" in svg_text


def _tuned(layer: str, op: str, precision: str, reason: str, nbytes: int) -> dict:
    return {"layer": layer, "op": op, "precision": precision, "reason": reason, "bytes": nbytes}


def _diag_layer(node: str, tensor: str, local_error: float | None, changed_by: str | None) -> dict:
    value = None if local_error is None else 0.9
    return {
        "node": node,
        "op_type": "MatMul",
        "tensor": tensor,
        "local_error": local_error,
        "cosine": value,
        "snr_db": value,
        "max_abs": value,
        "changed_by": changed_by,
    }


def test_tune_page_precision_map(cnn: dict) -> None:
    """tune's report: the compress keys plus ``layers`` with each layer's precision."""
    r = dict(cnn["report"])
    r.update(
        {
            "objective": "size",
            "layers": [
                _tuned("node_linear", "Gemm", "int4", "least sensitive", 33280),
                _tuned("node_Conv_52", "Conv", "int8", "int4 broke cosine", 37376),
                _tuned("node_Conv_51", "Conv", "int8", "int4 broke cosine", 18944),
                _tuned("node_linear_1", "Gemm", "fp32", "too small", 10280),
            ],
        }
    )
    html = html_report.render_html("tune", r, extra={"original": CNN, "candidate": cnn["out"]})
    page = Page(html)
    assert set(page.sections) == SECTIONS["tune"]
    _check_self_contained(page)
    for x in r["layers"]:
        assert page.value("precision-map", x["layer"], "precision") == x["precision"]
        assert page.value("precision-map", x["layer"], "bytes") == x["bytes"]
    assert page.value("precision-map", "precision:int8", "layers") == 2
    assert page.value("precision-map", "precision:int8", "bytes") == 37376 + 18944
    assert page.value("summary", None, "objective") == "size"
    assert page.svgs.get("precision-map") == 1


def test_missing_sections_say_what_to_pass(cnn: dict) -> None:
    page = Page(html_report.render_html("compress", cnn["report"]))
    assert set(page.sections) == SECTIONS["compress"]
    assert "Not available" in " ".join(page.text["size-by-op"])
    assert "Not available" in " ".join(page.text["error-histogram"])
    # The quantized layers still come from the pass report.
    layer = cnn["report"]["passes"][-1]["stats"]["layers"][0]
    assert page.value("largest-layers", layer["node"], "bytes_after") == layer["bytes_after"]


def test_untrusted_names_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    d = {
        "layers": [_diag_layer(evil, "t$x_1$", 0.5, "$int4$"), _diag_layer("ok", "u", None, None)],
        "original": evil,
        "candidate": "b.onnx",
        "matched": 2,
        "notes": [evil],
    }
    html = html_report.render_html("diagnose", d)
    page = Page(html)
    assert not any(t == "script" for t, _ in page.tags)
    assert evil in " ".join(page.text["summary"])
    assert page.value("local-error", "t$x_1$", "local_error") == 0.5
    assert page.value("local-error", "u", "local_error") is None


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OnnxCompressError, match="unknown report kind"):
        html_report.write_html(tmp_path / "x.html", "inspect", {})
    with pytest.raises(OnnxCompressError, match="does not exist"):
        html_report.write_html(tmp_path / "no" / "x.html", "diagnose", {"layers": []})
    link = tmp_path / "link.html"
    link.symlink_to(tmp_path / "target.html")
    with pytest.raises(OnnxCompressError, match="symlink"):
        html_report.write_html(link, "diagnose", {"layers": []})
    assert not (tmp_path / "target.html").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(OnnxCompressError) as exc:
        html_report.write_html(tmp_path / "y.html", "diagnose", {"layers": []})
    assert str(exc.value) == "--html needs the html extra: pip install 'onnxcompress[html]'"
    assert not (tmp_path / "y.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html"]


def test_layer_weight_bytes_through_weight_only_nodes(tmp_path: Path) -> None:
    """A DequantizeLinear'd weight is charged to the MatMul that reads it; a Constant node too."""
    w = np.arange(64, dtype=np.int8).reshape(8, 8)
    g = h.make_graph(
        [
            h.make_node("DequantizeLinear", ["Wq", "s"], ["W"], name="dq"),
            h.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            h.make_node("Constant", [], ["b"], name="c", value=nh.from_array(np.ones(8, np.float32), "b")),
            h.make_node("Add", ["m", "b"], ["y"], name="add"),
        ],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 8])],
        [nh.from_array(w, "Wq"), nh.from_array(np.float32(0.1), "s")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "m.onnx")
    rows = {r["node"]: (r["op"], r["bytes"]) for r in html_report.layer_weight_bytes(tmp_path / "m.onnx")}
    assert rows == {"mm": ("MatMul", 64 + 4), "add": ("Add", 32)}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_opens_offline_in_chromium(cnn: dict, tmp_path: Path) -> None:
    """A real browser with every host unresolvable renders the whole page."""
    path = tmp_path / "r.html"
    html_report.write_html(path, "compress", cnn["report"], extra={"errors": cnn["errors"], "diagnose": cnn["diag"]})
    proc = subprocess.run(
        [
            "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--dump-dom", path.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-500:]
    page = Page(proc.stdout)
    assert set(page.sections) == SECTIONS["compress"] | {"local-error"}
    assert page.svgs.get("error-histogram") == 1


def test_cli_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--html`` on compress, validate and diagnose (skipped until the CLI has the option)."""
    import inspect

    import onnxcompress.cli as cli
    from onnxcompress import cli_diagnose

    cli_diagnose.register(cli.app)
    if "html" not in inspect.signature(cli.compress).parameters:
        pytest.skip("--html is not wired into the CLI yet")
    out, pages = tmp_path / "c.onnx", {k: tmp_path / f"{k}.html" for k in ("c", "v", "d", "x")}
    args = ["compress", str(CNN), "-o", str(out), "-q", "int8-weights", "--report", str(tmp_path / "c.json")]
    assert cli.main([*args, "--html", str(pages["c"])]) == 0
    r = json.loads((tmp_path / "c.json").read_text())
    page = Page(pages["c"].read_text(encoding="utf-8"))
    assert set(page.sections) == SECTIONS["compress"]
    assert page.value("summary", None, "output.size_bytes") == r["output"]["size_bytes"]
    assert page.value("error-histogram", "logits", "worst_cosine") == pytest.approx(
        r["validation"]["outputs"]["logits"]["cosine"], abs=1e-6
    )
    assert page.svgs.get("size-by-op") == 1
    rc = cli.main(["validate", str(CNN), str(out), "--tolerance", "snr_db>=200", "--html", str(pages["v"])])
    assert rc == 1
    page = Page(pages["v"].read_text(encoding="utf-8"))
    assert page.value("tolerances", "snr_db>=200", "status") == "FAIL"
    assert page.svgs.get("error-histogram") == 1
    rc = cli.main(["diagnose", str(CNN), str(out), "--html", str(pages["d"]), "--report", str(tmp_path / "d.json")])
    assert rc == 0
    d = json.loads((tmp_path / "d.json").read_text())
    page = Page(pages["d"].read_text(encoding="utf-8"))
    assert page.value("local-error", d["layers"][0]["tensor"], "local_error") == d["layers"][0]["local_error"]
    # Without the extra: exit 2 before any work, nothing written.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    other = tmp_path / "x.onnx"
    rc = cli.main(["compress", str(CNN), "-o", str(other), "-q", "int8-weights", "--html", str(pages["x"])])
    assert rc == 2
    assert not other.exists() and not pages["x"].exists()
