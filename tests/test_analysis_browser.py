"""The report opens in a real headless browser (Debian's chromium) with no broken image or link."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from critbatch.analysis.synthetic import GroupSpec, write_sweep
from critbatch.jobs.cli import main
from critbatch.jobs.store import LocalStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# Runs after the page and its images have loaded; writes the count of images that failed to decode.
_PROBE = """<script>
window.addEventListener("load", function () {
  var bad = [], imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad.push(i);
  }
  var p = document.createElement("pre");
  p.id = "probe";
  p.textContent = "images=" + imgs.length + ";broken=" + bad.join(",") + ";";
  document.body.appendChild(p);
});
</script>"""


def _browse(page: Path, profile: Path) -> str:
    """The DOM chromium holds after loading ``page`` (and running its scripts)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _probe(html: str, page: Path, profile: Path) -> tuple[int, str]:
    page.write_text(html.replace("</body>", _PROBE + "</body>"))
    found = re.search(r"images=(\d+);broken=([0-9,]*);", _browse(page, profile))
    assert found, "the probe did not run"
    return int(found.group(1)), found.group(2)


@pytest.mark.slow
def test_report_opens_in_chromium_without_broken_images_or_links(tmp_path, capsys):
    root = tmp_path / "store"
    store = LocalStore(root)
    groups = [GroupSpec(strategy="blr"), GroupSpec(strategy="lsr")]
    write_sweep(store, "sw", batch_sizes=[16, 32, 64, 128, 256], seeds=[0, 1], groups=groups, epochs=1)
    assert main(["analyze", "--store", str(root), "--sweep", "sw", "--bootstrap", "50"]) == 0
    report = root / "sw" / "report"
    html = (report / "index.html").read_text()

    # The page as the reader gets it: chromium parses it and every link resolves to a file beside it.
    dom = _browse(report / "index.html", tmp_path / "profile")
    links = re.findall(r'href="([^"]+)"', dom)
    assert links and all((report / href).is_file() for href in links)

    # Every image decodes (a copy of the page with a probe script, in the same folder).
    count, broken = _probe(html, report / "probe.html", tmp_path / "profile")
    assert count >= 7 and broken == ""

    # The probe catches a broken image (so a pass above means something).
    damaged = html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1)
    count2, broken2 = _probe(damaged, report / "probe.html", tmp_path / "profile")
    assert count2 == count and broken2 == "0"
