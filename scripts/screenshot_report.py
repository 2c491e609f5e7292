"""Render a sample HTML report and screenshot it in headless Chromium (offline).

    python scripts/screenshot_report.py [--model models/tiny_transformer.onnx] [--quantize int4]
        [--out docs/report-screenshot.png] [--html report.html] [--width 1280] [--height 0]

Compresses MODEL (validation inputs: its sidecar), diagnoses the result, writes the ``compress``
HTML report with everything it can show (models for the size breakdown, per-sample errors for the
histograms, the diagnose report for the local-error chart), then loads the page in Chromium with
every host name resolving nowhere (``--host-resolver-rules``), so the screenshot also shows that
the page needs no network. Needs the ``html`` extra and Chromium (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser(given: str | None) -> str:
    """The Chromium executable: ``given`` or the first found on PATH."""
    for name in ([given] if given else []) + list(BROWSERS):
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium (or pass --browser PATH)")


def screenshot(browser: str, html: Path, png: Path, width: int, height: int) -> None:
    """Load ``html`` offline in headless Chromium and save a ``width`` x ``height`` screenshot."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-chromium-") as profile:
        cmd = [
            browser,
            "--headless=new",
            "--no-sandbox",  # root in containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must be self-contained
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.exists():
        sys.exit(f"chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def trim_bottom(png: Path, margin: int = 24) -> None:
    """Cut the blank area below the page's last content (Pillow comes with matplotlib)."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, (255, 255, 255))).getbbox()
    if box is not None:
        rgb = rgb.crop((0, 0, rgb.width, min(rgb.height, box[3] + margin)))
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)  # a third of the bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny_transformer.onnx")
    ap.add_argument("--quantize", default="int4", help="technique to apply (a registered pass name)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    ap.add_argument("--html", type=Path, default=None, help="also keep the HTML page here")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=0, help="window height; 0: the whole page (trimmed)")
    ap.add_argument("--browser", default=None, help="Chromium executable (default: found on PATH)")
    args = ap.parse_args(argv)

    from onnxcompress import api, html_report
    from onnxcompress.diagnose import diagnose
    from onnxcompress.errors import ValidationFailed

    html_report.check_available()
    browser = find_browser(args.browser)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-report-") as tmp:
        out = Path(tmp) / f"{args.model.stem}.{args.quantize}.onnx"
        start = time.perf_counter()
        try:
            report = api.compress(args.model, out, [args.quantize], force=True)
        except ValidationFailed as exc:  # a failing sample is still a sample (written: force)
            report = exc.report
        data = report.to_dict()
        model = api.load(args.model)
        feeds, source, _labels = api.resolve_feeds(model, args.model, api.FeedOptions())
        del model
        diag = diagnose(args.model, out, feeds, feeds_source=source, compress_report=data).to_dict()
        extra = {
            "original": args.model,
            "candidate": out,
            "errors": html_report.errors_from_models(args.model, out, feeds),
            "diagnose": diag,
        }
        html = args.html or Path(tmp) / "report.html"
        t0 = time.perf_counter()
        html_report.write_html(html, "compress", data, extra=extra)
        render_s = time.perf_counter() - t0
        screenshot(browser, html, args.out, args.width, args.height or 12000)
        if not args.height:
            trim_bottom(args.out)
        kept = f"report: {html}, " if args.html else "report: "
        print(
            f"{kept}{html.stat().st_size:,} bytes, rendered in {render_s:.2f}s; "
            f"screenshot: {args.out}; total {time.perf_counter() - start:.1f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
