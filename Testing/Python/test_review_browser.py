"""``liverseg review`` end to end in a real browser (headless Chromium through Selenium): open a
case, segment it, paint a stroke, see the readout change, undo and redo, accept and queue, and the
files written. Screenshots go to the test's folder, and to ``$LIVERSEG_SCREENSHOTS`` when set (the
README's pictures were made so)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.io.volumes import Volume, crop_volume, read_volume

pytest.importorskip("trame_slicer", reason="the review extra is not installed: pip install -e '.[review]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no browser: install Debian's chromium and chromium-driver (.ci/run does)", allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


@pytest.fixture(scope="module")
def page(tmp_path_factory, sample_case):
    """A study of twenty slices of the sample and a file no reader takes, served by a real
    ``liverseg review`` process, in a headless Chromium."""
    image, reference = sample_case
    z = int(np.argmax(np.count_nonzero(reference == 1, axis=(1, 2))))
    root = tmp_path_factory.mktemp("browser")
    study = root / "study"
    study.mkdir()
    scan = crop_volume(image, (slice(z - 10, z + 10), slice(None), slice(None)))
    sitk.WriteImage(scan.to_sitk(), str(study / "p21.nii.gz"))
    ff_map = Volume(np.full(scan.array.shape, 12.5, np.float32), scan.geometry)  # a paired PDFF map, in %
    sitk.WriteImage(ff_map.to_sitk(), str(study / "p21_pdff.nii.gz"))
    (study / "broken.nii.gz").write_bytes(b"not an image")
    server = subprocess.Popen(
        [sys.executable, "-m", "LiverSegmentationLogic.cli", "review", str(study), "-o", str(root / "out"),
         "--queue", str(root / "queue"), "--operator", "ana", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    match = re.search(r"at (http://\S+)", line)
    assert match, line
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    browser.get(match.group(1))
    yield browser, root
    browser.quit()
    server.terminate()
    server.wait(timeout=30)


def _wait_for(browser, condition, timeout=60, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition(browser)
            if value:
                return value
        except Exception:  # noqa: BLE001 (elements come and go while Vue renders)
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _text(browser, element_id):
    found = browser.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def _liver_ml(browser):
    match = re.search(r"liver volume: ([\d.]+) mL", _text(browser, "readout"))
    return float(match.group(1)) if match else None


def _screenshot(browser, root, name):
    path = root / f"{name}.png"
    browser.save_screenshot(str(path))
    if os.environ.get("LIVERSEG_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["LIVERSEG_SCREENSHOTS"]) / path.name)


def test_a_bad_case_is_a_message_on_the_page(page):
    browser, _ = page
    _wait_for(browser, lambda b: b.find_element(By.ID, "case-broken"), what="the case list")
    browser.find_element(By.ID, "case-broken").click()
    message = _wait_for(browser, lambda b: _text(b, "error"), what="an error message")
    assert "cannot read case broken" in message
    assert browser.find_element(By.ID, "case-p21").is_displayed()  # the page is alive


def test_open_segment_paint_undo_accept_and_queue(page):
    browser, root = page
    browser.find_element(By.ID, "case-p21").click()
    _wait_for(browser, lambda b: "p21" in _text(b, "status") or _text(b, "readout"), what="the case to open")
    browser.find_element(By.ID, "btn-segment").click()
    suggested = _wait_for(browser, _liver_ml, timeout=180, what="the segmentation's readout")
    assert "Done: liver-mr-t2" in _text(browser, "status")
    assert "PDFF: median 12.5 %" in _text(browser, "readout")  # the paired map, found as batch finds it
    _screenshot(browser, root, "review-segmented")

    # a paint stroke beside the liver, in the axial view (the left-hand image on the page)
    browser.find_element(By.ID, "tool-paint").click()
    axial = browser.find_elements(By.CSS_SELECTOR, "img.image-display-area")[0]
    width, height = axial.size["width"], axial.size["height"]
    strokes = ActionChains(browser).move_to_element_with_offset(axial, int(width * 0.15), 0).click_and_hold()
    for _ in range(8):
        strokes = strokes.move_by_offset(0, int(height * 0.02))
    strokes.release().perform()
    painted = _wait_for(browser, lambda b: (ml := _liver_ml(b)) and ml > suggested + 0.5 and ml,
                        what="the readout to follow the stroke")
    _screenshot(browser, root, "review-painted")

    browser.find_element(By.ID, "btn-undo").click()
    _wait_for(browser, lambda b: _liver_ml(b) == suggested, what="undo")
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("y").key_up(Keys.CONTROL).perform()  # redo, by key
    _wait_for(browser, lambda b: _liver_ml(b) == painted, what="redo")

    browser.find_element(By.ID, "btn-accept-queue").click()
    review_file = root / "out" / "p21" / "review.json"
    record = _wait_for(browser, lambda b: review_file.exists() and isinstance(
        (r := json.loads(review_file.read_text())).get("queue"), dict) and r, what="the case to be queued")
    assert record["operator"] == "ana" and record["changed_voxels"] > 0 and record["slices_touched"]
    assert record["readout"]["volumes_ml"]["liver"] == pytest.approx(painted, abs=0.05)
    assert record["suggestion_dice"]["liver"] < 1.0
    accepted = read_volume(root / "out" / "p21" / "reviewed.seg.nrrd", validate=False).array
    assert int((accepted == 1).sum()) > 0
    queue = Path(record["queue"]["where"])
    assert queue == root / "queue" / "liver-mr-t2"
    assert (queue / "imagesTr" / f"{record['queue']['case_id']}_0000.nii.gz").exists()
    _wait_for(browser, lambda b: "accepted" in _text(b, "case-p21"), what="the case list to say accepted")
    _screenshot(browser, root, "review-accepted")

    # keyboard: P opens the case before it in the list (the unreadable one: a message, the page stays)
    browser.find_element(By.TAG_NAME, "body").send_keys("p")
    assert "cannot read case broken" in _wait_for(browser, lambda b: _text(b, "error"), what="the key P")


def _start_review(study, out, *args):
    server = subprocess.Popen(
        [sys.executable, "-m", "LiverSegmentationLogic.cli", "review", str(study), "-o", str(out), "--port", "0",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    match = re.search(r"at (http://\S+)", line)
    assert match, line + server.stderr.read()
    return server, match.group(1)


def test_a_page_served_to_the_network_needs_its_token(page):
    browser, root = page
    server, url = _start_review(root / "study", root / "out-network", "--network")
    try:
        assert "?secret=" in url
        local = url.replace(url.split("/")[2].split(":")[0], "127.0.0.1", 1)
        for address, opens in ((local, True), (local.split("?")[0], False), (local.split("?")[0] + "?secret=x", False)):
            browser.get(address)
            time.sleep(3)
            found = _wait_for(browser, lambda b: b.find_elements(By.ID, "case-p21"), timeout=15, what=address) \
                if opens else browser.find_elements(By.ID, "case-p21")
            assert bool(found) == opens, address
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "warning: serving every network interface" in server.stderr.read()
