"""Screenshot of the dashboard after an upload, for the README (same mechanics as the e2e test).

    python bench/dashboard_screenshot.py --checkpoint models/best.safetensors --image chest.png --out docs/dashboard.png
    python bench/dashboard_screenshot.py --checkpoint models/best.safetensors --image a.png --image b.dcm \\
        --out docs/dashboard-batch.png --narrow docs/dashboard-narrow.png

Starts ``streamlit run app.py`` on a free port with MEDISCAN_MODEL=--checkpoint, opens it in headless
Chromium (Debian's ``chromium``), uploads the --image files through the page's file input, waits for every
Grad-CAM overlay, and saves a full-page PNG (dark theme, --width pixels wide). ``--narrow PATH`` adds a
phone-sized (420 px) screenshot. The server is always stopped afterwards. Prints the timings.

The image is only shown in the screenshot; pick one you may publish (no patient data burnt into pixels).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mediscan.devtools.browser import (
    chromium_page,
    open_dashboard,
    playwright_missing,
    save_screenshot,
    streamlit_server,  # noqa: E402
    upload_images,
    wait_for_analysis,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint the dashboard serves")
    parser.add_argument("--image", required=True, type=Path, action="append",
                        help="image to upload (repeat for several: the page then shows the summary table)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"), help="desktop screenshot (PNG)")
    parser.add_argument("--narrow", type=Path, default=None, help="also save a 420 px wide screenshot here")
    parser.add_argument("--width", type=int, default=1360, help="browser window width in pixels")
    parser.add_argument("--height", type=int, default=900, help="window height (the shot grows to the page)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds allowed for the server to start and for the analysis")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    missing = [str(p) for p in [args.checkpoint, *args.image] if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    reason = playwright_missing()
    if reason:
        print(f"error: cannot take a browser screenshot: {reason}", file=sys.stderr)
        return 2
    timeout_ms = int(args.timeout * 1000)
    started = time.perf_counter()
    with streamlit_server(args.checkpoint, timeout=args.timeout) as url, \
            chromium_page({"width": args.width, "height": args.height}) as page:
        print(f"server up at {url} after {time.perf_counter() - started:.1f} s")
        open_dashboard(page, url, timeout_ms)
        print(f"page (model loaded) after {time.perf_counter() - started:.1f} s")
        upload_images(page, args.image)
        wait_for_analysis(page, images=len(args.image), timeout_ms=timeout_ms)
        print(f"{len(args.image)} image(s) analysed after {time.perf_counter() - started:.1f} s")
        print(f"wrote {save_screenshot(page, args.out)}")
        if args.narrow:
            page.set_viewport_size({"width": 420, "height": args.height})
            page.wait_for_timeout(500)
            print(f"wrote {save_screenshot(page, args.narrow)}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
