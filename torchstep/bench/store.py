"""Results store: one SQLite database per output directory (stdlib ``sqlite3``, WAL).

A trial is written by the process that ran it, in one transaction (``trials`` row + its ``metrics``
rows), keyed by a deterministic ``trial_id`` hashed from the resolved configuration.  A finished trial is
therefore durable the moment it commits — whatever happens to the sweep's main process — and
``INSERT OR IGNORE`` on the primary key makes a re-run never duplicate it.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY, task TEXT NOT NULL, arm TEXT NOT NULL, lr REAL NOT NULL, seed INTEGER NOT NULL,
    steps INTEGER NOT NULL, phase TEXT NOT NULL, config TEXT NOT NULL, env TEXT NOT NULL,
    init_val REAL, final_val REAL, diverged INTEGER NOT NULL, cpu_s REAL, wall_s REAL, opt_cpu_s REAL,
    state_bytes INTEGER, final_metrics TEXT, finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id TEXT NOT NULL REFERENCES trials(trial_id), step INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL, cpu_s REAL, wall_s REAL, PRIMARY KEY (trial_id, step, name)
);
CREATE INDEX IF NOT EXISTS trials_task_arm ON trials(task, arm);
"""


def trial_id(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]


def connect(path: str | Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=60)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA busy_timeout=60000")
    con.executescript(SCHEMA)
    return con


def write_trial(path: str | Path, row: dict[str, Any], curve: Iterable[tuple]) -> bool:
    """Insert one finished trial atomically; returns False if it was already there."""
    with closing(connect(path)) as con, con:
        cur = con.execute(
            "INSERT OR IGNORE INTO trials VALUES (:trial_id, :task, :arm, :lr, :seed, :steps, :phase, :config,"
            " :env, :init_val, :final_val, :diverged, :cpu_s, :wall_s, :opt_cpu_s, :state_bytes,"
            " :final_metrics, :finished)", row)
        if cur.rowcount == 0:
            return False
        con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                        [(row["trial_id"], *point) for point in curve])
    return True


def finished_ids(path: str | Path) -> set[str]:
    with closing(connect(path)) as con:
        return {r[0] for r in con.execute("SELECT trial_id FROM trials")}


def trials(path: str | Path) -> list[dict[str, Any]]:
    with closing(connect(path)) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM trials ORDER BY task, arm, lr, seed")]


def curves(path: str | Path, name: str = "val") -> dict[str, list[tuple[int, float, float]]]:
    """trial_id → [(step, value, cpu_s)] for one metric name."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    with closing(connect(path)) as con:
        for tid, step, value, cpu in con.execute(
                "SELECT trial_id, step, value, cpu_s FROM metrics WHERE name = ? ORDER BY trial_id, step", (name,)):
            out.setdefault(tid, []).append((step, value, cpu))
    return out
