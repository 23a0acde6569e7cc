"""The web app served on a tiny converted model: its `/generate` API through `gradio_client`, and its page in headless
Chromium through Selenium. One server (a subprocess started as a user would) is shared by every test here."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.app.cli import tiny_model
from modeling_flamingo.app.content_filter import FLAGGED_NOTICE
from modeling_flamingo.app.engine import GenerationSettings
from modeling_flamingo.app.ui import write_gallery
from modeling_flamingo.processing.image_loading import open_image

from dist_helpers import free_port

MAX_NEW_TOKENS = 8
CAPTIONS = ["An astronaut.", "A cup of coffee."]
CAPTION_PROMPT = "<image>Output:An astronaut.<|endofchunk|><image>Output:A cup of coffee.<|endofchunk|><image>Output:"
# The tiny model continues this prompt about the coffee photograph with " pling..." (found by running it; the test
# checks it against model.generate below), so a word list holding "pling" flags that answer and no other here.
FLAGGED_PROMPT = "<image>An image of two cats sleeping on a couch."
FLAGGED_WORD = "pling"
STOPPED_LOG = "modeling_flamingo.app.engine: generation stopped early"


def _drain(stream, lines: list[str]) -> None:
    for line in stream:  # keeps the pipe from filling up; the tests read the server's log from `lines`
        lines.append(line)


def _count(lines: list[str], text: str) -> int:
    return sum(text in line for line in list(lines))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Save the tiny model, start the app on it (word-list filter, 2 generations at once), load the same folder here."""
    root = tmp_path_factory.mktemp("app")
    model, processor = tiny_model()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "words.txt").write_text(f"# flagged in these tests\n{FLAGGED_WORD}\n")
    port = free_port()
    command = [
        sys.executable, "-m", "modeling_flamingo.app", "--model", str(root / "model"), "--port", str(port),
        "--content_filter", str(root / "words.txt"), "--max_concurrency", "2",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in server.stdout:  # until gradio says where it serves, or the process ends
        log.append(line)
        if "Running on local URL" in line:
            break
    else:
        pytest.fail("the app did not start:\n" + "".join(log))
    threading.Thread(target=_drain, args=(server.stdout, log), daemon=True).start()
    reference = FlamingoForConditionalGeneration.from_pretrained(root / "model").eval()
    reference_processor = FlamingoProcessor.from_pretrained(root / "model")
    gallery = write_gallery(root / "gallery")
    try:
        yield {
            "url": f"http://127.0.0.1:{port}/",
            "model": reference,
            "processor": reference_processor,
            "gallery": gallery,
            "root": root,
            "log": log,
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def model_generate(served, prompt: str, paths: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """Greedy `model.generate` on the same inputs, decoded as a user would."""
    processor = served["processor"]
    images = [open_image(path).convert("RGB") for path in paths]
    batch = processor(images=[images], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = served["model"].generate(**batch, max_new_tokens=max_new_tokens, num_beams=1)
    return processor.batch_decode(out, skip_special_tokens=True, prompt_length=batch["input_ids"].shape[1])[0]


def call(client: Client, prompt: str, paths: list[str], max_new_tokens=MAX_NEW_TOKENS, num_beams=1) -> str:
    return client.predict(prompt, [handle_file(p) for p in paths], max_new_tokens, num_beams, api_name="/generate")


# ---------------------------------------------------------------------------------------------------------------
# gradio_client


def test_generate_endpoint_equals_model_generate(served):
    g = served["gallery"]
    client = Client(served["url"], verbose=False)
    paths = [g["astronaut"], g["coffee"], g["chelsea"]]
    expected = model_generate(served, CAPTION_PROMPT, paths)
    assert expected and FLAGGED_WORD not in expected
    assert call(client, CAPTION_PROMPT, paths) == expected


def test_flagged_answer_is_replaced_by_the_notice(served):
    coffee = served["gallery"]["coffee"]
    assert FLAGGED_WORD in model_generate(served, FLAGGED_PROMPT, [coffee])
    assert call(Client(served["url"], verbose=False), FLAGGED_PROMPT, [coffee]) == FLAGGED_NOTICE


def test_four_concurrent_clients_each_get_their_own_answer(served):
    g = served["gallery"]
    requests = [
        ("<image>A sink in a small bathroom with a mirror.", [g["astronaut"]]),
        ("<image>A sink in a small bathroom with a mirror.", [g["coffee"]]),
        ("<image>Output: a plate of food with rice and vegetables.", [g["coffee"]]),
        ("<image>The quick brown fox jumps over the lazy dog.", [g["astronaut"]]),
    ]
    expected = [model_generate(served, prompt, paths) for prompt, paths in requests]
    assert len(set(expected)) == 4  # distinct answers: a mix-up between requests would show

    def one(request):
        return call(Client(served["url"], verbose=False), *request)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, requests)) == expected


def test_bad_inputs_get_one_clear_message_and_the_server_keeps_serving(served, tmp_path):
    g = served["gallery"]
    client = Client(served["url"], verbose=False)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 7000)).save(bomb)  # a few kB declaring 56 MP, above the default 50 MP bound
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8), "red").save(small)
    cases = [
        ("<image><image>Output:", [g["coffee"]], "The prompt has 2 <image> slots but 1 images were given"),
        ("<image>Output:", [g["coffee"], g["rocket"]], "2 images were given but the prompt has only 1 <image> slots"),
        ("<image>Output:", [not_an_image], "Image 1 (notes.png) is not an image the app can read"),
        (
            "<image>Output:",
            [bomb],
            "Image 1 (bomb.png) is too large: the image declares 8000x7000 = 56,000,000 pixels",
        ),
        ("   ", [], "The prompt is empty"),
        ("<image>" * 9, [small] * 9, "9 images were given; this app takes at most 8 per prompt"),
        ("<image>" + " word" * 600, [small], "exceeds the model's context of 512 tokens"),
    ]
    for prompt, paths, message in cases:
        with pytest.raises(AppError) as error:
            call(client, prompt, paths)
        assert message in str(error.value), (message, str(error.value))
    with pytest.raises(AppError, match="num_beams must be a whole number from 1 to 8"):
        call(client, "<image>Output:", [small], num_beams=0)
    # Still serving, and still right.
    assert call(client, "<image>Output:", [g["rocket"]]) == model_generate(served, "<image>Output:", [g["rocket"]])


# ---------------------------------------------------------------------------------------------------------------
# The page, in headless Chromium


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, url: str) -> WebDriverWait:
    browser.get(url)
    wait = WebDriverWait(browser, 240, poll_frequency=0.2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
    return wait


def _value(browser, selector: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, selector).get_attribute("value")


def _status(browser) -> str:
    return browser.find_element(By.CSS_SELECTOR, "#status").text.strip()


def _run(browser, wait: WebDriverWait) -> list[str]:
    """Click Generate; return every answer the page showed while generating, the last one final."""
    seen = []

    def finished(driver) -> bool:
        seen.append(_value(driver, "#answer textarea"))
        return _status(driver) in ("Done.", "The content filter hid this answer.") or _status(driver).startswith(
            "Error:"
        )

    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(finished)
    seen.append(_value(browser, "#answer textarea"))
    return seen


def test_page_streams_the_answer_of_model_generate(served, browser):
    g = served["gallery"]
    wait = _open(browser, served["url"])
    _fill_captioning(browser, wait, g)
    seen = _run(browser, wait)
    # The page's default settings: greedy, GenerationSettings' max_new_tokens.
    paths = [g["astronaut"], g["coffee"], g["chelsea"]]
    expected = model_generate(served, CAPTION_PROMPT, paths, GenerationSettings().max_new_tokens)
    assert seen[-1] == expected and _status(browser) == "Done."
    assert all(expected.startswith(text) for text in seen)  # streamed pieces only ever grow into the answer
    browser.save_screenshot(str(served["root"] / "page.png"))
    assert (served["root"] / "page.png").stat().st_size > 10_000


def test_page_hides_a_flagged_answer(served, browser):
    wait = _open(browser, served["url"])
    browser.find_element(By.CSS_SELECTOR, "#mode input[value='Free interleaved prompt']").click()
    browser.find_element(By.CSS_SELECTOR, "#demo-image-1 input[type=file]").send_keys(served["gallery"]["coffee"])
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#free-text textarea").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#free-text textarea").send_keys(FLAGGED_PROMPT)
    wait.until(lambda d: _value(d, "#prompt textarea") == FLAGGED_PROMPT)
    seen = _run(browser, wait)
    assert seen[-1] == FLAGGED_NOTICE and _status(browser) == "The content filter hid this answer."
    assert not any(FLAGGED_WORD in text for text in seen)  # never shown, not even while streaming


def _fill_captioning(browser, wait: WebDriverWait, gallery: dict[str, str]) -> None:
    for number, (name, caption) in enumerate(zip(("astronaut", "coffee"), CAPTIONS, strict=True), 1):
        browser.find_element(By.CSS_SELECTOR, f"#demo-image-{number} input[type=file]").send_keys(gallery[name])
        browser.find_element(By.CSS_SELECTOR, f"#demo-text-{number} textarea").send_keys(caption)
    browser.find_element(By.CSS_SELECTOR, "#query-image input[type=file]").send_keys(gallery["chelsea"])
    # The prompt box shows what the model receives, once the uploads have arrived.
    wait.until(lambda d: _value(d, "#prompt textarea") == CAPTION_PROMPT)


def test_page_stop_button_ends_the_generation(served, browser):
    wait = _open(browser, served["url"])
    _fill_captioning(browser, wait, served["gallery"])
    browser.find_element(By.XPATH, "//*[text()='Generation settings']").click()
    tokens = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#max-new-tokens input[type=number]"))[0]
    tokens.clear()
    tokens.send_keys("256\t")
    # A long generation, so that it is still running when Stop is clicked.
    wait.until(lambda d: _value(d, "#max-new-tokens input[type=range]") == "256")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: _status(d) == "Generating…")
    stopped = _count(served["log"], STOPPED_LOG)
    browser.find_element(By.CSS_SELECTOR, "#stop").click()
    wait.until(lambda d: _status(d) == "Stopped.")
    # The server's worker ended early (it logs so when the stream is closed before its end).
    wait.until(lambda d: _count(served["log"], STOPPED_LOG) > stopped)


def test_page_shows_the_message_of_a_file_that_is_not_an_image(served, browser, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    wait = _open(browser, served["url"])
    browser.find_element(By.CSS_SELECTOR, "#mode input[value='Free interleaved prompt']").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#free-text textarea").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#demo-image-1 input[type=file]").send_keys(str(not_an_image))
    browser.find_element(By.CSS_SELECTOR, "#free-text textarea").send_keys("<image>Output:")
    wait.until(lambda d: _value(d, "#prompt textarea") == "<image>Output:")
    _run(browser, wait)
    assert _status(browser).startswith("Error: Image 1 (notes.png) is not an image the app can read")


def test_page_shows_the_message_of_a_bad_input(served, browser):
    wait = _open(browser, served["url"])
    browser.find_element(By.CSS_SELECTOR, "#demo-image-1 input[type=file]").send_keys(served["gallery"]["rocket"])
    browser.find_element(By.CSS_SELECTOR, "#query-image input[type=file]").send_keys(served["gallery"]["chelsea"])
    wait.until(lambda d: "Demonstration 1 has an image but no caption" in _value(d, "#prompt textarea"))
    _run(browser, wait)
    assert _status(browser) == "Error: Demonstration 1 has an image but no caption: write a caption."
    assert _value(browser, "#answer textarea") == ""


def test_page_example_gallery_fills_the_fields(served, browser):
    wait = _open(browser, served["url"])
    wait.until(lambda d: _value(d, "#prompt textarea").startswith("(not ready: Add a query image"))
    browser.find_elements(By.CSS_SELECTOR, "#examples tbody tr")[0].click()  # captioning: astronaut, coffee; cat
    expected = "<image>Output:An astronaut in a spacesuit posing in front of a flag.<|endofchunk|>"
    wait.until(
        lambda d: (
            _value(d, "#prompt textarea")
            == expected + "<image>Output:A cup of coffee on a saucer.<|endofchunk|><image>Output:"
        )
    )
