"""
The admin page (``GET /admin`` on the API port) in headless Chromium: it
asks for the key (kept in session storage), shows the nodes, a socket a test
opens, publishes from the page, disconnects a user, and shows names and
payloads as text; its screenshots for docs/operations.rst are taken here.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from childnode import ChildNode
from conftest import RedisServer
from selenium.webdriver.common.by import By
from test_clients import chromium  # noqa: F401  (fixture)

from sockdrawer import make_token

ROOT = Path(__file__).resolve().parent.parent
KEY = "admin-key-0123456789"
SECRET = "s" * 32
XSS = "<img src=x onerror=\"window.pwned=1\">"
#: a channel name holding HTML (a path segment: no space, no slash)
HTML_CHANNEL = "<b>bold<i>"


def click_cell(driver: Any, table: str, text: str, tries: int = 20) -> None:
    """Click the cell of ``table`` that reads ``text``; the page redraws its tables with each feed event (every
    second), so a cell found just before a redraw is gone when clicked: find it again."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(tries):
        try:
            driver.find_element(By.XPATH, f"//table[@id='{table}']//td[text()='{text}']").click()
            return
        except StaleElementReferenceException:
            if attempt == tries - 1:
                raise


def wait_until(driver: Any, script: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        assert time.monotonic() < deadline, f"never true: {script}"
        time.sleep(0.05)


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById({element_id!r}).textContent"))


@pytest.fixture
def admin_node(tmp_path: Path, redis_server: RedisServer) -> Any:
    node = ChildNode(tmp_path, ["--redis", redis_server.url, "--name", f"admin{time.monotonic_ns() % 10**8}",
                                "--api-key", KEY, "--public-channel", "*", "--history-size", "50"],
                     env={"SOCKDRAWER_AUTH_SECRET": SECRET})
    node.start()
    yield node
    node.stop()


def test_the_page_needs_the_key_and_sends_a_strict_policy(admin_node: ChildNode) -> None:
    """GET /admin answers the page with a Content-Security-Policy that allows only its own files and API (no
    inline script, no other origin); its feed answers 401 without the key and streams with it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_node.api_port}/admin", timeout=10) as response:
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert b'src="/admin/admin.js"' in response.read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{admin_node.api_port}/admin/stream", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"http://127.0.0.1:{admin_node.api_port}/admin/stream",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        while True:
            line = stream.readline()
            if line.startswith(b"data: "):
                state = json.loads(line[6:])
                break
    assert state["node"]["sockets"] == 0 and isinstance(state["series"], list)


def test_the_page_in_chromium(admin_node: ChildNode, chromium: Any) -> None:  # noqa: F811
    """In Chromium: without the key the page asks for it; with it, it shows this node and a socket the test
    opens (its channel among the busiest); a message published from the page reaches that socket and is then
    in the channel's history; a payload and a channel name holding HTML are shown as text and run nothing; the
    user's connections are listed; a refused handshake shows among the last warnings; "disconnect" for that
    user (confirmed) closes the socket. Screenshots go to docs/_static/admin-*.png."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    static = ROOT / "docs" / "_static"
    chromium.set_window_size(1300, 1100)
    chromium.get(f"http://127.0.0.1:{admin_node.api_port}/admin")
    wait_until(chromium, "return !document.getElementById('login').hidden")
    chromium.save_screenshot(str(static / "admin-login.png"))
    chromium.find_element(By.ID, "key").send_keys("wrong")
    chromium.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_until(chromium, "return document.getElementById('login-error').textContent.includes('refused')")
    chromium.find_element(By.ID, "key").send_keys(KEY)
    chromium.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_until(chromium, "return !document.getElementById('main').hidden")
    assert chromium.execute_script("return sessionStorage.getItem('sockdrawer-api-key')") == KEY
    assert KEY not in chromium.current_url

    token = make_token(SECRET, user="alice", channels=["*"])
    with connect(f"ws://127.0.0.1:{admin_node.ws_port}/news?token={token}") as socket, \
            connect(f"ws://127.0.0.1:{admin_node.ws_port}/{HTML_CHANNEL}") as odd:
        wait_until(chromium, "return document.querySelector('#channels tbody') && "
                             "[...document.querySelectorAll('#channels td')].some(td => td.textContent === 'news')")
        wait_until(chromium, "return [...document.querySelectorAll('#nodes td')].some(td => td.textContent === '2')")
        # a channel named with HTML is a row of text
        assert wait_until(chromium, f"return [...document.querySelectorAll('#channels td')]"
                                    f".some(td => td.textContent === {json.dumps(HTML_CHANNEL)})")
        click_cell(chromium, "channels", "news")
        wait_until(chromium, "return document.getElementById('channel-name').textContent === 'news'")
        chromium.find_element(By.ID, "message").send_keys("hello from the admin page")
        chromium.find_element(By.CSS_SELECTOR, "#publish button").click()
        assert socket.recv(timeout=10) == "hello from the admin page"
        chromium.find_element(By.ID, "message").clear()
        chromium.find_element(By.ID, "message").send_keys(XSS)
        chromium.find_element(By.CSS_SELECTOR, "#publish button").click()
        assert socket.recv(timeout=10) == XSS
        # the channel again: its history, the last message as text
        click_cell(chromium, "channels", "news")
        wait_until(chromium, f"return [...document.querySelectorAll('#history li')]"
                             f".some(li => li.textContent.endsWith({json.dumps(XSS)}))")
        chromium.find_element(By.ID, "target").send_keys("alice")
        chromium.find_element(By.ID, "find").click()
        wait_until(chromium, "return [...document.querySelectorAll('#connections td')]"
                             ".some(td => td.textContent === 'news')")
        with pytest.raises(InvalidStatus):  # a refused handshake is among the last warnings
            connect(f"ws://127.0.0.1:{admin_node.ws_port}/a//b")
        wait_until(chromium, "return [...document.querySelectorAll('#warnings li')]"
                             ".some(li => li.textContent.includes('refused a WebSocket handshake'))")
        time.sleep(1.5)  # the chart and the tables take their next feed event for the screenshot
        chromium.save_screenshot(str(static / "admin.png"))
        assert chromium.execute_script("return window.pwned") is None
        assert not chromium.find_elements(By.CSS_SELECTOR, "main img")
        chromium.find_element(By.CSS_SELECTOR, "#disconnect button[type=submit]").click()
        chromium.switch_to.alert.accept()
        wait_until(chromium, "return document.getElementById('disconnected').textContent === 'sent to every node'")
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
        odd.send("still open")
