"""The store opens what earlier versions wrote: their OUT folders stay valid across an upgrade."""

import sqlite3

import pytest

from bccd_batch.store import SCHEMA_VERSION, Store

# The layout bccd-batch wrote before store version 2 (user_version 0): detections keyed by the
# image's (root, rel) text.
SCHEMA_V0 = """
CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, started_utc TEXT NOT NULL,
    finished_utc TEXT, status TEXT NOT NULL, slides_root TEXT NOT NULL, info TEXT NOT NULL DEFAULT '{}');
CREATE TABLE images (root TEXT NOT NULL, rel TEXT NOT NULL, slide TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    sha256 TEXT, width INTEGER, height INTEGER, status TEXT NOT NULL, error TEXT, model_sha256 TEXT,
    run_id INTEGER NOT NULL, PRIMARY KEY (root, rel));
CREATE TABLE detections (root TEXT NOT NULL, rel TEXT NOT NULL, cls TEXT NOT NULL, score REAL NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL);
CREATE INDEX detections_image ON detections (root, rel);
CREATE TABLE run_images (run_id INTEGER NOT NULL, rel TEXT NOT NULL, outcome TEXT NOT NULL, PRIMARY KEY (run_id, rel));
CREATE TABLE metrics (run_id INTEGER PRIMARY KEY, json TEXT NOT NULL);
"""

ROOT = "/slides"
DETS = {"a/1.jpg": [("RBC", 0.9, 1, 2, 30, 40), ("WBC", 0.99, 5, 5, 90, 80), ("RBC", 0.9, 7, 8, 9, 10)],
        "b/2.jpg": [("Platelets", 0.7, 3, 3, 20, 20)]}


def _v0_store(path):
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V0)
    db.execute("INSERT INTO runs VALUES (1, 'r1', 't0', 't1', 'finished', ?, '{}')", (ROOT,))
    for rel, dets in DETS.items():
        db.execute("INSERT INTO images VALUES (?,?,?,?,?,?,?,?,'ok',NULL,'m',1)", (ROOT, rel, rel[0], 10, 20, "h", 640, 480))
        db.executemany("INSERT INTO detections VALUES (?,?,?,?,?,?,?,?)", [(ROOT, rel, *d) for d in dets])
        db.execute("INSERT INTO run_images VALUES (1, ?, 'new')", (rel,))
    db.execute("INSERT INTO images VALUES (?, 'c/bad.jpg', 'c', 1, 2, 'h', NULL, NULL, 'error', 'empty file', NULL, 1)", (ROOT,))
    db.execute("INSERT INTO run_images VALUES (1, 'c/bad.jpg', 'failed')")
    db.commit()
    db.close()


def _detections(store):
    return [(d["rel"], d["cls"], d["score"], d["x0"], d["y0"], d["x1"], d["y1"]) for d in store.detections(ROOT)]


def test_a_version_0_store_migrates_with_every_image_and_detection(tmp_path):
    path = tmp_path / "s.sqlite"
    _v0_store(path)
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # Same rows, in the order the store always gave them: by image, best score first, then as inserted.
    assert _detections(store) == [("a/1.jpg", "WBC", 0.99, 5, 5, 90, 80), ("a/1.jpg", "RBC", 0.9, 1, 2, 30, 40),
                                  ("a/1.jpg", "RBC", 0.9, 7, 8, 9, 10), ("b/2.jpg", "Platelets", 0.7, 3, 3, 20, 20)]
    assert [(r["rel"], r["status"], r["outcome"]) for r in store.run_images(1, ROOT)] == [
        ("a/1.jpg", "ok", "new"), ("b/2.jpg", "ok", "new"), ("c/bad.jpg", "error", "failed")]
    assert store.image(ROOT, "c/bad.jpg")["error"] == "empty file"
    assert {r["name"] for r in store.db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%v0%'")} == set()
    store.close()

    store = Store(path)     # opening again changes nothing
    assert len(_detections(store)) == 4
    # Re-recording an image keeps its id and replaces (not adds to) its detections.
    image_id = store.image(ROOT, "a/1.jpg")["id"]
    with store.transaction():
        store.record_image(2, ROOT, "a/1.jpg", "a", size=11, mtime_ns=21, sha256="h2", width=640, height=480,
                           model_sha256="m2", detections=[("RBC", 0.5, 0, 0, 9, 9)])
    assert store.image(ROOT, "a/1.jpg")["id"] == image_id and store.image(ROOT, "a/1.jpg")["sha256"] == "h2"
    assert _detections(store)[0] == ("a/1.jpg", "RBC", 0.5, 0, 0, 9, 9) and len(_detections(store)) == 2
    store.close()


def test_a_store_from_a_newer_version_is_refused_untouched(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer bccd-batch"):
        Store(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
