"""The page at ``/`` of ``edge-tl serve`` in a real browser (Debian's chromium, headless,
driven by selenium through chromedriver): a field engineer's session on real NEU-DET
photos. The server is a real ``edge-tl serve`` process on the session's exported linear
probe (crazing, patches, scratches); the page is shown five photos of a class the head does
not know (inclusion), taught it, and then predicts the next photo of that class as it; a
second class taught and rolled back on the page is forgotten again. A wrong token gets the
server's one-line reason on the page and changes nothing. The screenshot is written beside
the test's files and to ``/tmp/serve_page.png``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

from tests.test_serve_live import TOKEN, Server, neu, snapshot  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60
UNKNOWN = "inclusion"  # NEU-DET class the exported head was not trained on
SECOND = "pitted_surface"  # another one, taught and then rolled back
SHOT = Path("/tmp/serve_page.png")


def _browser_paths() -> tuple[Path, Path]:
    """Debian's chromium and its driver; installed with apt-get when missing and this runs
    as root on a system that has apt-get (what ``make test`` does too), else a skip that
    says how to get them."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        apt = shutil.which("apt-get")
        if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = [apt, "install", "-y", "-q", "--no-install-recommends"]
            subprocess.run(
                [*cmd, "chromium", "chromium-driver"], env=env, capture_output=True, timeout=1200
            )
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            f"no real browser: {CHROMIUM} and {CHROMEDRIVER} are needed (Debian: apt-get "
            "install chromium chromium-driver; `make test` does it as root)"
        )
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture()
def browser():
    """Headless chromium at a phone's width (430 CSS px). selenium is given the driver and
    the browser's paths, so selenium-manager never looks for (or downloads) either."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs the tests as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=430,1000",
    ):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(str(driver)), options=options)
    try:
        yield d
    finally:
        d.quit()


def _wait(d, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        err = d.find_element("id", "error")
        if err.is_displayed() and err.text:
            raise AssertionError(f"the page shows an error while waiting for {what}: {err.text}")
        return condition(d)

    return WebDriverWait(d, WAIT_S).until(check, f"the page did not show {what}")


def _predictions(d) -> list[str]:
    return [e.get_attribute("data-label") for e in d.find_elements("css selector", ".prediction")]


def _check(d, photo: Path, version: int) -> str:
    """Pick ``photo`` in "Check parts" and wait for its answer from head ``version``."""
    d.execute_script(
        "for (const id of ['predict-status', 'results'])"
        " document.getElementById(id).textContent = ''"
    )
    d.find_element("id", "predict-files").send_keys(str(photo))
    done = f"with head v{version}"
    _wait(
        d,
        lambda d: done in d.find_element("id", "predict-status").text and _predictions(d),
        f"the prediction of {photo.name} by head v{version}",
    )
    (label,) = _predictions(d)
    return label


def _screenshot(d, path: Path) -> None:
    """The whole page at the phone's width."""
    d.execute_script("window.scrollTo(0, 0)")
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(430, min(int(height) + 120, 4000))
    d.save_screenshot(str(path))


@pytest.mark.slow
def test_a_field_engineer_teaches_an_unknown_class_on_the_page(bundles, tmp_path, browser):
    d = browser
    bundle = Path(shutil.copytree(bundles["onnx-fp32"], tmp_path / "line3"))
    support, nxt = neu(UNKNOWN, 0, 5), neu(UNKNOWN, 5, 1)[0]
    server = Server([bundle], tmp_path)
    try:
        server.wait_ready()
        d.get(server.url + "/")
        _wait(d, lambda d: "classifier" in d.find_element("id", "model-info").text, "the model")
        info = d.find_element("id", "model-info").text
        assert "line3" in d.find_element("id", "model").text
        assert UNKNOWN not in info and "crazing" in info, info
        before = _check(d, nxt, 0)
        assert before != UNKNOWN

        # a wrong token: the server's one-line reason on the page, the bundle unchanged
        untouched = snapshot(bundle)
        d.find_element("id", "token").send_keys("not-the-token-0123456789")
        d.find_element("id", "learn-label").send_keys(UNKNOWN)
        d.find_element("id", "learn-files").send_keys("\n".join(map(str, support)))
        d.find_element("id", "learn-button").click()
        err = d.find_element("id", "error")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(d, WAIT_S).until(lambda d: err.is_displayed() and err.text)
        assert err.text.startswith("Teaching failed: ") and "token" in err.text, err.text
        assert snapshot(bundle) == untouched

        # the right token (kept in sessionStorage, never in the URL): teach the class
        d.find_element("id", "token").clear()
        d.find_element("id", "token").send_keys(TOKEN)
        assert TOKEN not in d.current_url
        assert d.execute_script("return sessionStorage.getItem('edge_tl.token')") == TOKEN
        d.find_element("id", "learn-button").click()  # the photos are still picked
        _wait(d, lambda d: "taught" in d.find_element("id", "learn-status").text, "the lesson")
        assert "from 5 photos: head v1" in d.find_element("id", "learn-status").text
        _wait(d, lambda d: UNKNOWN in d.find_element("id", "model-info").text, "the new class")

        after = _check(d, nxt, 1)
        assert after == UNKNOWN, f"{nxt.name} predicted {after!r} after teaching {UNKNOWN}"
        SHOT.unlink(missing_ok=True)
        _screenshot(d, tmp_path / "serve_page.png")
        shutil.copy(tmp_path / "serve_page.png", SHOT)
        d.set_window_size(430, 1000)

        # a second lesson (v2), then back to v1 from the page's versions list
        d.find_element("id", "learn-label").clear()
        d.find_element("id", "learn-label").send_keys(SECOND)
        d.find_element("id", "learn-files").send_keys("\n".join(map(str, neu(SECOND, 0, 5))))
        d.find_element("id", "learn-button").click()
        _wait(d, lambda d: "head v2" in d.find_element("id", "learn-status").text, "lesson 2")
        d.find_element("id", "versions-button").click()
        _wait(d, lambda d: d.find_elements("id", "rollback-1"), "the versions")
        assert "in force" in d.find_element("id", "version-2").text
        d.find_element("id", "rollback-1").click()
        _wait(d, lambda d: "head v1" in d.find_element("id", "model-info").text, "the roll back")
        assert SECOND not in d.find_element("id", "model-info").text
        assert "in force" in d.find_element("id", "version-1").text
        assert _check(d, nxt, 1) == UNKNOWN
    finally:
        server.stop()
