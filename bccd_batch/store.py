"""The persistent store: one SQLite file per results root, the source of truth for every output.

Each processed batch is one transaction, so a crash or a kill loses at most the batch in flight and
never leaves half an image's detections behind. WAL lets the report read while a run writes.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path
from typing import Iterable

import numpy as np

from .cells import CLASSES
from .quality import MAX_TINT_BLUE, MAX_TINT_RED, MIN_TINT_BLUE, MIN_TINT_RED, WHITE_BALANCE

STORE_NAME = "bccd-batch.sqlite"   # OUT/<this>: one store per results root

# PRAGMA user_version. 0: detections one row each, keyed by (root, rel); 2: one row each, keyed by
# images.id; 3: packed into their image's row; 4: each image's focus and brightness (quality.py);
# 5: the scale a field off the training magnification was counted again at (quality.recount_scale);
# 6: each image's background colour cast (quality.py's tint_red, tint_blue); 7: its stain's colour
# (quality.py's stain); 8: how its second pass recoloured it (quality.SecondPass.recoloured).
SCHEMA_VERSION = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,          -- the run folder's name under OUT/runs
    started_utc TEXT NOT NULL,
    finished_utc TEXT,
    status TEXT NOT NULL,               -- running | finished | interrupted | failed
    slides_root TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}'     -- run.json's provenance, as JSON
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    root TEXT NOT NULL,                 -- resolved slides root
    rel TEXT NOT NULL,                  -- path relative to it, POSIX
    slide TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER,
    status TEXT NOT NULL,               -- ok | error
    error TEXT,
    model_sha256 TEXT,                  -- detections below came from this model
    run_id INTEGER NOT NULL,            -- the run that last processed it
    detections BLOB,                    -- DETECTION_DTYPE records, best first (NULL when status is error)
    focus REAL, brightness REAL,        -- quality.py's measures (NULL: error, or stored before version 4)
    recounted_at REAL,                  -- the scale of its second pass (NULL: counted once)
    tint_red REAL, tint_blue REAL,      -- quality.py's colour cast (NULL: error, or stored before version 6)
    stain REAL,                         -- quality.py's stain colour (NULL: error, or stored before version 7)
    recoloured TEXT,                    -- its second pass's recolouring: 'white balance' or a lab's name (NULL: none)
    UNIQUE (root, rel)
);
CREATE TABLE IF NOT EXISTS run_images (
    run_id INTEGER NOT NULL, rel TEXT NOT NULL,
    outcome TEXT NOT NULL,              -- new | skipped | failed
    PRIMARY KEY (run_id, rel)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER PRIMARY KEY,
    json TEXT NOT NULL
);
"""

# A field's detections, packed into one value of its image row: with a row per detection (~25 per
# field) SQLite steps, and releases and retakes the GIL, 25 times more per field; the single writer
# stored 9,200 fields/s that way against 23,100 packed (2-core machine, 32-field transactions).
# The CSVs carry them one per line for anyone who wants rows.
DETECTION_DTYPE = np.dtype([("cls", "u1"), ("score", "<f4"), ("box", "<f4", (4,))])   # cls: index in CLASSES


def pack_detections(dets: Iterable[tuple]) -> bytes:
    """(class name, score, x0, y0, x1, y1) tuples -> the stored bytes, best score first (ties keep
    their order). float32 holds what the engines compute exactly."""
    dets = list(dets)
    a = np.empty(len(dets), DETECTION_DTYPE)
    if dets:
        a["cls"] = [CLASSES.index(d[0]) for d in dets]
        a["score"] = [d[1] for d in dets]
        a["box"] = [d[2:6] for d in dets]
        a = a[np.argsort(-a["score"], kind="stable")]
    return a.tobytes()


def unpack_detections(blob: bytes | None) -> list[tuple]:
    """The stored bytes -> (class name, score, x0, y0, x1, y1) tuples of Python floats."""
    a = np.frombuffer(blob or b"", DETECTION_DTYPE)
    return [(CLASSES[c], s, *box) for c, s, box in zip(a["cls"].tolist(), a["score"].tolist(), a["box"].tolist())]


# Version 0 -> 3 (OUT folders written before the integer image key): copy the images into the new
# table; _pack_detection_rows then packs their detections, in their original order.
MIGRATE_FROM_0 = """
ALTER TABLE images RENAME TO images_v0;
ALTER TABLE detections RENAME TO detections_v0;
{schema}
INSERT INTO images (root, rel, slide, size, mtime_ns, sha256, width, height, status, error, model_sha256, run_id)
    SELECT root, rel, slide, size, mtime_ns, sha256, width, height, status, error, model_sha256, run_id
    FROM images_v0 ORDER BY root, rel;
"""
DETECTIONS_FROM_0 = """SELECT i.id, d.cls, d.score, d.x0, d.y0, d.x1, d.y1
    FROM detections_v0 d JOIN images i ON i.root = d.root AND i.rel = d.rel ORDER BY i.id, d.rowid"""
# Version 2 -> 3: the image rows stay (and their ids); their detections move into them.
MIGRATE_FROM_2 = "ALTER TABLE images ADD COLUMN detections BLOB"
DETECTIONS_FROM_2 = "SELECT image_id, cls, score, x0, y0, x1, y1 FROM detections ORDER BY image_id, rowid"
# Versions 2 and 3 -> 4: images measured before stay unmeasured (NULL) until processed again.
MIGRATE_FROM_3 = "ALTER TABLE images ADD COLUMN focus REAL; ALTER TABLE images ADD COLUMN brightness REAL"
# Versions up to 4 -> 5: every stored field was counted once.
MIGRATE_FROM_4 = "ALTER TABLE images ADD COLUMN recounted_at REAL"
# Versions up to 5 -> 6: fields measured before stay without a colour cast (NULL) until processed again.
MIGRATE_FROM_5 = "ALTER TABLE images ADD COLUMN tint_red REAL; ALTER TABLE images ADD COLUMN tint_blue REAL"
# Versions up to 6 -> 7: likewise without a stain colour.
MIGRATE_FROM_6 = "ALTER TABLE images ADD COLUMN stain REAL"
# Versions up to 7 -> 8: a field counted again with its colour cast off the labs' range was white-balanced.
MIGRATE_FROM_7 = (f"ALTER TABLE images ADD COLUMN recoloured TEXT; UPDATE images SET recoloured = '{WHITE_BALANCE}' "
                  f"WHERE recounted_at IS NOT NULL AND NOT (tint_red BETWEEN {MIN_TINT_RED} AND {MAX_TINT_RED} "
                  f"AND tint_blue BETWEEN {MIN_TINT_BLUE} AND {MAX_TINT_BLUE})")
# An image row's measures (NULL where unmeasured): quality.py's, and its second pass's scale and recolouring.
MEASURES = ("focus", "brightness", "recounted_at", "tint_red", "tint_blue", "stain", "recoloured")


class StoreError(sqlite3.DatabaseError):
    """A store this version cannot use (not a database, or written by a newer version); the message says which."""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            # Ours, or a lock, a full disk, an I/O error: the file's content is not in question.
            if isinstance(e, (StoreError, sqlite3.OperationalError)):
                raise
            raise StoreError(f"{self.path} is not a bccd-batch store ({e}); it is left as it is: move it aside "
                             "to start a new store, or use another --out") from e

    def _migrate(self) -> None:
        """Bring a store written by any earlier version to SCHEMA_VERSION (one transaction: a
        crash mid-way leaves the old layout, which the next open migrates again)."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return      # nothing to write: opening for reading never waits on a running writer
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer bccd-batch (store version {version});"
                                 " use that version or another --out")
            columns = {r["name"] for r in self.db.execute("PRAGMA table_info(detections)")}
            if "rel" in columns:
                self._run_script(MIGRATE_FROM_0.format(schema=SCHEMA))
                self._pack_detection_rows(DETECTIONS_FROM_0, "detections_v0", "images_v0")
            elif "image_id" in columns:
                self._run_script(MIGRATE_FROM_2)
                self._pack_detection_rows(DETECTIONS_FROM_2, "detections")
            else:
                self._run_script(SCHEMA)    # a new store; a version 3 one keeps its tables
            columns = {r["name"] for r in self.db.execute("PRAGMA table_info(images)")}
            if "focus" not in columns:
                self._run_script(MIGRATE_FROM_3)
            if "recounted_at" not in columns:
                self._run_script(MIGRATE_FROM_4)
            if "tint_red" not in columns:
                self._run_script(MIGRATE_FROM_5)
            if "stain" not in columns:
                self._run_script(MIGRATE_FROM_6)
            if "recoloured" not in columns:
                self._run_script(MIGRATE_FROM_7)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _run_script(self, script: str) -> None:
        for statement in script.split(";"):
            self.db.execute(statement)

    def _pack_detection_rows(self, query: str, *drop: str) -> None:
        """Pack the one-row-per-detection layout (`query`: image id, cls, score, box, in stored order)
        into the image rows, then drop the old tables."""
        self.db.execute("UPDATE images SET detections = x'' WHERE status = 'ok'")
        rows = self.db.execute(query).fetchall()
        self.db.executemany("UPDATE images SET detections=? WHERE id=?", [
            (pack_detections(tuple(r)[1:] for r in dets), image_id)
            for image_id, dets in itertools.groupby(rows, key=lambda r: r[0])])
        for table in drop:
            self.db.execute(f"DROP TABLE {table}")

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        return _Transaction(self.db)

    # runs -----------------------------------------------------------------------------------
    def abandon_stale_runs(self) -> int:
        """Runs still 'running' while we hold OUT's lock died without finishing (SIGKILL, power loss)."""
        return self.db.execute("UPDATE runs SET status='aborted' WHERE status='running'").rowcount

    def begin_run(self, name: str, started_utc: str, slides_root: str) -> int:
        cur = self.db.execute("INSERT INTO runs (name, started_utc, status, slides_root) VALUES (?, ?, 'running', ?)",
                              (name, started_utc, slides_root))
        return cur.lastrowid

    def finish_run(self, run_id: int, status: str, finished_utc: str, info: dict) -> None:
        self.db.execute("UPDATE runs SET status=?, finished_utc=?, info=? WHERE id=?",
                        (status, finished_utc, json.dumps(info), run_id))

    def run(self, run_id: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()

    def run_by_name(self, name: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM runs WHERE name=?", (name,)).fetchone()

    def runs(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM runs ORDER BY id DESC").fetchall()

    # images ---------------------------------------------------------------------------------
    def image(self, root: str, rel: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM images WHERE root=? AND rel=?", (root, rel)).fetchone()

    def images_under(self, root: str) -> list[sqlite3.Row]:
        """Every image known under a slides root: what a run compares the files it finds against."""
        return self.db.execute("SELECT * FROM images WHERE root=?", (root,)).fetchall()

    def record_images(self, run_id: int, root: str, images: list[dict]) -> None:
        """Replace everything known about each image and mark it new (failed when it has an
        `error`); call inside a transaction. Keys: rel, slide, size, mtime_ns, sha256, and either
        width, height, model_sha256, detections (`pack_detections` bytes) and `MEASURES`, or error."""
        required = ("slide", "size", "mtime_ns", "sha256")
        # Every column an image row has past (root, rel); the upsert replaces them all.
        columns = (*required, "width", "height", "status", "error", "model_sha256", "run_id", "detections", *MEASURES)
        rows = [(root, m["rel"], *(m[k] for k in required), m.get("width"), m.get("height"), "error" if m.get("error") else "ok",
                 m.get("error"), m.get("model_sha256"), run_id, None if m.get("error") else m["detections"],
                 *(m.get(k) for k in MEASURES))
                for m in images]
        self.db.executemany(
            f"INSERT INTO images (root, rel, {', '.join(columns)}) VALUES ({', '.join('?' * (len(columns) + 2))})"
            f" ON CONFLICT (root, rel) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in columns)}", rows)
        self.mark(run_id, [(m["rel"], "failed" if m.get("error") else "new") for m in images])

    def mark(self, run_id: int, outcomes: Iterable[tuple[str, str]]) -> None:
        """(rel, outcome) for each image this run covered."""
        self.db.executemany("INSERT OR REPLACE INTO run_images (run_id, rel, outcome) VALUES (?,?,?)",
                            [(run_id, rel, outcome) for rel, outcome in outcomes])

    def covered(self, run_id: int) -> int:
        """How many images a run covered (processed, skipped or failed)."""
        return self.db.execute("SELECT COUNT(*) FROM run_images WHERE run_id=?", (run_id,)).fetchone()[0]

    def outcomes(self, run_id: int) -> dict[str, int]:
        rows = self.db.execute("SELECT outcome, COUNT(*) AS n FROM run_images WHERE run_id=? GROUP BY outcome", (run_id,))
        return {r["outcome"]: r["n"] for r in rows}

    def run_images(self, run_id: int, root: str) -> list[sqlite3.Row]:
        """The images a run covered (processed, skipped or failed), in path order, each row with its
        outcome and its packed detections (`unpack_detections`)."""
        return self.db.execute(
            "SELECT i.*, r.outcome FROM run_images r JOIN images i ON i.root=? AND i.rel=r.rel"
            " WHERE r.run_id=? ORDER BY i.rel", (root, run_id)).fetchall()

    # metrics --------------------------------------------------------------------------------
    def save_metrics(self, run_id: int, metrics: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO metrics (run_id, json) VALUES (?, ?)", (run_id, json.dumps(metrics)))

    def metrics(self, run_id: int) -> dict | None:
        row = self.db.execute("SELECT json FROM metrics WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row["json"]) if row else None


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
