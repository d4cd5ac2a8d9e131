"""The FiftyOne App serves a sodlab dataset: headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) sees the sample grid, the dataset name and its count, opens
a saved view of one TIDE error type by URL and filters the grid to one error type in the
sidebar. SODLAB_APP_SCREENSHOT=PATH keeps a copy of that last screenshot."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Shares the private database (started at import) and the data writers of test_explore.
from test_explore import (CATEGORIES, ERROR_ANNOTATIONS, ERROR_BASELINE, ERROR_IMAGES, ERROR_SR, det,
                          free_port, gt, image_record, use_private_fiftyone_database, write_coco_split,
                          write_run)

use_private_fiftyone_database()

import sodlab.explore as explore  # noqa: E402
from fiftyone import ViewField as F  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync",
                  "--disable-quic", "--window-size=1400,900"]
NUM_IMAGES = 5

pytestmark = pytest.mark.slow  # every test starts the FiftyOne App and a headless chromium


@pytest.fixture
def chromium_driver(tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"{CHROMIUM} or {CHROMEDRIVER} missing (run .ci/install-browser.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; setup must install them in CI")
        pytest.skip(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_dataset(tmp_path):
    images = [image_record(i, 160, 120) for i in range(1, NUM_IMAGES + 1)]
    annotations = [gt(10 * i + k, i, 1 + 2 * k, [20 + 50 * k, 30 + 10 * i, 14 + 4 * i, 12 + 3 * i])
                   for i in range(1, NUM_IMAGES + 1) for k in range(2)]
    detections = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in annotations[::3]]
    data_dir = write_coco_split(tmp_path / "browsercase", images, annotations, CATEGORIES)
    dataset = explore.build_dataset(data_dir, [write_run(tmp_path / "runs", "baseline",
                                                         "baseline", detections)])
    port = free_port()
    session = explore.launch(dataset, port=port, wait=False)
    yield dataset, f"http://127.0.0.1:{port}/"
    session.close()


def test_app_shows_grid_name_and_count(served_dataset, chromium_driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    dataset, url = served_dataset
    driver = chromium_driver
    driver.get(url)
    # The grid is ready when every sample's thumbnail canvas has drawn its image.
    thumbnails = '[data-cy="fo-grid"] [data-cy="looker"] canvas[canvas-loaded="true"]'
    WebDriverWait(driver, 90).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, thumbnails)) == NUM_IMAGES)
    counts = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '[data-cy="entry-counts"]'))
    WebDriverWait(driver, 30).until(lambda d: counts.text.strip())
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Dismiss']"):
        button.click()  # the product banner would cover part of the grid in the screenshot

    screenshot = tmp_path / "fiftyone-app.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")

    assert counts.text.strip() == f"{NUM_IMAGES} samples"
    body = driver.find_element(By.TAG_NAME, "body").text
    assert f"{NUM_IMAGES} samples" in body
    selector = driver.find_element(By.CSS_SELECTOR, '[data-cy="selector-dataset"]')
    assert selector.get_attribute("value") == dataset.name
    assert dataset.name.startswith("sodlab-browsercase-val")
    assert dataset.name in driver.page_source
    assert "ground_truth" in body and "baseline" in body  # the label fields in the sidebar


@pytest.fixture  # one App session per test: a saved view opened by one test must not stay the next one's view
def served_error_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-errors")
    data_dir = write_coco_split(root / "errorcase", ERROR_IMAGES, ERROR_ANNOTATIONS, CATEGORIES)
    runs = [write_run(root / "runs", "baseline", "baseline", ERROR_BASELINE),
            write_run(root / "runs", "sr", "sr", ERROR_SR)]
    dataset = explore.build_dataset(data_dir, runs)
    port = free_port()
    session = explore.launch(dataset, port=port, wait=False)
    yield dataset, f"http://127.0.0.1:{port}/"
    session.close()


THUMBNAILS = '[data-cy="fo-grid"] [data-cy="looker"] canvas[canvas-loaded="true"]'


def wait_for_grid(driver, num_samples):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 90).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, THUMBNAILS)) == num_samples)
    counts = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-cy="entry-counts"]'))
    WebDriverWait(driver, 30).until(lambda d: counts.text.strip())
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Dismiss']"):
        button.click()  # the product banner would cover part of the grid in the screenshot
    return counts


def test_app_opens_a_saved_error_view_by_url(served_error_case, chromium_driver):
    from selenium.webdriver.common.by import By

    dataset, url = served_error_case
    view = dataset.load_saved_view("small-loc-baseline")
    assert sorted(view.values("image_id")) == [1, 3, 4]
    chromium_driver.get(f"{url}datasets/{dataset.name}?view=small-loc-baseline")
    counts = wait_for_grid(chromium_driver, len(view))
    assert counts.text.strip().startswith(f"{len(view)} ")
    body = chromium_driver.find_element(By.TAG_NAME, "body").text
    assert "small-loc-baseline" in body  # the saved view's name in the view selector
    assert "ground_truth" in body and "baseline" in body


def test_app_filters_one_error_type_in_the_sidebar(served_error_case, chromium_driver, tmp_path):
    """In the App's sidebar, error_baseline of the baseline's detections filtered to "Loc": the
    grid keeps the images with a Loc error of the baseline (1, 3 and 4), each showing only those
    detections (the ground truth stays drawn)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    dataset, url = served_error_case
    driver = chromium_driver
    driver.set_window_size(1400, 1200)  # room in the sidebar for the baseline's attribute filters
    driver.get(f"{url}datasets/{dataset.name}")
    wait_for_grid(driver, len(dataset))
    # The attribute's filter is a search box: type the value, wait for it among the results,
    # take it with Enter. The baseline's field group is expanded first, unless the shared browser
    # session of an earlier test left it expanded (the App remembers it).
    path = "baseline.detections.error_baseline"
    selector = f'[data-cy="selector-sidebar-search-{path}"]'
    if not driver.find_elements(By.CSS_SELECTOR, selector):
        driver.find_element(By.CSS_SELECTOR, '[data-cy="sidebar-field-arrow-enabled-baseline"]').click()
    search = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, selector))
    search.click()
    search.send_keys("Loc")
    results = f'[data-cy="selector-results-container-sidebar-search-{path}"]'
    WebDriverWait(driver, 30).until(lambda d: "Loc" in d.find_element(By.CSS_SELECTOR, results).text.split())
    search.send_keys(Keys.ENTER)
    expected = dataset.filter_labels("baseline", F("error_baseline") == "Loc")
    assert sorted(expected.values("image_id")) == [1, 3, 4]
    counts = wait_for_grid(driver, len(expected))
    WebDriverWait(driver, 30).until(lambda d: counts.text.strip().startswith(f"{len(expected)} "))

    screenshot = tmp_path / "app-error-filter.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SODLAB_APP_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["SODLAB_APP_SCREENSHOT"])
    assert "error_baseline" in driver.find_element(By.TAG_NAME, "body").text
