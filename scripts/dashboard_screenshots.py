"""Take the README's dashboard screenshots with headless Chromium.

Usage:
    python scripts/dashboard_screenshots.py [--data ../shared/data/nih-cell-images]

Writes docs/images/dashboard_main.png (the page with the example gallery),
dashboard_batch.png (a batch of real cells, a non-cell image and a corrupt file, Grad-CAM on) and
dashboard_model.png (the model tab). Needs Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "images"


def start_server(examples: Path) -> str:
    from malaria_classifier.dashboard import create_app
    from malaria_classifier.prediction import Predictor

    app = create_app(Predictor(), examples=examples)
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/"


def open_browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(flag)
    options.add_argument("--disable-background-networking")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    args = parser.parse_args()
    args.data = args.data.resolve()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    url = start_server(args.data)
    browser = open_browser()
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(url)
        wait.until(expected_conditions.presence_of_element_located((By.ID, "examples")))
        time.sleep(1)
        browser.save_screenshot(str(OUTPUT / "dashboard_main.png"))

        cells = sorted((args.data / "Parasitized").glob("*.png"))[200:205]
        cells += sorted((args.data / "Uninfected").glob("*.png"))[200:206]
        with tempfile.TemporaryDirectory() as folder:
            corrupt = Path(folder) / "scanner_error.png"
            corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
            not_a_cell = Path(folder) / "screenshot.png"
            picture = Image.new("RGB", (160, 120), "white")
            ImageDraw.Draw(picture).text((10, 50), "Report page 1", fill="black")
            picture.save(not_a_cell)
            browser.find_element(By.CSS_SELECTOR, "label[for=show-why]").click()
            field = browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
            field.send_keys("\n".join(str(path) for path in [*cells, not_a_cell, corrupt]))
            wait.until(
                lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".result-card")) == 13
            )
        time.sleep(1.5)
        browser.save_screenshot(str(OUTPUT / "dashboard_batch.png"))

        browser.find_element(By.LINK_TEXT, "Model").click()
        wait.until(
            expected_conditions.visibility_of_element_located(
                (By.CSS_SELECTOR, "#roc-curve .main-svg")
            )
        )
        browser.execute_script(
            "document.getElementById('confusion-matrix').scrollIntoView({block: 'center'});"
        )
        time.sleep(1)
        browser.save_screenshot(str(OUTPUT / "dashboard_model.png"))
    finally:
        browser.quit()
    print(f"Screenshots written to {OUTPUT}")


if __name__ == "__main__":
    main()
