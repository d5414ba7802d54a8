"""Run the dashboard for real and drive it in headless Chromium.

Shared by ``tests/test_dashboard_e2e.py`` and ``bench/dashboard_screenshot.py`` so the README screenshot is
made by exactly the mechanics the test checks. Uses Debian's ``chromium`` (Playwright's own browser
download is not used anywhere in this project).

    with streamlit_server(checkpoint) as url, chromium_page() as page:
        open_dashboard(page, url)
        upload_images(page, [image_path])
        wait_for_analysis(page, images=1)
        save_screenshot(page, "test-artifacts/dashboard.png")
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

#: Where app.py lives: the repository root (editable install) or site-packages (app.py is installed there too).
ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
#: Headless Chromium as root in a container, with no network beyond localhost: no sandbox, no GPU, and
#: none of the background calls home (they would only time out here).
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage")
DESKTOP_VIEWPORT = {"width": 1360, "height": 900}
APP_SELECTOR = '[data-testid="stApp"]'
IDLE_SELECTOR = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def find_chromium() -> str | None:
    """Path of the system Chromium, or ``None`` when it is not installed."""
    for candidate in CHROMIUM_CANDIDATES:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return found
    return None


def playwright_missing() -> str | None:
    """Why a real-browser run is impossible here (``None`` when Playwright and Chromium are both present)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -r requirements-dev.txt)"
    if find_chromium() is None:
        return "Chromium is not installed (apt-get install chromium)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float, *, name: str = "the server",
                  log: Callable[[], str] = lambda: "") -> bytes:
    """Poll ``url`` until it answers 200 and return the answer's body.

    Fails early (``RuntimeError``) when ``process``, the server, exits, and with ``TimeoutError`` after
    ``timeout`` seconds; both messages quote ``log()`` (the server's output, as far as it can be read).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{log()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return response.read()
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{name} did not answer on {url} within {timeout:.0f} s:\n{log()}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen) -> None:
    """Stop the server we started and anything it spawned (its own process group, by its id)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def streamlit_server(checkpoint: str | os.PathLike, *, port: int | None = None, timeout: float = 60.0,
                     extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``streamlit run app.py`` with ``MEDISCAN_MODEL=checkpoint``; yields its URL; always stops it.

    The server runs from the project folder (so ``.streamlit/config.toml`` applies) in its own process
    group; its log goes to a temporary file that is quoted when it fails to start. ``extra_env`` adds
    environment variables (e.g. ``OMP_NUM_THREADS``).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MEDISCAN_MODEL": str(Path(checkpoint).resolve()), "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    command = [sys.executable, "-m", "streamlit", "run", str(APP),
               "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
               "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
    with tempfile.TemporaryDirectory(prefix="mediscan-streamlit-") as folder:
        log_path = Path(folder) / "streamlit.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_http(f"{url}/_stcore/health", process, timeout, name="streamlit", log=lambda: _tail(log_path))
            yield url
        finally:
            _stop(process)


@contextlib.contextmanager
def chromium_page(viewport: dict | None = None) -> Iterator["object"]:
    """A Playwright page in headless system Chromium (dark colour scheme, fixed viewport); closed after use."""
    from playwright.sync_api import sync_playwright
    executable = find_chromium()
    if executable is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            context = browser.new_context(viewport=viewport or DESKTOP_VIEWPORT, color_scheme="dark",
                                          device_scale_factor=1)
            yield context.new_page()
        finally:
            browser.close()


def wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the Streamlit script is not running (the page shows its final state)."""
    page.wait_for_selector(IDLE_SELECTOR, state="attached", timeout=timeout_ms)


def open_dashboard(page, url: str, timeout_ms: int = 60_000) -> None:
    """Load the page and wait for its first complete run (title and uploader shown)."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stFileUploader"]', timeout=timeout_ms)
    wait_until_idle(page, timeout_ms)


def upload_images(page, paths: Sequence[str | os.PathLike]) -> None:
    """Put files into the uploader's file input, as a user's file dialog would."""
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([str(p) for p in paths])


def wait_for_analysis(page, images: int = 1, timeout_ms: int = 60_000) -> None:
    """Wait until ``images`` overlays are shown and loaded, and the script has finished."""
    overlays = page.locator('[data-testid="stImage"]', has_text="Overlay (")
    overlays.nth(images - 1).wait_for(state="visible", timeout=timeout_ms)
    wait_until_idle(page, timeout_ms)
    # The <img> elements load after the script ends; a screenshot before that shows empty frames.
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
        ".every(img => img.complete && img.naturalWidth > 0)", timeout=timeout_ms)


def page_background_luminance(page) -> float:
    """Relative luminance (0 black .. 1 white) of the app's background colour."""
    rgb = page.evaluate(
        "() => getComputedStyle(document.querySelector('[data-testid=\"stApp\"]')).backgroundColor"
        ".match(/[\\d.]+/g).slice(0, 3).map(Number)")
    red, green, blue = (channel / 255.0 for channel in rgb)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def save_screenshot(page, path: str | os.PathLike, *, full_page: bool = True) -> Path:
    """Save a PNG of the page; ``full_page`` grows the viewport to the content's height first.

    Streamlit scrolls inside its own container, so Playwright's ``full_page`` option alone would only
    capture the window.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if full_page:
        height = page.evaluate(
            "() => Math.max(...['[data-testid=\"stMain\"]', '[data-testid=\"stAppViewContainer\"]',"
            " '[data-testid=\"stMainBlockContainer\"]']"
            ".map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))")
        viewport = page.viewport_size or DESKTOP_VIEWPORT
        page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], int(height) + 16)})
        page.wait_for_timeout(500)   # let Vega charts and images re-lay out at the new size
    page.screenshot(path=str(path))
    return path
