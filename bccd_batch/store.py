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
    root TEXT NOT NULL,                 -- resolved slides root
    rel TEXT NOT NULL,                  -- path relative to it, POSIX
    slide TEXT NOT NULL,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    width INTEGER, height INTEGER,
    status TEXT NOT NULL,               -- ok | error
    error TEXT,
    model_sha256 TEXT,                  -- detections below came from this model
    run_id INTEGER NOT NULL,            -- the run that last processed it
    PRIMARY KEY (root, rel)
);
CREATE TABLE IF NOT EXISTS detections (
    root TEXT NOT NULL, rel TEXT NOT NULL,
    cls TEXT NOT NULL, score REAL NOT NULL,
    x0 REAL NOT NULL, y0 REAL NOT NULL, x1 REAL NOT NULL, y1 REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_image ON detections (root, rel);
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


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

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
        self.db.execute("DELETE FROM detections WHERE root=? AND rel=?", (root, rel))
        self.db.execute(
            "INSERT OR REPLACE INTO images (root, rel, slide, size, mtime_ns, sha256, width, height, status, error,"
            " model_sha256, run_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (root, rel, slide, size, mtime_ns, sha256, width, height, "error" if error else "ok", error,
             model_sha256, run_id))
        self.db.executemany("INSERT INTO detections (root, rel, cls, score, x0, y0, x1, y1) VALUES (?,?,?,?,?,?,?,?)",
                            [(root, rel, *d) for d in detections])
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
        yield from self.db.execute("SELECT * FROM detections WHERE root=? ORDER BY rel, score DESC, rowid", (root,))

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
