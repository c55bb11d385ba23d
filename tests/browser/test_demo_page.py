"""The demo page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium) against
a real server on the shipped model: upload a CIFAR-10 test image, wait for the answer, check the label and
that the random draws and purified images were drawn. `make test-browser` installs the browser and runs this;
ATOP_DEMO_SCREENSHOT=PATH saves the page (docs/demo.png is made so)."""

import os
import shutil
import tarfile

import pytest
from conftest import CIFAR_TAR

from atop_server.app import Server, ServerConfig
from atop_server.batcher import BatcherConfig
from atop_server.cli import DEFAULT_REPOSITORY
from atop_server.core import CoreConfig
from atop_server.http import HttpConfig

# A test image (never trained on) that the shipped defense classified right in 40 of 40 single draws.
IMAGE, LABEL = "cifar10/test/horse/0000.jpg", "horse"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    """Headless Chromium, or a skip naming what is missing (a failure under `make test-browser`, which
    installs both and sets ATOP_REQUIRE_BROWSER)."""
    if not (CHROMIUM and DRIVER):
        missing = "chromium" if not CHROMIUM else "chromedriver (Debian's chromium-driver)"
        if os.environ.get("ATOP_REQUIRE_BROWSER"):
            pytest.fail(f"no {missing} on PATH")
        pytest.skip(f"no {missing} on PATH: `make test-browser` installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,760"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))


@pytest.fixture(scope="module")
def server():
    core = CoreConfig(DEFAULT_REPOSITORY, batcher=BatcherConfig(max_batch_size=16))
    running = Server(ServerConfig(core=core, port=0, metrics_port=-1, grace_seconds=5, http=HttpConfig(0)))
    running.start()
    yield running
    running.stop()


def test_upload_a_cifar_image_and_see_the_label_and_the_purified_draws(server, tmp_path):
    with tarfile.open(CIFAR_TAR) as tar:
        (tmp_path / "horse.jpg").write_bytes(tar.extractfile(IMAGE).read())  # type: ignore[union-attr]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{server.http_port}/")
        WebDriverWait(driver, 60).until(ready.text_to_be_present_in_element((By.ID, "status"), "Ready"))
        driver.find_element(By.ID, "files").send_keys(str(tmp_path / "horse.jpg"))
        card = WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.CSS_SELECTOR, '.result:is([data-state="done"], [data-state="error"])')
        )
        assert card.get_attribute("data-state") == "done", card.find_element(By.CLASS_NAME, "error").text
        assert card.find_element(By.CSS_SELECTOR, ".topk .label").text == LABEL
        assert "of the draws agree" in card.find_element(By.CLASS_NAME, "stability").text
        canvases = card.find_elements(By.CSS_SELECTOR, "canvas.rt, canvas.purified")
        assert len(canvases) == 6 and all(c.get_attribute("data-rendered") == "true" for c in canvases)
        # Drawn pixels, not blank canvases: the purified image of the first draw has colour in it.
        painted = driver.execute_script(
            "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];"
            "return s / (d.length / 4);",
            card.find_element(By.CSS_SELECTOR, "canvas.purified"),
        )
        assert 20 < painted < 740
        if os.environ.get("ATOP_DEMO_SCREENSHOT"):
            driver.save_screenshot(os.environ["ATOP_DEMO_SCREENSHOT"])
    finally:
        driver.quit()
