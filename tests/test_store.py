"""The store keeps detections exactly and opens what earlier versions wrote: their OUT folders stay
valid across an upgrade."""

import sqlite3

import pytest

import numpy as np

from bccd_batch.store import SCHEMA_VERSION, Store, StoreError, pack_detections, unpack_detections

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


# The layout of store version 2: detections one row each, keyed by images.id.
SCHEMA_V2 = """
CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, started_utc TEXT NOT NULL,
    finished_utc TEXT, status TEXT NOT NULL, slides_root TEXT NOT NULL, info TEXT NOT NULL DEFAULT '{}');
CREATE TABLE images (id INTEGER PRIMARY KEY, root TEXT NOT NULL, rel TEXT NOT NULL, slide TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT, width INTEGER, height INTEGER, status TEXT NOT NULL, error TEXT,
    model_sha256 TEXT, run_id INTEGER NOT NULL, UNIQUE (root, rel));
CREATE TABLE detections (image_id INTEGER NOT NULL, cls TEXT NOT NULL, score REAL NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL);
CREATE INDEX detections_by_image ON detections (image_id);
CREATE TABLE run_images (run_id INTEGER NOT NULL, rel TEXT NOT NULL, outcome TEXT NOT NULL, PRIMARY KEY (run_id, rel));
CREATE TABLE metrics (run_id INTEGER PRIMARY KEY, json TEXT NOT NULL);
PRAGMA user_version = 2;
"""


def _v2_store(path):
    _id_keyed_store(path, SCHEMA_V2, packed=False)


# The layout of store version 3: detections packed into their image's row, no quality measures.
SCHEMA_V3 = """
CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, started_utc TEXT NOT NULL,
    finished_utc TEXT, status TEXT NOT NULL, slides_root TEXT NOT NULL, info TEXT NOT NULL DEFAULT '{}');
CREATE TABLE images (id INTEGER PRIMARY KEY, root TEXT NOT NULL, rel TEXT NOT NULL, slide TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT, width INTEGER, height INTEGER, status TEXT NOT NULL, error TEXT,
    model_sha256 TEXT, run_id INTEGER NOT NULL, detections BLOB, UNIQUE (root, rel));
CREATE TABLE run_images (run_id INTEGER NOT NULL, rel TEXT NOT NULL, outcome TEXT NOT NULL, PRIMARY KEY (run_id, rel));
CREATE TABLE metrics (run_id INTEGER PRIMARY KEY, json TEXT NOT NULL);
PRAGMA user_version = 3;
"""


def _v3_store(path):
    _id_keyed_store(path, SCHEMA_V3, packed=True)


def _v4_store(path):
    """Version 4: version 3 with each image's focus and brightness, no second-pass scale."""
    _v3_store(path)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE images ADD COLUMN focus REAL; ALTER TABLE images ADD COLUMN brightness REAL;"
                     " PRAGMA user_version = 4;")
    db.close()


def _v5_store(path):
    """Version 5: version 4 with the scale of each image's second pass, no colour cast."""
    _v4_store(path)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE images ADD COLUMN recounted_at REAL; PRAGMA user_version = 5;")
    db.close()


def _v6_store(path):
    """Version 6: version 5 with each image's background colour cast, no stain colour."""
    _v5_store(path)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE images ADD COLUMN tint_red REAL; ALTER TABLE images ADD COLUMN tint_blue REAL;"
                     " PRAGMA user_version = 6;")
    db.close()


def _v7_store(path):
    """Version 7: version 6 with each image's stain colour, not how its second pass recoloured it;
    a/1.jpg counted again for its colour cast (white-balanced, as version 7 did), b/2.jpg for its size."""
    _v6_store(path)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE images ADD COLUMN stain REAL; PRAGMA user_version = 7;"
                     " UPDATE images SET recounted_at = 1.0, tint_red = 0.31, tint_blue = -0.2 WHERE rel = 'a/1.jpg';"
                     " UPDATE images SET recounted_at = 1.6, tint_red = 0.01, tint_blue = 0.05 WHERE rel = 'b/2.jpg';")
    db.close()


def test_a_version_7_store_says_its_fields_counted_again_for_a_colour_cast_were_white_balanced(tmp_path):
    path = tmp_path / "s.sqlite"
    _v7_store(path)
    store = Store(path)
    assert [(r["rel"], r["recounted_at"], r["recoloured"]) for r in store.run_images(1, ROOT)] == [
        ("a/1.jpg", 1.0, "white balance"), ("b/2.jpg", 1.6, None), ("c/bad.jpg", None, None)]
    assert _detections(store) == EXPECTED


def _id_keyed_store(path, schema: str, packed: bool):
    """A version 2 store (detections one row each) or a version 3 one (`packed` into the image row)."""
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.execute("INSERT INTO runs VALUES (1, 'r1', 't0', 't1', 'finished', ?, '{}')", (ROOT,))
    column = ",?" if packed else ""     # version 3's detections column
    for image_id, (rel, dets) in enumerate(DETS.items(), start=7):     # ids need not start at 1
        row = (image_id, ROOT, rel, rel[0], 10, 20, "h", 640, 480) + ((pack_detections(dets),) if packed else ())
        db.execute(f"INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,'ok',NULL,'m',1{column})", row)
        if not packed:
            db.executemany("INSERT INTO detections VALUES (?,?,?,?,?,?,?)", [(image_id, *d) for d in dets])
        db.execute("INSERT INTO run_images VALUES (1, ?, 'new')", (rel,))
    db.execute(f"INSERT INTO images VALUES (3, ?, 'c/bad.jpg', 'c', 1, 2, 'h', NULL, NULL, 'error', 'empty file', NULL, 1"
               f"{column})", (ROOT,) + ((None,) if packed else ()))
    db.execute("INSERT INTO run_images VALUES (1, 'c/bad.jpg', 'failed')")
    db.commit()
    db.close()


def _f32(dets):
    """What the store keeps: float32 (the engines compute in it, so their values are kept exactly)."""
    return [(c, *np.float32(v).tolist()) for c, *v in dets]


def _detections(store):
    return [(r["rel"], *d) for r in store.run_images(1, ROOT) for d in unpack_detections(r["detections"])]


# Every image and detection, in the order the store always gave them: by image, best score first,
# then as inserted.
EXPECTED = [("a/1.jpg", *d) for d in _f32([("WBC", 0.99, 5, 5, 90, 80), ("RBC", 0.9, 1, 2, 30, 40),
                                           ("RBC", 0.9, 7, 8, 9, 10)])] + [("b/2.jpg", *_f32(DETS["b/2.jpg"])[0])]


def test_detections_pack_best_first_and_unpack_to_what_went_in():
    dets = [("RBC", 0.5, 1.25, 2, 3, 4), ("Platelets", 0.75, 0, 0, 10.5, 10), ("WBC", 0.5, 9, 9, 99, 99)]
    assert unpack_detections(pack_detections(dets)) == [dets[1], dets[0], dets[2]]
    assert unpack_detections(pack_detections([])) == [] and unpack_detections(None) == []


# v0 stores get fresh image ids in (root, rel) order; later ones keep theirs.
@pytest.mark.parametrize("old_store, ids", [(_v0_store, [1, 2, 3]), (_v2_store, [7, 8, 3]), (_v3_store, [7, 8, 3]),
                                            (_v4_store, [7, 8, 3]), (_v5_store, [7, 8, 3]), (_v6_store, [7, 8, 3])],
                         ids=["v0", "v2", "v3", "v4", "v5", "v6"])
def test_an_earlier_store_migrates_with_every_image_and_detection(tmp_path, old_store, ids):
    path = tmp_path / "s.sqlite"
    old_store(path)
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert _detections(store) == EXPECTED
    assert [(r["id"], r["rel"], r["status"], r["outcome"]) for r in store.run_images(1, ROOT)] == [
        (ids[0], "a/1.jpg", "ok", "new"), (ids[1], "b/2.jpg", "ok", "new"), (ids[2], "c/bad.jpg", "error", "failed")]
    bad = store.image(ROOT, "c/bad.jpg")
    assert bad["error"] == "empty file" and bad["detections"] is None
    # Fields measured before quality was: unmeasured, so not judged (quality.field_flags).
    assert [(r["focus"], r["brightness"]) for r in store.run_images(1, ROOT)] == [(None, None)] * 3
    assert [r["recounted_at"] for r in store.run_images(1, ROOT)] == [None] * 3     # all counted once
    assert [(r["tint_red"], r["tint_blue"], r["stain"], r["recoloured"]) for r in store.run_images(1, ROOT)] == [(None,) * 4] * 3
    old_tables = "SELECT name FROM sqlite_master WHERE name LIKE '%v0%' OR name LIKE 'detections%'"
    assert store.db.execute(old_tables).fetchall() == []
    store.close()

    store = Store(path)     # opening again changes nothing
    assert _detections(store) == EXPECTED
    # Re-recording an image keeps its id and replaces its detections.
    with store.transaction():
        store.record_images(2, ROOT, [{"rel": "a/1.jpg", "slide": "a", "size": 11, "mtime_ns": 21, "sha256": "h2",
                                       "width": 640, "height": 480, "model_sha256": "m2",
                                       "detections": pack_detections([("RBC", 0.5, 0, 0, 9, 9)]),
                                       "focus": 21.5, "brightness": 182.25, "recounted_at": 1.8,
                                       "tint_red": 0.31, "tint_blue": -0.2, "stain": 0.18, "recoloured": "PBC"}])
    again = store.image(ROOT, "a/1.jpg")
    assert again["id"] == ids[0] and again["sha256"] == "h2"
    assert (again["focus"], again["brightness"], again["recounted_at"]) == (21.5, 182.25, 1.8)
    assert (again["tint_red"], again["tint_blue"], again["stain"], again["recoloured"]) == (0.31, -0.2, 0.18, "PBC")
    assert unpack_detections(again["detections"]) == [("RBC", 0.5, 0, 0, 9, 9)]
    assert [(r["rel"], r["outcome"]) for r in store.run_images(2, ROOT)] == [("a/1.jpg", "new")]
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


def test_a_file_that_is_no_database_is_refused_untouched(tmp_path):
    path = tmp_path / "s.sqlite"
    junk = bytes(range(256)) * 16
    path.write_bytes(junk)
    with pytest.raises(StoreError, match=r"s\.sqlite is not a bccd-batch store \(file is not a database\)"):
        Store(path)
    assert path.read_bytes() == junk and sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]
