"""A real browser for the report tests: headless Chromium, the Debian package (`make browser` installs it).

`chromium()` returns its path. Without it the test FAILS when the CI env var is set or under `make test`
(which sets KVQA_REQUIRE_BROWSER=1), and is skipped elsewhere with the reason and how to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const broken = [];
  for (const im of document.images) {
    if (!im.complete || im.naturalWidth === 0) broken.push(im.getAttribute('src'));
  }
  document.body.setAttribute('data-kvqa-images', String(document.images.length));
  document.body.setAttribute('data-kvqa-broken', JSON.stringify(broken));
});
</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-extensions", "--allow-file-access-from-files"]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    why = ("headless Chromium not found (the Debian package `chromium`; `make browser` installs it with apt, "
           "or set CHROMIUM=/path/to/chromium)")
    if os.environ.get("CI") or os.environ.get("KVQA_REQUIRE_BROWSER"):
        pytest.fail(why + ": required when CI or KVQA_REQUIRE_BROWSER (make test) is set")
    pytest.skip(why)


def broken_images(page: Path, timeout: float = 120) -> tuple[int, list[str]]:
    """(images on the page, the src of every one that did not load) as Chromium sees `page` from disk.

    The page is copied beside itself with a script that marks broken images after the load event (so
    relative paths resolve the same), and Chromium prints the DOM once the page has loaded.
    """
    probe = page.with_name(f".probe-{page.name}")
    text = page.read_text()
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>") if "</body>" in text else text + CHECK_SCRIPT)
    try:
        dom = subprocess.run([chromium(), *FLAGS, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=timeout).stdout
    finally:
        probe.unlink(missing_ok=True)
    images = re.search(r'data-kvqa-images="(\d+)"', dom)
    broken = re.search(r'data-kvqa-broken="([^"]*)"', dom)
    assert images and broken, f"the check script did not run in Chromium; DOM starts: {dom[:300]!r}"
    return int(images.group(1)), json.loads(broken.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, size: str = "1200,3000", timeout: float = 120) -> Path:
    subprocess.run([chromium(), *FLAGS, f"--window-size={size}", f"--screenshot={out}", page.as_uri()],
                   capture_output=True, timeout=timeout)
    assert out.is_file(), f"Chromium wrote no screenshot of {page}"
    return out


def is_blank(png: Path) -> bool:
    """True when the screenshot is (nearly) one colour: nothing rendered."""
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        grey = im.convert("L")
        return max(ImageStat.Stat(grey).stddev) < 2 or len(grey.getcolors(256 * 256) or []) < 8
