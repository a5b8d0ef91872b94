"""The chat page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium) opens `/`, types a message, and the reply streamed into the page equals the
API's answer to the same conversation. `.ci/run` installs the browser; without it this test fails
(it does not skip), saying what to install."""

import shutil
from pathlib import Path

import openai
import pytest

from bitnet_jax.cli import main
from bitnet_jax.serve.batching import Engine
from bitnet_jax.serve.load import load_model
from bitnet_jax.serve.server import create_app, running

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
MODEL = "tiny"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser") / "packed"
    assert main(["convert", str(FIXTURES / "packed_bitlinear"), str(folder)]) == 0
    config, params, tokenizer = load_model(folder)
    # The shapes of tests/test_server.py's engine: a persistent compilation cache (conftest) shares its programs.
    engine = Engine(config, params, tokenizer, max_batch=8, max_context=128)
    engine.start()
    with running(create_app(engine, model_name=MODEL, folder=str(folder))) as url:
        yield url
    engine.stop()


def chromium_driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.fail(
            f"The browser test needs Debian's chromium and chromium-driver (found chromium={browser}, "
            f"chromedriver={driver_path}): apt-get install chromium chromium-driver (.ci/run does)."
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


def test_chat_page_streams_the_apis_reply(url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    want = api.chat.completions.create(model=MODEL, messages=messages, temperature=0).choices[0].message.content
    assert want  # the fixture model answers something

    driver = chromium_driver()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: MODEL in d.find_element(By.ID, "status").text)
        box = driver.find_element(By.ID, "input")
        box.send_keys("hello")
        box.send_keys(Keys.ENTER)  # the page sends on Enter, temperature 0 by default
        selector = ".message.assistant[data-done='true']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
        reply = driver.find_element(By.CSS_SELECTOR, selector)
        assert "error" not in reply.get_attribute("class")
        assert reply.get_attribute("textContent") == want
        user = driver.find_element(By.CSS_SELECTOR, ".message.user")
        assert user.get_attribute("textContent") == "hello"
        assert driver.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        driver.quit()
    assert (tmp_path / "chat.png").stat().st_size > 0
