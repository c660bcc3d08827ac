"""The web page (ms_ray/serving/web/) end to end: a live `ms-ray serve` process (the shipped
serve/local.yaml, a tiny random model, 127.0.0.1) and Debian's headless Chromium driven by
selenium + chromedriver (`make test` installs both). A person's actions: type into the page key by
key, watch the rows arrive in their columns, see the error for a bad key, watch as a monitor.

Also a script that makes the README's screenshot with the trained model:
    .venv/bin/python tests/serving/test_web.py [runs/train/tiny/export] [docs/web.png]
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from ms_ray.serving.client import wait_ready

pytestmark = pytest.mark.slow  # one `ms-ray serve` start (~30-60 s) for the module
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MONITOR_KEY = "web-test-monitor-key"  # serve/local.yaml reads it from MS_RAY_MONITOR_KEY
CHROMIUM_FLAGS = [  # as root, headless, and quiet on a closed network (no background connections)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,860",
]
# The random model's output and think always talk (so their columns fill); its tool_call stays quiet.
RANDOM_MODEL = ["session.sampling.output.silence_penalty=10000", "session.sampling.think.silence_penalty=10000",
                "session.sampling.tool_call.silence_penalty=-10000"]


# ---- helpers (the tests and the screenshot script) ------------------------------------------
def start_serve(checkpoint, overrides: list[str], log: Path):
    """`ms-ray serve checkpoint=PATH` (serve/local.yaml) on a free port of 127.0.0.1, in its own
    process group; returns (process, base URL) once it is ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MS_RAY_MONITOR_KEY=MONITOR_KEY, MS_RAY_OPERATOR_KEY="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ms_ray.cli", "serve", f"checkpoint={checkpoint}", f"port={port}", "log_level=WARNING",
         "model.num_cpus=0", *overrides],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 240)
    except TimeoutError:
        stop_serve(proc)
        raise AssertionError(f"ms-ray serve was not ready in 240 s:\n{log.read_text()[-3000:]}") from None
    return proc, url


def stop_serve(proc) -> None:
    """Ctrl-C (a clean Serve shutdown), then SIGKILL to its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def chromium(user_data_dir: str):
    """Headless Debian Chromium under selenium, with Debian's chromedriver (nothing downloaded)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make test` (as root it installs them) or "
                    "`apt-get install chromium chromium-driver`", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium missing: run `make test` (or pip install -e '.[test]')", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


PAGE_STATE = """
const text = (el) => el ? el.textContent : null;
return {
  state: document.getElementById('status').dataset.state,
  status: text(document.getElementById('status')),
  errors: [...document.querySelectorAll('#errors li')].map(text),
  columns: [...document.querySelectorAll('#grid thead th')].map(text),
  rows: [...document.querySelectorAll('#grid tbody tr')].map(tr => [...tr.cells].map(text)),
  texts: Object.fromEntries([...document.querySelectorAll('#texts .card')]
    .map(c => [c.dataset.stream, text(c.querySelector('pre'))])),
  share: text(document.getElementById('share-link')),
  composer: !document.getElementById('composer').hidden,
  readonly: !document.getElementById('readonly').hidden,
  say: document.getElementById('say').value,
};
"""


def page_state(driver) -> dict:
    """What the page shows, read from its DOM (textContent: spaces kept exactly)."""
    return driver.execute_script(PAGE_STATE)


def wait_page(driver, what: str, condition, timeout: float = 60) -> dict:
    """Poll the page until condition(state) holds; returns that state, or fails showing the page."""
    deadline = time.monotonic() + timeout
    while True:
        state = page_state(driver)
        if condition(state):
            return state
        if time.monotonic() > deadline:
            brief = {**state, "rows": state["rows"][-5:]}
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}; the page: {json.dumps(brief)}",
                        pytrace=False)
        time.sleep(0.1)


def type_keys(element, text: str) -> None:
    """One key at a time, as a person types (each is its own key event in the page)."""
    for ch in text:
        element.send_keys(ch)


def column(state: dict, stream: str) -> list[str]:
    """The cells of one stream's column, row by row (empty cells included)."""
    i = state["columns"].index(stream)
    return [row[i] for row in state["rows"]]


def current_row(state: dict) -> int:
    match = re.search(r"row (\d+)", state["status"])
    return int(match.group(1)) if match else -1


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tok, sch, tmp_path_factory):
    """One `ms-ray serve` for the module: a tiny random skills-schema model, 20 rows/s."""
    from ms_ray.core.families import tiny_base_model
    from ms_ray.core.model import MultiStreamLM

    tmp = tmp_path_factory.mktemp("web")
    MultiStreamLM(tiny_base_model("llama", len(tok), seed=0), sch).save_pretrained(tmp / "ckpt", tok)
    proc, url = start_serve(tmp / "ckpt", ["session.row_interval_s=0.05", "session.idle_timeout_s=30", *RANDOM_MODEL],
                            tmp / "serve.log")
    yield url
    stop_serve(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(str(tmp_path_factory.mktemp("chromium-profile")))
    yield driver
    driver.quit()


# ---- tests -----------------------------------------------------------------------------------
def test_page_typing_goes_into_the_user_stream_while_rows_arrive(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(served + "/")
    assert page_state(browser)["state"] == "idle"
    say = browser.find_element(By.ID, "say")
    # no key: the local config's anonymous role (user). The first key opens the session; no Enter:
    # each finished word goes in at once (those typed while the session opened, as soon as it is open)
    type_keys(say, "what is 6 ")
    state = wait_page(browser, "the finished words echoed in the user column",
                      lambda s: s["state"] == "open" and s["texts"].get("user") == "what is 6", 30)
    assert re.fullmatch(r"open: session \S+ as user · row \d+", state["status"]), state["status"]
    # one column per stream the role reads, in the model's order: no think for a user
    assert state["columns"] == ["row", "user", "output", "tool", "tool_call"]
    assert sorted(state["texts"]) == ["output", "tool", "tool_call", "user"] and state["composer"]
    sid = state["status"].split()[2]
    assert state["share"] == f"{served}/?session={sid}"
    type_keys(say, "times")  # an unfinished word goes after a pause
    wait_page(browser, "the paused word echoed", lambda s: s["texts"]["user"] == "what is 6 times", 20)
    type_keys(say, " 7")
    say.send_keys(Keys.ENTER)  # Enter sends the rest and empties the box
    state = wait_page(browser, "the whole line echoed", lambda s: s["texts"]["user"] == "what is 6 times 7", 20)
    assert state["say"] == ""
    # the user column holds exactly the typed words, one token per row, in order
    assert [c for c in column(state, "user") if c] == ["what", " is", " 6", " times", " 7"]
    assert any(column(state, "output")), "no output cells in the output column"
    numbers = [int(row[0]) for row in state["rows"]]
    assert numbers == sorted(set(numbers)) and numbers, numbers  # increasing, no row twice
    row = current_row(state)
    state = wait_page(browser, "more rows", lambda s: current_row(s) >= row + 10, 20)  # the model keeps writing
    assert "think" not in state["texts"] and not state["errors"], state["errors"]

    browser.find_element(By.ID, "disconnect").click()  # the polite close: end frame, then 1000
    state = wait_page(browser, "the session to end", lambda s: s["state"] == "closed", 20)
    assert state["status"].startswith("ended: closed · closed: 1000"), state["status"]
    assert not state["composer"]


def test_page_shows_a_bad_key_and_a_refused_open(served, browser):
    from selenium.webdriver.common.by import By

    browser.get(served + "/")
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    browser.find_element(By.ID, "connect").click()
    state = wait_page(browser, "the refusal", lambda s: s["state"] == "closed", 20)
    assert len(state["errors"]) == 1 and state["errors"][0].startswith("unauthorized: "), state["errors"]
    assert state["status"].startswith("closed: 1008"), state["status"]
    assert state["columns"] == ["row"] and not state["composer"]

    key = browser.find_element(By.ID, "key")  # a monitor attaches; it may not open a session
    key.clear()
    key.send_keys(MONITOR_KEY)
    browser.find_element(By.ID, "connect").click()
    state = wait_page(browser, "the second refusal", lambda s: s["state"] == "closed" and s["errors"], 20)
    assert state["errors"][0].startswith("forbidden: ") and "closed: 1008" in state["status"], state


def test_monitor_attaches_by_link_and_sees_think(served, browser):
    from selenium.webdriver.common.by import By

    opened = httpx.post(f"{served}/v1/sessions", timeout=30)  # a user session (anonymous, HTTP)
    assert opened.status_code == 201, opened.text
    sid = opened.json()["id"]

    def alive():  # the session still takes input
        more = httpx.post(f"{served}/v1/sessions/{sid}/append", json={"stream": "user", "text": " 7"}, timeout=30)
        return more.status_code == 200

    def leave(reason):  # Disconnect in a tab that attached: the session goes on
        browser.find_element(By.ID, "disconnect").click()
        state = wait_page(browser, f"the {reason}", lambda s: s["state"] == "closed", 20)
        assert state["status"].startswith("closed: 1000") and not state["errors"], state
        assert alive(), f"the {reason} ended the session"

    try:
        question = {"stream": "user", "text": "what is 6 times 7"}
        appended = httpx.post(f"{served}/v1/sessions/{sid}/append", json=question, timeout=30)
        assert appended.status_code == 200, appended.text
        browser.get(f"{served}/?session={sid}&key={MONITOR_KEY}")  # the share link plus a key: attaches at once
        state = wait_page(browser, "the monitor to attach", lambda s: s["state"] == "open")
        assert state["status"].startswith(f"open: session {sid} as monitor"), state["status"]
        assert "key=" not in browser.current_url  # the key left the address bar
        assert state["columns"] == ["row", "user", "think", "output", "tool", "tool_call"]
        assert not state["composer"] and state["readonly"]  # a monitor writes nothing
        state = wait_page(browser, "think cells and the user's words",
                          lambda s: any(column(s, "think")) and s["texts"]["user"].startswith("what is 6 times 7"), 30)
        assert state["texts"]["think"]
        leave("monitor detaching")

        browser.get(f"{served}/?session={sid}")  # the plain share link: an anonymous user attaches (no think)
        state = wait_page(browser, "the user to attach", lambda s: s["state"] == "open")
        assert state["columns"] == ["row", "user", "output", "tool", "tool_call"] and state["composer"]
        leave("attached user leaving")

        browser.get(f"{served}/?session={sid}&key={MONITOR_KEY}")
        wait_page(browser, "the monitor to attach again", lambda s: s["state"] == "open")
    finally:
        httpx.delete(f"{served}/v1/sessions/{sid}", timeout=30)  # the user ends it; the monitor sees the end
    state = wait_page(browser, "the end", lambda s: s["state"] == "closed", 20)
    assert state["status"].startswith("ended: closed · closed: 1000"), state["status"]
    assert not state["errors"], state["errors"]


# ---- the README's screenshot -------------------------------------------------------------------
def screenshot(checkpoint="runs/train/tiny/export", out="docs/web.png", question="what is 6 times 7") -> None:
    """A live session with the trained model: the question typed into the page, the answer
    (tool call, tool result, output) on screen, saved as a PNG. The model learnt its skills with
    the question in a session's first rows; a 0.4 s row clock keeps it there (the first key
    opens the session) even on a busy machine, where 0.1 s rows may pass before the words arrive."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_serve(Path(checkpoint).resolve(), ["session.row_interval_s=0.4"], Path(tmp) / "serve.log")
        try:
            driver = chromium(f"{tmp}/profile")
            try:
                driver.get(url + "/")
                driver.find_element(By.ID, "say").send_keys(question, Keys.ENTER)  # opens the session
                wait_page(driver, "the answer", lambda s: "<|end|>" in s["texts"].get("output", ""), 90)
                time.sleep(1.0)
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1280, min(height + 8, 1200))  # the page, without blank space below
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
                print(json.dumps(page_state(driver)["texts"]))
            finally:
                driver.quit()
        finally:
            stop_serve(proc)
    print(f"wrote {out}")


if __name__ == "__main__":
    screenshot(*sys.argv[1:3])
