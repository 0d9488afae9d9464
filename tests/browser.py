"""Headless Chromium for the browser tests: Debian's chromium driven by Playwright.

With CI=true a missing browser fails the test; elsewhere it skips, with the reason.
Requests to anything but the local machine are aborted, so a page that reaches for the
network cannot slow a test down or leak from it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(f"browser test skipped: {reason} (install Debian's chromium and fonts-dejavu-core)")


@contextlib.contextmanager
def chromium_page(*, width: int = 1280, height: int = 900):
    """A fresh profile and page; yields (page, console messages as (type, text))."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    profile = tempfile.mkdtemp(prefix="bnexport-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                viewport={"width": width, "height": height},
            )
            try:
                context.route("**/*", _local_only)
                page = context.new_page()
                console: list[tuple[str, str]] = []
                page.on("console", lambda message: console.append((message.type, message.text)))
                page.on("pageerror", lambda error: console.append(("pageerror", str(error))))
                yield page, console
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _local_only(route):
    url = route.request.url
    if url.startswith(("file://", "http://127.0.0.1", "data:", "blob:")):
        route.continue_()
    else:
        route.abort()
