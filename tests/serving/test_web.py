"""The web page (ms_ray/serving/web/) end to end: a live `ms-ray serve` process (the shipped
serve/local.yaml, a tiny random model, 127.0.0.1) and Debian's headless Chromium driven by
selenium + chromedriver (`make test` installs both). A person's actions: press Connect, type into
the page key by key and press Enter (or tick "send words as I type"), watch the rows arrive in their
columns, see the error for a bad key, watch as a monitor. And the short-trained skills model
(conftest.skills_export) in its own server at the shipped row clock, answering two questions
typed into the page, checked exactly from its output column.

Also a script that makes the README's screenshots with a trained model:
    .venv/bin/python tests/serving/test_web.py [runs/train/tiny/export] [docs/web.png]
    .venv/bin/python tests/serving/test_web.py runs/train/smollm2-chat/export docs/web-smollm2.png \
        "hi, how are you doing today?" serve/smollm2.yaml
"""

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

try:
    from serve_process import MONITOR_KEY, start_serve, stop_serve
except ImportError:  # run as the screenshot script: tests/ (pytest's rootdir for conftest) is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from serve_process import MONITOR_KEY, start_serve, stop_serve

pytestmark = pytest.mark.slow  # two `ms-ray serve` starts (~30-60 s each), and skills_export (~3 min)
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [  # as root, headless, and quiet on a closed network (no background connections)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,860",
]
# The random model's output and think always talk (so their columns fill); its tool_call stays quiet.
RANDOM_MODEL = ["session.sampling.output.silence_penalty=10000", "session.sampling.think.silence_penalty=10000",
                "session.sampling.tool_call.silence_penalty=-10000"]


# ---- helpers (the tests and the screenshot script) ------------------------------------------
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
  pending: text(document.getElementById('pending')),
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
# First in the module: its own server (the trained model) stops before `served` starts.
def test_trained_model_answers_questions_typed_into_the_page(skills_export, browser, tmp_path):
    """A person at the shipped 0.1 s row clock: Connect, a few seconds of nothing, a question sent
    with Enter (whole: the model hears it one word per row, as it learned), its answer; a second
    question a second later, its answer too. Both read exactly from the page's output column."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    proc, url = start_serve(skills_export, [], tmp_path / "serve.log")  # serve/local.yaml as shipped
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "connect").click()
        wait_page(browser, "the session to open", lambda s: s["state"] == "open", 30)
        time.sleep(3.5)  # a person reads the page first; the model stays silent meanwhile
        say = browser.find_element(By.ID, "say")
        asked = [("what is 6 times 7", "let me check 42 <|end|>"),
                 ("red fish moon tree sun", " rouge poisson lune arbre soleil <|end|>")]
        output = user = ""
        for i, (question, answer) in enumerate(asked):
            type_keys(say, question)
            say.send_keys(Keys.ENTER)
            output, user = output + answer, user + (" " if user else "") + question
            state = wait_page(browser, f"the answer to {question!r}",
                              lambda s: s["texts"]["output"].count("<|end|>") > i, 30)
            time.sleep(1.0)  # anything said after the end token shows up too
            state = page_state(browser)
            assert state["texts"]["output"] == output, state["texts"]
            assert state["texts"]["user"] == user and not state["errors"], state
        assert state["texts"]["tool_call"].split() == ["mul", "6", "7"] and state["texts"]["tool"].strip() == "42"
    finally:
        stop_serve(proc)


def test_page_sends_the_line_on_enter_after_connect(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(served + "/")
    state = page_state(browser)
    assert state["state"] == "idle" and state["status"] == "not connected: press Connect to open a session"
    say = browser.find_element(By.ID, "say")
    type_keys(say, "what is 6 ")  # typing before Connect opens nothing: the text waits in the box
    say.send_keys(Keys.ENTER)
    time.sleep(1.0)
    state = page_state(browser)
    assert state["state"] == "idle" and state["say"] == "what is 6 " and state["columns"] == ["row"], state
    assert state["pending"] == "not sent: press Connect first, then Enter"
    # no key: the local config's anonymous role (user). Connect opens the session and sends nothing
    browser.find_element(By.ID, "connect").click()
    state = wait_page(browser, "the session to open", lambda s: s["state"] == "open", 30)
    assert re.fullmatch(r"open: session \S+ as user · row \d+", state["status"]), state["status"]
    # one column per stream the role reads, in the model's order: no think for a user
    assert state["columns"] == ["row", "user", "output", "tool", "tool_call"]
    assert sorted(state["texts"]) == ["output", "tool", "tool_call", "user"] and state["composer"]
    sid = state["status"].split()[2]
    assert state["share"] == f"{served}/?session={sid}"
    type_keys(say, "times 7")  # finished words wait for Enter too (the box is not sent word by word)
    time.sleep(2.0)
    state = page_state(browser)
    assert state["texts"]["user"] == "" and state["say"] == "what is 6 times 7", state["texts"]
    say.send_keys(Keys.ENTER)  # the whole line, then an empty box
    state = wait_page(browser, "the line echoed", lambda s: s["texts"]["user"] == "what is 6 times 7", 20)
    assert state["say"] == "" and state["pending"] == ""
    # the user column holds exactly the typed words, one token per row, in order
    assert [c for c in column(state, "user") if c] == ["what", " is", " 6", " times", " 7"]
    assert any(column(state, "output")), "no output cells in the output column"
    numbers = [int(row[0]) for row in state["rows"]]
    assert numbers == sorted(set(numbers)) and numbers, numbers  # increasing, no row twice
    row = current_row(state)
    state = wait_page(browser, "more rows", lambda s: current_row(s) >= row + 10, 20)  # the model keeps writing
    assert "think" not in state["texts"] and not state["errors"], state["errors"]
    type_keys(say, "what is 3 times 4 ")  # a second line: after a space, less the trailing one
    say.send_keys(Keys.ENTER)
    wait_page(browser, "the second line", lambda s: s["texts"]["user"] == "what is 6 times 7 what is 3 times 4", 20)

    browser.find_element(By.ID, "disconnect").click()  # the polite close: end frame, then 1000
    state = wait_page(browser, "the session to end", lambda s: s["state"] == "closed", 20)
    assert state["status"].startswith("ended: closed · closed: 1000"), state["status"]
    assert state["composer"] and state["say"] == ""  # as on a fresh page: type, then Connect


def test_page_sends_words_as_they_are_typed_when_ticked(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(served + "/")
    assert not browser.find_element(By.ID, "live-words").is_selected()  # off by default
    browser.find_element(By.ID, "live-words").click()
    browser.find_element(By.ID, "connect").click()
    wait_page(browser, "the session to open", lambda s: s["state"] == "open", 30)
    say = browser.find_element(By.ID, "say")
    type_keys(say, "what is 6 ")  # each finished word goes in at once
    state = wait_page(browser, "the finished words echoed", lambda s: s["texts"]["user"] == "what is 6", 20)
    assert state["say"] == "what is 6 " and state["pending"] == ""
    type_keys(say, "times")  # an unfinished word goes after a pause
    state = wait_page(browser, "the paused word", lambda s: s["texts"]["user"] == "what is 6 times", 20)
    type_keys(say, " 7")
    say.send_keys(Keys.ENTER)  # Enter sends the rest and empties the box
    state = wait_page(browser, "the whole line echoed", lambda s: s["texts"]["user"] == "what is 6 times 7", 20)
    assert state["say"] == ""
    assert [c for c in column(state, "user") if c] == ["what", " is", " 6", " times", " 7"]
    type_keys(say, "what ")  # the next line starts with a space in the stream
    wait_page(browser, "the next line's word", lambda s: s["texts"]["user"] == "what is 6 times 7 what", 20)
    browser.find_element(By.ID, "disconnect").click()
    state = wait_page(browser, "the session to end", lambda s: s["state"] == "closed", 20)
    assert state["status"].startswith("ended: closed · closed: 1000") and not state["errors"], state


def test_page_shows_a_bad_key_and_a_refused_open(served, browser):
    from selenium.webdriver.common.by import By

    browser.get(served + "/")
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    browser.find_element(By.ID, "connect").click()
    state = wait_page(browser, "the refusal", lambda s: s["state"] == "closed", 20)
    assert len(state["errors"]) == 1 and state["errors"][0].startswith("unauthorized: "), state["errors"]
    assert state["status"].startswith("closed: 1008"), state["status"]
    assert state["columns"] == ["row"] and not state["texts"]  # no session frame came

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
    sid, owner = opened.json()["id"], {"X-Session-Token": opened.json()["token"]}

    def alive():  # the session still takes input from its opener
        more = httpx.post(f"{served}/v1/sessions/{sid}/append", json={"stream": "user", "text": " 7"},
                          headers=owner, timeout=30)
        return more.status_code == 200

    def leave(reason):  # Disconnect in a tab that attached: the session goes on
        browser.find_element(By.ID, "disconnect").click()
        state = wait_page(browser, f"the {reason}", lambda s: s["state"] == "closed", 20)
        assert state["status"].startswith("closed: 1000") and not state["errors"], state
        assert alive(), f"the {reason} ended the session"

    try:
        question = {"stream": "user", "text": "what is 6 times 7"}
        appended = httpx.post(f"{served}/v1/sessions/{sid}/append", json=question, headers=owner, timeout=30)
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

        browser.get(f"{served}/?session={sid}")  # the plain share link: an anonymous user watches (no think)
        state = wait_page(browser, "the user to attach", lambda s: s["state"] == "open")
        assert state["columns"] == ["row", "user", "output", "tool", "tool_call"]
        assert not state["composer"] and state["readonly"]  # no session token: it cannot write
        leave("watching user leaving")

        browser.get(f"{served}/?session={sid}&key={MONITOR_KEY}")
        wait_page(browser, "the monitor to attach again", lambda s: s["state"] == "open")
    finally:
        httpx.delete(f"{served}/v1/sessions/{sid}", headers=owner, timeout=30)  # the opener ends it; the monitor sees
    state = wait_page(browser, "the end", lambda s: s["state"] == "closed", 20)
    assert state["status"].startswith("ended: closed · closed: 1000"), state["status"]
    assert not state["errors"], state["errors"]


# ---- the README's screenshot -------------------------------------------------------------------
def screenshot(checkpoint="runs/train/tiny/export", out="docs/web.png", question="what is 6 times 7",
               config=None, end="<|end|>") -> None:
    """A live session with the trained model at the shipped row clock: Connect, the question typed
    into the page and sent with Enter, the answer (tool call, tool result, output) on screen, saved
    as a PNG. config: a serve file (serve/smollm2.yaml for the real-language model, whose `end` is
    <|im_end|>)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_serve(Path(checkpoint).resolve(), [], Path(tmp) / "serve.log", config)
        try:
            driver = chromium(f"{tmp}/profile")
            try:
                driver.get(url + "/")
                driver.find_element(By.ID, "connect").click()
                wait_page(driver, "the session to open", lambda s: s["state"] == "open", 30)
                time.sleep(1.0)
                driver.find_element(By.ID, "say").send_keys(question, Keys.ENTER)
                wait_page(driver, "the answer", lambda s: end in s["texts"].get("output", ""), 180)
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
    screenshot(*sys.argv[1:6])
