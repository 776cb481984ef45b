"""The web page in a real headless Chromium against the real stack (Redis, worker, API).

Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver);
without them the test is skipped. Set SYNTHMRI_UPDATE_DOCS=1 to also copy the
screenshot to docs/web-ui.png (the README shows it).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from synthmri.localstack import LocalStack
from tests.skip_policy import NO_CHROMIUM

pytestmark = [pytest.mark.browser, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DEMO_MODEL = ROOT / "models" / "demo"
# The docs screenshot shows the real demo model; the default run uses the tiny test model.
UPDATE_DOCS = os.environ.get("SYNTHMRI_UPDATE_DOCS") == "1" and (DEMO_MODEL / "model.safetensors").is_file()
FORM = (
    {"channels": "t1+t1ce+t2+flair+seg", "count": "3", "seed": "7", "sampler": "", "steps": ""}
    if UPDATE_DOCS
    else {"channels": "t1ce+seg", "count": "3", "seed": "7", "sampler": "ddim", "steps": "3"}
)


@pytest.fixture
def stack(tmp_path: Path, tiny_checkpoint_readonly: Path) -> Iterator[LocalStack]:
    if UPDATE_DOCS:
        shutil.copytree(DEMO_MODEL, tmp_path / "models" / "demo", ignore=shutil.ignore_patterns(".gitignore"))
    else:
        shutil.copytree(tiny_checkpoint_readonly, tmp_path / "models" / "tiny")
    with LocalStack(
        models_dir=tmp_path / "models",
        results_dir=tmp_path / "results",
        workdir=tmp_path / "run",
        env={"SYNTHMRI_DEVICE": "cpu"},
    ) as s:
        yield s


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_CHROMIUM)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,1500",
    ):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate: Callable[[], object], timeout: float, what: str, driver: Any) -> object:
    """Poll `predicate`; fail at once when the page shows an error instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        error = driver.find_element("id", "error")
        if error.is_displayed() and error.text:
            raise AssertionError(f"the page shows an error while waiting for {what}: {error.text!r}")
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_generates_a_grid_and_offers_downloads(stack: LocalStack, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    driver = browser
    by_id = lambda name: driver.find_element("id", name)  # noqa: E731
    driver.get(stack.url + "/")
    assert "SynthMRI" in driver.title

    by_id("api-key").send_keys(stack.api_key)
    by_id("key-form").submit()
    _wait(lambda: FORM["channels"] in [o.get_attribute("value") for o in Select(by_id("channels")).options],
          30, "the model list", driver)  # fmt: skip
    assert driver.execute_script("return localStorage.getItem('synthmri.apiKey')") == stack.api_key

    Select(by_id("channels")).select_by_value(FORM["channels"])
    Select(by_id("sampler")).select_by_value(FORM["sampler"])  # resets steps to the sampler's default
    for name in ("count", "seed", "steps"):
        by_id(name).clear()
        by_id(name).send_keys(FORM[name])
    assert by_id("nnunet-option").is_displayed()  # a mask and an image channel: a training set
    by_id("nnunet").click()
    by_id("submit").click()

    _wait(lambda: by_id("result-card").is_displayed(), 180, "the result", driver)
    natural = driver.execute_script(
        "const i = document.getElementById('grid'); return [i.complete, i.naturalWidth, i.naturalHeight];"
    )
    job_id = by_id("job-id").text
    assert by_id("progress-text").text.startswith("succeeded") and "100%" in by_id("progress-text").text

    headers = {"Authorization": f"Bearer {stack.api_key}"}
    job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    if FORM["sampler"]:
        sampling = (FORM["sampler"], int(FORM["steps"]))
    else:  # "recommended": the server applies the model card
        models = httpx.get(f"{stack.url}/v1/models", headers=headers, timeout=30).json()["models"]
        card = next(m for m in models if m["channel_set"] == FORM["channels"])["recommended"]
        sampling = (card["sampler"], card["steps"])
    asked = (int(FORM["count"]), int(FORM["seed"]), *sampling)
    assert (job["count"], job["seed"], job["sampler"], job["steps"]) == asked
    assert "+".join(job["channels"]) == FORM["channels"]
    grid_png = httpx.get(f"{stack.url}/v1/jobs/{job_id}/grid.png", headers=headers, timeout=30).content
    grid = Image.open(io.BytesIO(grid_png))
    assert natural[0] and natural[1] > 0
    assert (natural[1], natural[2]) == grid.size, "the page shows an image that is not the job's grid"
    rows, columns = job["count"], len(job["channels"])
    assert (grid.size[0] > grid.size[1]) == (columns > rows), f"{rows}×{columns} grid of size {grid.size}"
    assert len(driver.find_elements("css selector", "#sample-links tr")) == 3

    # Nothing the page loads may come from another origin (no CDN).
    origins = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(origins) <= {stack.url, "null"}, origins

    shot = tmp_path / "web-ui.png"
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.6)  # let the progress bar's CSS transition finish
    assert driver.save_screenshot(str(shot))
    screenshot = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert screenshot.shape[1] >= 1000 and screenshot.max() - screenshot.min() > 100
    if os.environ.get("SYNTHMRI_UPDATE_DOCS") == "1":
        shutil.copy(shot, ROOT / "docs" / "web-ui.png")

    by_id("dl-zip").click()
    archive = tmp_path / "downloads" / f"{job_id}.zip"
    _wait(archive.exists, 30, "the zip download", driver)
    names = zipfile.ZipFile(archive).namelist()
    assert any(n.endswith(f"{job_id}_0002_seg.nii.gz") for n in names), names
    assert any(n.endswith("manifest.json") for n in names), names
    by_id("dl-nnunet").click()
    dataset = tmp_path / "downloads" / f"{job_id}_nnunet.zip"
    _wait(dataset.exists, 30, "the nnU-Net download", driver)
    names = zipfile.ZipFile(dataset).namelist()
    assert any(n.endswith("/dataset.json") for n in names), names
    assert sum("/labelsTr/" in n and n.endswith(".nii.gz") for n in names) == int(FORM["count"]), names

    if not UPDATE_DOCS:
        given_mask(driver, stack, tmp_path)


def given_mask(driver: Any, stack: LocalStack, tmp_path: Path) -> None:
    """A mask chosen in the seg file input comes back in the job's seg; a mask of the wrong size
    shows the API's problem detail on the page."""
    from tests.given_files import nifti, tumour

    by_id = lambda name: driver.find_element("id", name)  # noqa: E731
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    first = by_id("job-id").text
    bad = tmp_path / "big-mask.nii.gz"
    bad.write_bytes(nifti(np.zeros((64, 64), dtype=np.uint8)))
    by_id("given-seg").send_keys(str(bad))
    by_id("submit").click()
    deadline = time.monotonic() + 30  # not _wait: the page's error is what this waits for
    while not (by_id("error").is_displayed() and by_id("error").text) and time.monotonic() < deadline:
        time.sleep(0.25)
    error = by_id("error").text
    assert "64×64" in error and "32×32" in error, error

    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(nifti(tumour()))
    driver.execute_script("document.getElementById('given-seg').value = ''")
    by_id("given-seg").send_keys(str(mask))
    by_id("submit").click()
    _wait(lambda: by_id("job-id").text != first and by_id("result-card").is_displayed(), 180,
          "the result with a given mask", driver)  # fmt: skip
    job_id = by_id("job-id").text
    job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    assert (job["given"], job["guidance"]) == (["seg"], 16.0)
    url = f"{stack.url}/v1/jobs/{job_id}/samples/1/seg.nii.gz"
    data = httpx.get(url, headers=headers, timeout=30).content
    seg = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)[:, :, 0]
    np.testing.assert_array_equal(seg, tumour())
