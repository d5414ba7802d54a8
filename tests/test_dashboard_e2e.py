"""The dashboard in a real browser: ``streamlit run app.py`` in a subprocess, driven by headless Chromium.

Uploads a synthetic PNG through the page's file input, waits for the prediction and the Grad-CAM overlay,
checks what a user reads, downloads the JSON report, and saves screenshots to ``test-artifacts/``
(git-ignored): ``dashboard.png`` (desktop) and ``dashboard-narrow.png`` (phone-sized window).

Skipped when Playwright or Debian's ``chromium`` is missing, except under CI (env ``CI`` set), where
that is a failure: CI installs the browser. The model is a tiny random checkpoint: this test checks the
page's mechanics, not the model (training one here would take minutes on a shared CPU).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from mediscan import NOT_FOR_CLINICAL_USE
from mediscan.devtools.browser import (
    chromium_page,
    open_dashboard,
    page_background_luminance,
    playwright_missing,
    save_screenshot,
    streamlit_server,
    upload_images,
    wait_for_analysis,
)
from mediscan.devtools.synthetic import CLASSES, pattern_image, write_tiny_checkpoint

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser_available():
    reason = playwright_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the real-browser dashboard test must run in CI, but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def dashboard_url(browser_available, tmp_path_factory):
    """A running dashboard on a free port, serving a tiny checkpoint; stopped after the module's tests."""
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("e2e") / "tiny.safetensors",
                                       metrics={"test": {"accuracy": 0.95, "ece_calibrated": 0.021}})
    # One torch thread: a 64 px model gains nothing from more, and loses a lot on shared CPUs.
    with streamlit_server(checkpoint, timeout=90, extra_env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


def test_upload_shows_prediction_gradcam_and_report_in_a_real_browser(dashboard_url, tmp_path):
    image = tmp_path / "chest_xray.png"
    Image.fromarray(pattern_image(3, 96, np.random.default_rng(7))).save(image)
    with chromium_page() as page:
        open_dashboard(page, dashboard_url)
        assert page_background_luminance(page) < 0.2, "the default theme must be dark"
        upload_images(page, [image])
        try:
            wait_for_analysis(page, images=1)
        finally:   # a screenshot of whatever is there helps most when the wait failed
            save_screenshot(page, ARTIFACTS / "dashboard.png")

        main = page.locator('[data-testid="stMain"]').inner_text()
        assert "Not for clinical use" in main and NOT_FOR_CLINICAL_USE[:40] in main
        assert "chest_xray.png" in main and "Grad-CAM" in main and "Faithfulness score" in main
        organ = page.locator('[data-testid="stMain"] [data-testid="stMetricValue"]').nth(0).inner_text().strip()
        assert organ in CLASSES
        assert any(verdict in main for verdict in ("Confident.", "Uncertain:", "Out of scope:"))
        shown = page.locator('[data-testid="stImage"] img')
        assert shown.count() == 3
        assert all(shown.nth(i).evaluate("img => img.naturalWidth > 0") for i in range(3))
        assert "Overlay (40% heatmap)" in main
        sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
        assert "Model card" in sidebar and "95.0%" in sidebar and "2.1%" in sidebar

        with page.expect_download(timeout=30_000) as download:
            page.get_by_role("button", name="Download report (JSON)").click()
        report = json.loads(Path(download.value.path()).read_text())
        assert report["file_name"] == "chest_xray.png"
        assert report["prediction"]["top_class"] == organ
        assert report["not_for_clinical_use"] == NOT_FOR_CLINICAL_USE

        # A phone-sized window: columns stack, nothing is wider than the screen.
        page.set_viewport_size({"width": 420, "height": 900})
        page.wait_for_timeout(500)
        overflow = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollWidth"
                                 " - window.innerWidth")
        save_screenshot(page, ARTIFACTS / "dashboard-narrow.png")
        assert overflow <= 1, f"page is {overflow}px wider than a 420px window"
