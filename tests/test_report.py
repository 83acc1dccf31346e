"""The HTML report: escaping, self-containment, and a real headless Chromium loading it."""

import csv
import json
import os
import re
import shutil
import sqlite3

import numpy as np
import pytest

from conftest import MODEL, bccd_image, cli

# Debian's /usr/bin/chromium is a shell launcher whose /etc/chromium.d/dev-shm snippet prints
# "[: ...: unexpected operator" where findmnt reports /dev/shm twice: start the browser binary itself.
CHROMIUM = next((c for c in ("/usr/lib/chromium/chromium",) if os.access(c, os.X_OK)), None) \
    or shutil.which("chromium") or shutil.which("chromium-browser")
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
    # Its labels name only the WBC of BloodImage_00000 and one RBC of BloodImage_00001.
    assert "labels may omit RBC" in html and "labels may omit WBC" in html
    index = (hostile_run / "index.html").read_text()
    assert "report.html" in index


def test_report_describes_the_model_that_ran(hostile_run):
    run = json.loads((hostile_run / "latest" / "run.json").read_text())
    card = json.loads((MODEL / "model.json").read_text())
    assert run["model"]["backbone"] == card["architecture"]["backbone"]
    html = (hostile_run / "latest" / "report.html").read_text()
    assert f"({card['architecture']['backbone']} FPN, fields resized to a {card['architecture']['test_min_size']}-pixel" in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs Debian's chromium)")
def test_report_in_headless_chromium(hostile_run, empty_night, tmp_path):
    from playwright.sync_api import sync_playwright

    report = (hostile_run / "latest" / "report.html").resolve()
    with open(hostile_run / "latest" / "slides.csv", newline="") as f:
        slides_csv = {r["slide"]: r for r in csv.DictReader(f)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
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
        uncertain = "() => [...document.querySelectorAll('rect.u')].filter(e => getComputedStyle(e).display !== 'none').length"
        assert page.evaluate(uncertain) == 0   # hidden until asked for
        page.click("input[data-toggle=uncertain]")
        assert page.evaluate(uncertain) > 0

        page.click("#slides-table th:nth-child(2)")   # sorting must not lose rows
        assert len(page.query_selector_all("#slides-table tbody tr")) == len(rows)

        # The header's cells (a long slides path among them) never overlap, from a laptop to a wide screen.
        boxes = "() => [...document.querySelectorAll('#summary > div')].map(d => { const r = d.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"
        for width in (1000, 1400, 1600):
            page.set_viewport_size({"width": width, "height": 900})
            cells = page.evaluate(boxes)
            assert len(cells) >= 8
            for i, a in enumerate(cells):
                for b in cells[i + 1:]:
                    assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (width, a, b)

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)

        # index.html after one run draws that run's point in each trend (not an empty box)...
        page.goto((hostile_run / "index.html").resolve().as_uri())
        dots = "() => [...document.querySelectorAll('svg.chart')].map(s => s.querySelectorAll('circle').length)"
        assert page.evaluate(dots) == [1, 1]
        # ...and after a night without any image file, shows that status apart, with nothing to plot.
        page.goto((empty_night[0] / "index.html").resolve().as_uri())
        status = page.locator("#runs tbody tr td:nth-child(2)")
        assert status.inner_text() == "no_images" and status.evaluate("e => getComputedStyle(e).color") == "rgb(160, 0, 26)"
        assert page.evaluate(dots) == [0, 0] and problems == []
        browser.close()
    from PIL import Image, ImageStat

    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.stddev[0] > 10, "screenshot is blank"


def test_fields_without_labels_come_flagged_then_most_uncertain_first(tmp_path, slides):
    """A nightly run has no labels: the gallery (and its 40 large views) must lead with the fields
    whose counts are least sure: a blank field (no cells to count), then the most detections just
    under the count threshold."""
    from PIL import Image

    Image.new("RGB", (640, 480), (236, 230, 240)).save(slides / "slide-B" / "blank.jpg")
    out = tmp_path / "out"
    cli("run", slides, "--out", out, "--device", "cpu", check_rc=0, env={"BCCD_BATCH_PLATELET_FACTOR": "15000"})
    run = out / "latest"
    with open(run / "counts.csv", newline="") as f:
        counts = {r["image"]: r for r in csv.DictReader(f)}
    assert counts["slide-B/blank.jpg"]["RBC"] == "0"
    # The lab configured a platelet factor only: a platelet estimate per slide, no WBC estimate.
    with open(run / "slides.csv", newline="") as f:
        per_slide = list(csv.DictReader(f))
    for s in per_slide:
        assert float(s["Platelets_estimate"]) == round(float(s["Platelets_per_field"]) * 15000, 1) and s["WBC_estimate"] == ""
    report = (run / "report.html").read_text()
    assert ">Platelets estimate</th>" in report and "WBC estimate" not in report and "Platelets × 15000.0" in report
    # A run stored before estimates existed (no estimate_factors in its info) still renders, without them.
    db = sqlite3.connect(out / "bccd-batch.sqlite")
    info = json.loads(db.execute("SELECT info FROM runs").fetchone()[0])
    del info["estimate_factors"]
    db.execute("UPDATE runs SET info=?", (json.dumps(info),))
    db.commit()
    db.close()
    cli("report", "--out", out, check_rc=0)
    assert "Platelets estimate" not in (run / "report.html").read_text()
    # A blank field has no edges at all, no stained cells and is brighter than any BCCD field; the others pass.
    assert counts["slide-B/blank.jpg"]["flags"] == "blurred;too bright;few cells;faint stain"
    assert {r["flags"] for rel, r in counts.items() if rel != "slide-B/blank.jpg"} == {""}
    threshold = json.loads((run / "run.json").read_text())["model"]["thresholds"]["count"]
    near = {}
    with open(run / "detections.csv", newline="") as f:
        for r in csv.DictReader(f):
            near.setdefault(r["image"], 0)
            cut = threshold[r["class"]] if isinstance(threshold, dict) else threshold   # one per class, or one for all
            near[r["image"]] += 0.5 * cut <= float(r["score"]) < cut
    html = (run / "report.html").read_text()
    near.setdefault("slide-B/blank.jpg", 0)   # it may have no detection at all
    cards = re.findall(r'<div class="card" id="card-img\d+">\s*<div class="name">([^<]+)</div>', html)
    assert cards[0] == "slide-B/blank.jpg" and "Flagged fields (blurred" in html and "without labels" not in html
    assert re.search(r'blank.jpg</div>.*?<span class="flag" title="0 RBC counted[^"]*">few cells</span>', html, re.S)
    assert cards[1:] == sorted((r for r in near if r != cards[0]), key=lambda rel: (-near[rel], rel))
    assert cards[1:] != sorted(cards[1:])   # these five fields' uncertain counts are not in name order
    assert 'title="1 field(s) blurred, badly exposed, with too few cells to count' in html   # slide-B's
    assert html.count("field(s) blurred, badly exposed") == 1   # ...and none for slide-A
    for rel in cards:
        assert re.search(rf'{re.escape(rel)}</div>.*?uncertain {near[rel]}</div>', html, re.S)
    # ...and draws them, marked apart (each field twice: its card and its large view).
    assert len(re.findall(r'<rect class="c-\w+ u"', html)) == 2 * sum(near.values())


def test_slide_flags_name_their_reason():
    from bccd_batch.report import slide_flags

    healthy = {"fields": 5, "unreadable": 0, "RBC": 60, "WBC": 5, "Platelets": 6, "RBC_per_field": 12.0}
    assert slide_flags(healthy, 0.41) == []
    bad = {**healthy, "unreadable": 2, "WBC": 0, "RBC_per_field": 1.5}
    names = [f for f, _ in slide_flags(bad, 1.2, flagged_fields=1)]
    assert names == ["unreadable fields", "flagged fields", "no WBC", "few cells", "low confidence"]


def test_metrics_equal_direct_pycocotools_on_detections_csv(tmp_path, bccd):
    """metrics.json must agree with an independent pycocotools evaluation of detections.csv."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from bccd_batch.labels import read_labels

    names = (bccd / "ImageSets/Main/val.txt").read_text().split()[:6]
    slides = tmp_path / "val"
    slide_of = {n: "slide-1" if i < 4 else "slide-2" for i, n in enumerate(names)}
    for n in names:
        (slides / slide_of[n]).mkdir(parents=True, exist_ok=True)
        shutil.copy(bccd_image(n), slides / slide_of[n] / f"{n}.jpg")
    out = tmp_path / "out"
    cli("run", slides, "--out", out, "--device", "cpu", "--labels", bccd, check_rc=0)
    metrics = json.loads((out / "latest" / "metrics.json").read_text())
    assert metrics["n_images_scored"] == 6

    labels = read_labels(bccd)
    cats = {"RBC": 1, "WBC": 2, "Platelets": 3}
    images, anns = [], []
    for i, n in enumerate(names, start=1):
        rec = labels.records[f"{n}.jpg"]
        images.append({"id": i, "file_name": f"{n}.jpg", "width": rec["width"], "height": rec["height"]})
        for c, x0, y0, x1, y1 in rec["boxes"]:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats[c], "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    ids = {f"{slide_of[im['file_name'][:-4]]}/{im['file_name']}": im["id"] for im in images}
    with open(out / "latest" / "detections.csv", newline="") as f:
        dets = [{"image_id": ids[r["image"]], "category_id": cats[r["class"]], "score": float(r["score"]),
                 "bbox": [float(r["xmin"]), float(r["ymin"]), float(r["xmax"]) - float(r["xmin"]),
                          float(r["ymax"]) - float(r["ymin"])]} for r in csv.DictReader(f)]

    def coco_stats(image_ids):
        gt = COCO()
        gt.dataset = {"images": [im for im in images if im["id"] in image_ids],
                      "annotations": [a for a in anns if a["image_id"] in image_ids],
                      "categories": [{"id": v, "name": k} for k, v in cats.items()]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes([d for d in dets if d["image_id"] in image_ids]), "bbox")
            ev.evaluate(); ev.accumulate(); ev.summarize()
        return ev.stats

    stats = coco_stats(set(ids.values()))
    assert metrics["coco"]["stats"]["AP"] == pytest.approx(stats[0], abs=1e-9)
    assert metrics["coco"]["stats"]["AP50"] == pytest.approx(stats[1], abs=1e-9)
    assert metrics["coco"]["stats"]["AP"] > 0.4   # the embedded model is real, not a placeholder
    # Per slide folder: the same pycocotools figures on that slide's fields alone, and its count errors.
    assert sorted(metrics["per_slide"]) == ["slide-1", "slide-2"]
    with open(out / "latest" / "counts.csv", newline="") as f:
        counted = {r["image"]: r for r in csv.DictReader(f)}
    for slide, m in metrics["per_slide"].items():
        mine = {i for rel, i in ids.items() if rel.startswith(slide + "/")}
        assert m["n_images"] == len(mine) and (m["AP"], m["AP50"]) == pytest.approx(tuple(coco_stats(mine)[:2]), abs=1e-9)
        errors = [int(counted[rel]["RBC"]) - sum(b[0] == "RBC" for b in labels.records[rel.split("/")[1]]["boxes"])
                  for rel in ids if rel.startswith(slide + "/")]
        assert m["per_class"]["RBC"]["MAE"] == pytest.approx(np.abs(errors).mean())
        assert m["per_class"]["RBC"]["bias"] == pytest.approx(np.mean(errors))
    # `run --labels` adds 95% intervals over the fields (bootstrap, default 200 resamples) to the
    # metrics and the report (their arithmetic: test_score.py).
    ci = metrics["coco"]["intervals"]
    assert ci["resamples"] == 200 and ci["AP"][0] <= ci["AP"][1] and ci["AP50"][0] <= ci["AP50"][1]
    html = (out / "latest" / "report.html").read_text()
    assert 'id="intervals"' in html and f"AP {ci['AP'][0]:.3f}–{ci['AP'][1]:.3f}" in html
    assert 'id="slide-metrics"' in html and f"<td>{metrics['per_slide']['slide-2']['AP']:.3f}</td>" in html
    # The precision-recall chart has its axes' values and a legend with each class's AP50.
    assert '<text x="220" y="216" text-anchor="middle">1</text>' in html and '>precision</text>' in html
    assert f">RBC {metrics['coco']['per_class']['RBC']['AP50']:.3f}</text>" in html
    assert "WBC per 1000 RBC*" in html and "taken without regard to WBCs" in html    # the ratio's caveat
    assert "estimate" not in html.split('id="slides-table"')[1].split("</table>")[0]    # no factors configured, no estimates
    # Every field is labelled: the gallery says nothing about ordering fields without labels.
    assert "without labels" not in html and "most disagreement first" in html
    # ...ordered by it: a missed or misclassified labelled cell weighs four unmatched detections.
    per_image = metrics["matching"]["per_image"]
    cards = re.findall(r'<div class="card" id="card-img\d+">\s*<div class="name">([^<]+)</div>', html)
    disagreement = [per_image[c]["FN"] + per_image[c]["FP"] / 4 for c in cards]
    assert sorted(cards) == sorted(per_image) and disagreement == sorted(disagreement, reverse=True)


def test_index_trends_plot_each_run_that_has_the_number_below_their_label():
    from bccd_batch.report import _trend

    one = _trend([{"x": 4.0}], "x", "images/s")
    assert one["dots"] == [(300.0, 35.0)] and one["peak"] == 4.0      # a single run is a dot, not an empty box
    three = _trend([{"x": 2.0}, {"x": None}, {"x": 4.0}], "x", "images/s")
    assert [d[0] for d in three["dots"]] == [20.0, 580.0]                # the run without the number is left out
    assert three["points"] == "20.0,72.5 580.0,35.0" and all(y >= 30 for _, y in three["dots"])
    assert _trend([{"x": None}], "x", "images/s")["dots"] == []


def test_counts_off_complete_labels_suggest_calibrating(tmp_path, bccd):
    # Ten PBC fields whose labels each leave one RBC out: the model counts ~+1 RBC per field against them.
    txl = bccd.parent / "txl_pbc"
    pbc = [r["file"] for r in csv.DictReader(open(txl / "sources.csv", newline="")) if r["source"] == "PBC"][:10]
    rbc = (txl / "classes.txt").read_text().split().index("RBC")
    slides, lab = tmp_path / "slides" / "pbc", tmp_path / "lab"
    slides.mkdir(parents=True)
    (lab / "labels").mkdir(parents=True)
    shutil.copy(txl / "classes.txt", lab / "classes.txt")
    for name in pbc:
        shutil.copy(txl / "images" / name, slides / name)
        lines = (txl / "labels" / name.replace(".png", ".txt")).read_text().splitlines()
        first = next(i for i, line in enumerate(lines) if line.split()[0] == str(rbc))
        (lab / "labels" / name.replace(".png", ".txt")).write_text("\n".join(lines[:first] + lines[first + 1:]) + "\n")
    os.symlink(slides, lab / "images")
    out = tmp_path / "out"
    cli("run", slides.parent, "--out", out, "--device", "cpu", "--labels", lab, "--bootstrap", "0", check_rc=0)
    metrics = json.loads((out / "latest" / "metrics.json").read_text())
    html = (out / "latest" / "report.html").read_text()
    assert metrics["counting"]["per_class"]["RBC"]["mean_signed_error"] >= 0.5
    hint = re.search(r'<p class="note" id="calibrate-hint">(.*?)</p>', html, re.S)
    assert hint and "RBC" in hint.group(1) and "bccd-batch calibrate" in hint.group(1), html[-3000:]

    from bccd_batch.report import calibration_hint
    assert calibration_hint(metrics, {"fields": {"pbc/x.png": ["RBC"]}}) == {}     # labels that leave a class out
    assert calibration_hint({**metrics, "n_images_scored": 9}, None) == {}        # too few fields to fit to
