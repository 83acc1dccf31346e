"""The persistent store: one SQLite file per results root, the source of truth for every output.

Each processed batch is one transaction, so a crash or a kill loses at most the batch in flight and
never leaves half an image's detections behind. WAL lets the report read while a run writes.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

STORE_NAME = "bccd-batch.sqlite"   # OUT/<this>: one store per results root

SCHEMA_VERSION = 2   # PRAGMA user_version; 0 is the first layout (detections keyed by root, rel)

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
    id INTEGER PRIMARY KEY,             -- stable for the image's life: detections point here
    root TEXT NOT NULL,                 -- resolved slides root
    rel TEXT NOT NULL,                  -- path relative to it, POSIX
    slide TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER,
    status TEXT NOT NULL,               -- ok | error
    error TEXT,
    model_sha256 TEXT,                  -- detections below came from this model
    run_id INTEGER NOT NULL,            -- the run that last processed it
    UNIQUE (root, rel)
);
-- Keyed by the image's integer id, not its (root, rel) text: SQLite alone inserts the ~25 rows of a
-- field about twice as fast so (2-core machine: 7,300-7,750 fields/s against 3,300-3,600).
CREATE TABLE IF NOT EXISTS detections (
    image_id INTEGER NOT NULL,          -- images.id
    cls TEXT NOT NULL, score REAL NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_by_image ON detections (image_id);
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

# Version 0 -> 2 (OUT folders written before the integer image key): copy images and detections
# into the new tables, detections in their original order, in one transaction with the rest.
MIGRATE_FROM_0 = """
ALTER TABLE images RENAME TO images_v0;
ALTER TABLE detections RENAME TO detections_v0;
{schema}
INSERT INTO images (root, rel, slide, size, mtime_ns, sha256, width, height, status, error, model_sha256, run_id)
    SELECT root, rel, slide, size, mtime_ns, sha256, width, height, status, error, model_sha256, run_id
    FROM images_v0 ORDER BY root, rel;
INSERT INTO detections (image_id, cls, score, x0, y0, x1, y1)
    SELECT i.id, d.cls, d.score, d.x0, d.y0, d.x1, d.y1
    FROM detections_v0 d JOIN images i ON i.root = d.root AND i.rel = d.rel ORDER BY d.rowid;
DROP TABLE detections_v0;
DROP TABLE images_v0;
"""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        """Bring a store written by any earlier version to SCHEMA_VERSION (one transaction: a
        crash mid-way leaves the old layout, which the next open migrates again)."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return      # nothing to write: opening for reading never waits on a running writer
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{self.path} was written by a newer bccd-batch (store version {version})")
            columns = {r["name"] for r in self.db.execute("PRAGMA table_info(detections)")}
            for statement in (MIGRATE_FROM_0.format(schema=SCHEMA) if "rel" in columns else SCHEMA).split(";"):
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    def record_image(self, run_id: int, root: str, rel: str, slide: str, *, size, mtime_ns, sha256,
                     width=None, height=None, error: str | None = None, model_sha256: str | None = None,
                     detections: Iterable[tuple] = ()) -> None:
        """Replace everything known about one image; call inside a transaction."""
        image_id = self.db.execute(
            "INSERT INTO images (root, rel, slide, size, mtime_ns, sha256, width, height, status, error,"
            " model_sha256, run_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (root, rel) DO UPDATE SET slide=excluded.slide, size=excluded.size,"
            " mtime_ns=excluded.mtime_ns, sha256=excluded.sha256, width=excluded.width, height=excluded.height,"
            " status=excluded.status, error=excluded.error, model_sha256=excluded.model_sha256,"
            " run_id=excluded.run_id RETURNING id",
            (root, rel, slide, size, mtime_ns, sha256, width, height, "error" if error else "ok", error,
             model_sha256, run_id)).fetchone()[0]
        self.db.execute("DELETE FROM detections WHERE image_id=?", (image_id,))
        self.db.executemany("INSERT INTO detections (image_id, cls, score, x0, y0, x1, y1) VALUES (?,?,?,?,?,?,?)",
                            [(image_id, *d) for d in detections])
        self.mark(run_id, rel, "failed" if error else "new")

    def mark(self, run_id: int, rel: str, outcome: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO run_images (run_id, rel, outcome) VALUES (?,?,?)", (run_id, rel, outcome))

    def outcomes(self, run_id: int) -> dict[str, int]:
        rows = self.db.execute("SELECT outcome, COUNT(*) AS n FROM run_images WHERE run_id=? GROUP BY outcome", (run_id,))
        return {r["outcome"]: r["n"] for r in rows}

    def run_images(self, run_id: int, root: str) -> list[sqlite3.Row]:
        """The images a run covered (processed, skipped or failed), in path order."""
        return self.db.execute(
            "SELECT i.*, r.outcome FROM run_images r JOIN images i ON i.root=? AND i.rel=r.rel"
            " WHERE r.run_id=? ORDER BY i.rel", (root, run_id)).fetchall()

    def detections(self, root: str) -> Iterator[sqlite3.Row]:
        yield from self.db.execute(
            "SELECT i.rel, d.* FROM detections d JOIN images i ON i.id = d.image_id WHERE i.root=?"
            " ORDER BY i.rel, d.score DESC, d.rowid", (root,))

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
