"""The docs pages in a real browser: headless Chromium against a real uvicorn process.

A user opens /docs, expands POST /classify, presses "Try it out" and "Execute" with the
example body, and reads a 200 answer with a label; /redoc renders the API. Nothing the
pages load comes from another host. Screenshots land in artifacts/ at the repo root.
Skips without selenium, chromium or chromedriver (CI installs Debian's chromium and
chromium-driver packages).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "artifacts"
TASK_PATHS = ["/classify", "/translate", "/summarize", "/embed"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def server_url(catalog_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``python -m app serve`` process on a free port, stopped even if the tests fail."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("docs-server") / "server.log"
    env = {
        **os.environ,
        "TESSERA_CATALOG": str(catalog_path),
        "TESSERA_HUB": "offline",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server exited with {server.returncode}:\n{tail(log_path)}")
            try:
                if httpx.get(f"{url}/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health/live within 60 s:\n{tail(log_path)}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium driven by the system chromedriver; quit even if the tests fail."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium or chromedriver not found (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def screenshot_on_failure(driver: Any, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / f"{name}-failure.png"))
        raise


def wait_for(driver: Any, css: str, timeout: float = 30, root: Any = None) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    scope = root or driver
    return WebDriverWait(driver, timeout).until(lambda _: scope.find_element(By.CSS_SELECTOR, css))


def outside_requests(driver: Any) -> tuple[set[str], set[str], set[str]]:
    """What the page asked for since the last call: (local URLs, other hosts' URLs that left the
    browser, other hosts' URLs the Content-Security-Policy blocked), from Chrome's network log."""
    urls: dict[str, str] = {}
    blocked: set[str] = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    local, sent, refused = set(), set(), set()
    for request_id, url in urls.items():
        if not url.startswith(("http:", "https:", "ws:", "wss:")):
            continue  # data: and blob: URLs never leave the page
        if httpx.URL(url).host == "127.0.0.1":
            local.add(url)
        else:
            (refused if request_id in blocked else sent).add(url)
    return local, sent, refused


def test_docs_page_runs_the_classify_example(browser: Any, server_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server_url}/docs")
    with screenshot_on_failure(browser, "docs-classify"):
        for path in TASK_PATHS:
            wait_for(browser, f".opblock-summary-path[data-path='{path}']")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "docs.png"))
        operation = browser.find_element(
            By.XPATH,
            "//div[contains(concat(' ', normalize-space(@class), ' '), ' opblock ')][.//*[@data-path='/classify']]",
        )
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
        wait_for(browser, "button.try-out__btn", root=operation).click()
        body = wait_for(browser, "textarea.body-param__text", root=operation)
        assert '"I love this movie"' in body.get_attribute("value")

        wait_for(browser, "button.execute", root=operation).click()
        status = wait_for(
            browser, ".live-responses-table tr.response .response-col_status", timeout=120, root=operation
        )
        answer = operation.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre")
        WebDriverWait(browser, 30).until(lambda _: '"label"' in answer.text)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", answer)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "docs-classify.png"))

        assert status.text.strip() == "200"
        assert '"model": "minilm-sentiment"' in answer.text
        local, sent, _ = outside_requests(browser)
        assert f"{server_url}/docs/static/swagger-ui-bundle.js" in local
        assert f"{server_url}/classify" in local
        assert not sent, f"the docs page fetched from other hosts: {sorted(sent)}"


def test_redoc_page_renders_the_api(browser: Any, server_url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server_url}/redoc")
    with screenshot_on_failure(browser, "redoc"):
        title = wait_for(browser, ".api-content h1")
        assert "Tessera inference server" in title.text
        content = wait_for(browser, ".api-content")
        for summary in ["Classify texts", "Translate texts", "Summarize texts", "Embed texts"]:
            WebDriverWait(browser, 30).until(lambda _, s=summary: s in content.text)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "redoc.png"))
        # ReDoc's sidebar asks its CDN for a logo; the page's CSP must stop that at the browser.
        local, sent, _ = outside_requests(browser)
        assert f"{server_url}/docs/static/redoc.standalone.js" in local
        assert not sent, f"the ReDoc page fetched from other hosts: {sorted(sent)}"
