"""The upload flow in a real browser: headless Chromium driven by Selenium.

Uses Debian's ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``.ci/run`` installs
them); skipped with the reason when they are missing. The app runs in a thread on a free
port of 127.0.0.1.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def server_url():
    from werkzeug.serving import make_server

    from malaria_classifier.dashboard import create_app
    from malaria_classifier.prediction import Predictor

    app = create_app(Predictor())
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
            f"install with: apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def upload(browser, paths: list[Path]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    field = WebDriverWait(browser, WAIT_SECONDS).until(
        expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#upload input[type=file]")
        )
    )
    # Chromedriver adds to a multiple file input's earlier selection; a person's file
    # dialog replaces it. Clear it so each call is one fresh selection, as in a browser.
    browser.execute_script("arguments[0].value = '';", field)
    field.send_keys("\n".join(str(path) for path in paths))


def wait_for_cards(browser, count: int, containing: str) -> list[str]:
    """The result cards' texts, once there are ``count`` and the first holds ``containing``."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def cards_ready(driver):
        texts = [card.text for card in driver.find_elements(By.CSS_SELECTOR, ".result-card")]
        return texts if len(texts) == count and containing in texts[0] else False

    wait = WebDriverWait(
        browser, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return wait.until(cards_ready)
    except TimeoutException:
        shown = [card.text for card in browser.find_elements(By.CSS_SELECTOR, ".result-card")]
        raise AssertionError(
            f"expected {count} cards, the first naming {containing!r}; the page shows {shown}"
        ) from None


@pytest.fixture(scope="module")
def real_cell(shared_data_dir):
    return sorted((shared_data_dir / "Parasitized").glob("*.png"))[0]


def test_upload_a_real_cell_then_a_corrupt_file_then_the_same_cell_again(
    browser, server_url, real_cell, tmp_path_factory
):
    from selenium.webdriver.common.by import By

    from malaria_classifier.prediction import Predictor

    [expected] = list(Predictor().predict_paths([real_cell]))
    browser.get(server_url)
    # What a screen reader needs to find its way: the language, one h1, a named file input.
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Malaria cell classifier"
    field = browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
    assert field.get_attribute("aria-label") == "Upload cell images to classify"
    assert field.get_attribute("aria-describedby") == "upload-limits"

    upload(browser, [real_cell])
    [card] = wait_for_cards(browser, 1, real_cell.name)
    assert expected.decision in ("Parasitized", "Uninfected")  # a clear cell was picked
    assert expected.decision in card
    assert f"{100 * expected.confidence:.1f}% confident" in card
    assert f"P(Parasitized) = {expected.probability:.3f}" in card

    corrupt = tmp_path_factory.mktemp("corrupt") / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    upload(browser, [corrupt])
    [card] = wait_for_cards(browser, 1, "corrupt.png")
    assert "Not classified" in card and "is not an image that can be read" in card

    upload(browser, [real_cell])  # the same file again must be classified again
    [card] = wait_for_cards(browser, 1, real_cell.name)
    assert expected.decision in card


def test_a_batch_with_a_bad_file_classifies_the_rest_and_fills_the_table(
    browser, server_url, shared_data_dir, tmp_path_factory
):
    from selenium.webdriver.common.by import By

    cells = sorted((shared_data_dir / "Uninfected").glob("*.png"))[:3]
    folder = tmp_path_factory.mktemp("bad")
    bad = folder / "notes.txt"
    bad.write_text("not an image")
    # Named so that only a numeric comparison puts cell_9 before cell_10.
    numbered = [folder / "cell_10.png", folder / "cell_9.png"]
    for path in numbered:
        path.write_bytes(cells[0].read_bytes())
    browser.get(server_url)
    upload(browser, [bad, *numbered, *reversed(cells)])
    cards = wait_for_cards(browser, 6, cells[0].name)
    # The browser reads files in no fixed order; the cards come sorted by file name.
    shown_names = [card.split(".png")[0].split("\n")[-1] for card in cards[:5]]
    assert shown_names == [*(cell.stem for cell in cells), "cell_9", "cell_10"]
    assert "notes.txt" in cards[5] and "unsupported file kind" in cards[5]
    summary = browser.find_element(By.ID, "summary").text
    assert "Files: 6" in summary and "Not classified: 1" in summary
    grid_rows = browser.find_elements(
        By.CSS_SELECTOR, "#result-table .ag-center-cols-container .ag-row"
    )
    assert len(grid_rows) == 6
    download = browser.find_element(By.ID, "download-button")
    assert download.is_enabled()


def test_model_tab_opens_from_the_keyboard_with_metrics_and_the_roc_curve(browser, server_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server_url)
    tab = WebDriverWait(browser, WAIT_SECONDS).until(
        expected_conditions.element_to_be_clickable((By.LINK_TEXT, "Model"))
    )
    # Reachable and usable from the keyboard, not only by mouse.
    WebDriverWait(browser, WAIT_SECONDS).until(lambda _: tab.get_attribute("tabindex") == "0")
    tab.send_keys(Keys.ENTER)
    WebDriverWait(browser, WAIT_SECONDS).until(
        expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#roc-curve .main-svg"))
    )
    page = browser.find_element(By.ID, "model-page").text
    assert "roc_auc" in page and "Positive class = Parasitized" in page


def test_chromium_is_on_ci(request):
    """Guard: CI must not silently skip the browser tests (``.ci/run`` installs Chromium)."""
    ci_script = Path(request.config.rootpath) / ".ci" / "run"
    assert "chromium-driver" in ci_script.read_text(), "install chromium in .ci/run"


def test_a_large_batch_pages_its_cards_and_a_new_batch_clears_the_table_filter(
    browser, server_url, real_cell, tmp_path_factory
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from malaria_classifier.dashboard.components import CARDS_PER_PAGE

    folder = tmp_path_factory.mktemp("many")
    count = CARDS_PER_PAGE + 5
    paths = [folder / f"cell_{index}.png" for index in range(count)]
    for path in paths:
        path.write_bytes(real_cell.read_bytes())
    browser.get(server_url)
    # Record whether the last batch's results were hidden while this one was classified.
    browser.execute_script(
        """
        window.hiddenWhileClassifying = false;
        new MutationObserver(function () {
            const area = document.getElementById("results-area");
            const spinner = document.getElementById("progress");
            if (area && spinner && area.style.display === "none"
                    && spinner.style.display === "block") {
                window.hiddenWhileClassifying = true;
            }
        }).observe(document.body, {attributes: true, subtree: true, attributeFilter: ["style"]});
        """
    )
    upload(browser, paths)
    cards = wait_for_cards(browser, CARDS_PER_PAGE, "cell_0.png")
    assert browser.execute_script("return window.hiddenWhileClassifying;") is True
    assert browser.find_element(By.ID, "results-area").is_displayed()
    assert not browser.find_element(By.ID, "progress").is_displayed()
    assert "cell_59.png" in cards[-1]  # numeric order, first page only
    pager = browser.find_element(By.ID, "card-pager")
    assert pager.is_displayed()
    second_page = pager.find_element(By.LINK_TEXT, "2")
    browser.execute_script("arguments[0].click();", second_page)  # may lie below the fold
    cards = wait_for_cards(browser, 5, f"cell_{CARDS_PER_PAGE}.png")
    assert "Files: 65" in browser.find_element(By.ID, "summary").text

    # A filter that hides every row of this batch must not hide the next batch's rows.
    browser.execute_script(
        "dash_ag_grid.getApi('result-table').setFilterModel("
        "{filename: {filterType: 'text', type: 'contains', filter: 'no such file'}});"
    )

    def displayed_rows(driver):
        return driver.execute_script(
            "return dash_ag_grid.getApi('result-table').getDisplayedRowCount();"
        )

    WebDriverWait(browser, WAIT_SECONDS).until(lambda driver: displayed_rows(driver) == 0)
    upload(browser, [real_cell])
    wait_for_cards(browser, 1, real_cell.name)
    WebDriverWait(browser, WAIT_SECONDS).until(lambda driver: displayed_rows(driver) == 1)
    assert not browser.find_element(By.ID, "card-pager").is_displayed()
