"""The HTML report: escaping, self-containment, and a real headless Chromium loading it."""

import csv
import re
import shutil

import pytest

from conftest import bccd_image, cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE_FILE = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_SLIDE = "<script>alert(2)</script>"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, bccd):
    root = tmp_path_factory.mktemp("r")
    slides = root / "slides"
    (slides / HOSTILE_SLIDE).mkdir(parents=True)
    (slides / "plain").mkdir()
    shutil.copy(bccd_image("BloodImage_00000"), slides / HOSTILE_SLIDE / HOSTILE_FILE)
    shutil.copy(bccd_image("BloodImage_00001"), slides / "plain" / "f1.jpg")
    (slides / "plain" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"])
        w.writerow([f"{HOSTILE_SLIDE}/{HOSTILE_FILE}", 640, 480, "WBC", 260, 177, 491, 376])
        w.writerow(["plain/f1.jpg", 640, 480, "RBC", 68, 315, 286, 480])
        w.writerow(["plain/f1.jpg", 640, 480, "<b onmouseover=alert(3)>", 1, 1, 20, 20])
    out = root / "out"
    cli("run", slides, "--out", out, "--device", "cpu", "--labels", labels, check_rc=3)
    return out


def test_report_is_self_contained_and_escapes_names(hostile_run):
    html = (hostile_run / "latest" / "report.html").read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "onerror=alert(1)" in html and "<img src=x onerror" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in html
    assert "<script>alert(2)" not in html and "&lt;script&gt;alert(2)&lt;/script&gt;" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    assert "plain/broken.png" in html   # the errors section lists it
    index = (hostile_run / "index.html").read_text()
    assert "report.html" in index


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs Debian's chromium)")
def test_report_in_headless_chromium(hostile_run, tmp_path):
    from playwright.sync_api import sync_playwright

    report = (hostile_run / "latest" / "report.html").resolve()
    with open(hostile_run / "latest" / "slides.csv", newline="") as f:
        slides_csv = {r["slide"]: r for r in csv.DictReader(f)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems, requests = [], []
        page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        assert problems == []
        assert all(u.startswith(("data:", "file:")) for u in requests), requests

        rows = page.eval_on_selector_all("#slides-table tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent.trim()))")
        assert {r[0] for r in rows} == set(slides_csv)
        for r in rows:
            s = slides_csv[r[0]]
            assert r[1:9] == [s["fields"], s["unreadable"], s["RBC"], s["WBC"], s["Platelets"],
                              s["RBC_per_field"], s["WBC_per_field"], s["Platelets_per_field"]]

        visible = "() => [...document.querySelectorAll('rect.c-RBC')].filter(e => getComputedStyle(e).display !== 'none').length"
        assert page.evaluate(visible) > 0
        page.click("input[data-toggle=RBC]")
        assert page.evaluate(visible) == 0
        page.click("input[data-toggle=RBC]")
        assert page.evaluate(visible) > 0

        page.click("#slides-table th:nth-child(2)")   # sorting must not lose rows
        assert len(page.query_selector_all("#slides-table tbody tr")) == len(rows)

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    from PIL import Image, ImageStat

    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.stddev[0] > 10, "screenshot is blank"


def test_slide_flags_name_their_reason():
    from bccd_batch.report import slide_flags

    healthy = {"fields": 5, "unreadable": 0, "RBC": 60, "WBC": 5, "Platelets": 6, "RBC_per_field": 12.0}
    assert slide_flags(healthy, 0.41) == []
    bad = {**healthy, "unreadable": 2, "WBC": 0, "RBC_per_field": 1.5}
    names = [f for f, _ in slide_flags(bad, 1.2)]
    assert names == ["unreadable fields", "no WBC", "few cells", "low confidence"]
