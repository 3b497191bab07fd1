"""The live page in a real browser: headless Chromium driven by Selenium through the local
chromedriver (Debian's ``chromium`` and ``chromium-driver``; nothing is downloaded), against
``recsys-agent run --demo`` as a newcomer starts it."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from agent.app import Agent
from tests.builders import Client, catalog, make_settings
from tests.processes import start_agent, stop

pytestmark = pytest.mark.slow

INSTALL = (
    "the live page's test needs Chromium and its driver: apt-get install chromium chromium-driver"
    " (Debian; .ci/run installs them), or RECSYS_CHROMIUM / RECSYS_CHROMEDRIVER naming them"
)


def _binary(variable: str, *names: str) -> str | None:
    if os.environ.get(variable):
        return os.environ[variable]
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    return None


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    chromium = _binary("RECSYS_CHROMIUM", "chromium", "chromium-browser")
    driver_path = _binary("RECSYS_CHROMEDRIVER", "chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(f"{INSTALL} (missing: {'chromium' if chromium is None else 'chromedriver'})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the live page's test needs selenium (the dev extra): pip install 'selenium>=4.20,<5'")
    # Selenium Manager must not look for a driver or a browser on the network
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _drive(driver: object, url: str) -> dict[str, object]:
    """Click through the page as a visitor would; what it saw."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)

    def ids(selector: str) -> list[str]:
        # read in one go: the page replaces these elements at every push
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.dataset.itemId)"
        return list(driver.execute_script(script, selector))

    def recommended() -> list[str]:
        return ids("#recommendations [data-item-id]")

    def cards() -> list[str]:
        return ids("#catalog .card")

    def search(words: str) -> None:
        box = driver.find_element(By.ID, "search")
        box.clear()
        box.send_keys(words)
        script = "return [...document.querySelectorAll('#catalog .card')].map(e => e.textContent.toLowerCase())"
        wait.until(lambda d: (texts := d.execute_script(script)) and all(words in text for text in texts))

    def act(item_id: str, action: str) -> None:
        selector = f'#catalog .card[data-item-id="{item_id}"] button[data-action="{action}"]'
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True)

    driver.get(url + "/")
    wait.until(lambda d: d.find_element(By.ID, "connection").get_attribute("data-state") == "open")
    wait.until(lambda _: len(cards()) == 300)
    wait.until(lambda d: "waiting" not in d.find_element(By.ID, "latency").text)
    first = recommended()

    search("coffee")
    coffee = cards()[:3]
    for item in coffee:
        act(item, "like")
    # read once none of the liked items is offered back (a push may reflect the first likes
    # before the last; a list that keeps offering one times the wait out)
    wait.until(lambda _: (now := recommended()) != first and len(now) >= 5 and not set(coffee) & set(now))
    # the push that reflects the last click: its latency is shown
    wait.until(lambda d: "event → push" in d.find_element(By.ID, "latency").text)
    after_coffee = recommended()

    search("tent")
    tents = cards()[:3]
    for item in tents:
        act(item, "purchase")
    # a push may reflect the first purchases before the last: the panel is read once none of
    # the bought tents is offered (the check that what was bought is not offered back: a list
    # that keeps offering one times the wait out)
    wait.until(
        lambda _: (
            (now := recommended()) != after_coffee
            and any(i.startswith("camping-") for i in now)
            and not set(tents) & set(now)
        )
    )
    after_camping = recommended()
    wait.until(lambda d: d.find_element(By.ID, "op-sockets").text == "1")
    wait.until(lambda d: d.find_element(By.ID, "events").text.count("\n") >= 5)
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return {
        "first": first,
        "coffee": coffee,
        "after_coffee": after_coffee,
        "tents": tents,
        "after_camping": after_camping,
        "latency": driver.find_element(By.ID, "latency").text,
        "resources": resources,
        "console": driver.get_log("browser"),
    }


async def test_clicking_items_changes_the_recommendations_panel(tmp_path: Path, browser: object) -> None:
    process, _, http_url = await start_agent(
        "--demo",
        "--data-dir",
        str(tmp_path / "demo"),
        "--nats-port",
        "0",
        "--http-port",
        "0",
        env={"RECSYS_LOAD_ENTRY_POINTS": "false"},
        # the demo embeds its 300 items before the banner
        ready_timeout_s=300,
    )
    try:
        seen = await asyncio.to_thread(_drive, browser, http_url)
    finally:
        await stop(process)
    coffee_recs = [i for i in seen["after_coffee"] if i.startswith("coffee-")]  # type: ignore[union-attr]
    assert len(coffee_recs) >= 3, f"liking coffee brings coffee: {seen['after_coffee']}"
    assert "ms" in str(seen["latency"])
    # everything the page loaded came from the agent itself
    assert all(str(name).startswith(http_url) for name in seen["resources"]), seen["resources"]  # type: ignore[union-attr]
    severe = [entry for entry in seen["console"] if entry["level"] == "SEVERE"]  # type: ignore[union-attr,index]
    assert severe == [], severe


def _drive_with_token(driver: object, url: str, token: str) -> dict[str, object]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    script = "return [...document.querySelectorAll(arguments[0])].map(e => e.dataset.itemId)"

    def recommended() -> list[str]:
        return list(driver.execute_script(script, "#recommendations [data-item-id]"))

    driver.get(f"{url}/?token={token}")
    wait.until(lambda d: d.find_element(By.ID, "connection").get_attribute("data-state") == "open")
    wait.until(lambda _: len(driver.execute_script(script, "#catalog .card")) == 30)
    wait.until(lambda _: recommended())
    first = recommended()
    selector = f'#catalog .card[data-item-id="{first[0]}"] button[data-action="like"]'
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True)
    wait.until(lambda _: recommended() != first)
    return {
        "first": first,
        "after": recommended(),
        "address": driver.current_url,
        "user": driver.find_element(By.ID, "user-name").text,
        "demo_hidden": driver.find_element(By.ID, "demo-user").is_displayed() is False,
    }


async def test_outside_the_demo_the_page_works_with_a_user_token_alone(
    nats_url: str, tmp_path: Path, browser: object
) -> None:
    key = "key-one-0123456789abcdef"
    settings = make_settings(nats_url, tmp_path, disabled_plugins="content", api_keys=key)
    nc = await nats.connect(nats_url)
    client = Client(nc, settings)
    try:
        async with Agent(settings) as agent:
            await client.upsert(catalog(30))
            await client.wait_for(lambda: agent.pipeline.catalog.active_count() == 30)
            for i in range(5):
                await client.publish_event(
                    {"id": f"c{i}", "type": "view", "user_id": f"crowd-{i}", "item_id": "item-1"}
                )
            async with aiohttp.ClientSession(agent.http_url) as http:
                answer = await http.post(
                    "/v1/tokens", json={"user_id": "reader@example.com"}, headers={"Authorization": f"Bearer {key}"}
                )
                token = (await answer.json())["token"]
                # the page's own files and the socket need no key; the rest of the API still does
                assert (await http.get("/v1/users/x/recommendations")).status == 401
            seen = await asyncio.to_thread(_drive_with_token, browser, agent.http_url, token)
    finally:
        await nc.drain()
    assert seen["first"][0] == "item-1" and "item-1" not in seen["after"]  # type: ignore[index,operator]
    assert seen["user"] == "reader@example.com" and seen["demo_hidden"] is True
    assert "token=" not in str(seen["address"]), "the page takes the token out of the address bar"
