"""Per-lineage scan state, kept between runs in SQLite inside certbot's work directory.

A row is tied to the exact certificate file it describes (real path, inode, size, mtime):
when a lineage's certificate changes, whoever changed it (us or stock certbot), the row's
certificate facts and ARI state are dropped and rebuilt. A corrupt database is moved aside
and rebuilt; the state is a cache, never the source of truth.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import os
import sqlite3
import time
from typing import Any, Iterable, NamedTuple, Optional

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: How long to wait for another process's lock on the database before running without it.
LOCK_TIMEOUT = 5.0


# slots: a warm run holds one of these per lineage (50,000 and more); without a __dict__
# each costs a fifth of the memory.
@dataclasses.dataclass(slots=True)
class LineageState:
    name: str
    conf_path: str = ""
    conf_sig: str = ""          # "mtime_ns:size" of the renewal conf
    cert_sig: str = ""          # "realpath:ino:size:mtime_ns" of the cert file
    #: the directories holding the live/ links and their archive files, with their inode
    #: and mtime when the links were last found consistent ("" = check them again)
    links_sig: str = ""
    # From the renewal conf.
    server: Optional[str] = None
    authenticator: Optional[str] = None
    installer: Optional[str] = None
    autorenew: bool = True
    renew_before_expiry: Optional[str] = None
    cert_path: Optional[str] = None
    chain_path: Optional[str] = None
    privkey_path: Optional[str] = None
    fullchain_path: Optional[str] = None
    # From the certificate.
    serial: Optional[str] = None
    names: str = ""             # space separated
    not_before: Optional[float] = None
    not_after: Optional[float] = None
    ari_cert_id: Optional[str] = None
    ocsp_url: Optional[str] = None
    # ARI / OCSP state.
    window_start: Optional[float] = None
    window_end: Optional[float] = None
    chosen_time: Optional[float] = None
    next_check: Optional[float] = None
    ocsp_status: Optional[str] = None
    ocsp_next: Optional[float] = None
    failures: int = 0
    last_error: Optional[str] = None
    # Outcome of the last scan.
    due: bool = False
    reason: str = ""
    last_scan: Optional[float] = None
    last_renewed: Optional[float] = None
    # Renewal attempts that failed (validation, order, finalization), for the backoff.
    renew_failures: int = 0
    renew_failing_since: Optional[float] = None
    renew_last_error: Optional[str] = None
    renew_next_attempt: Optional[float] = None
    renew_fail_conf_sig: Optional[str] = None
    #: ACME server that issued the current certificate (a fallback CA, or the lineage's own)
    issued_by: Optional[str] = None

    def reset_cert_facts(self) -> None:
        """The certificate changed: everything learned about the old one is void."""
        for f in ("serial", "not_before", "not_after", "ari_cert_id", "ocsp_url",
                  "window_start", "window_end", "chosen_time", "next_check",
                  "ocsp_status", "ocsp_next", "last_error"):
            setattr(self, f, None)
        self.names = ""
        self.failures = 0


_FIELDS = [f.name for f in dataclasses.fields(LineageState)]
_BOOL_FIELDS = {"autorenew", "due"}
# Every field is a scalar: a flat attrgetter, not dataclasses.astuple (which deep-copies each
# value and took 2 of the 3.7 s of a warm 50,000-lineage run).
_ROW = operator.attrgetter(*_FIELDS)
_BOOL_INDEXES = tuple(i for i, f in enumerate(_FIELDS) if f in _BOOL_FIELDS)
_INT_INDEXES = tuple(i for i, f in enumerate(_FIELDS) if f in ("failures", "renew_failures"))
_TEXT_INDEXES = tuple(i for i, f in enumerate(_FIELDS)
                      if f in ("names", "conf_path", "conf_sig", "cert_sig", "links_sig",
                               "reason"))
#: Columns whose values repeat across lineages: one copy each in memory.
_SHARED_INDEXES = tuple(i for i, f in enumerate(_FIELDS)
                        if f in ("server", "authenticator", "installer", "renew_before_expiry",
                                 "ocsp_url", "ocsp_status", "reason", "issued_by",
                                 "last_error"))


_LINK_INDEXES = tuple((_FIELDS.index(f"{k}_path"), k) for k in ("chain", "privkey", "fullchain"))


def link_path(state: LineageState, kind: str) -> Optional[str]:
    """The lineage's ``kind`` link ("cert", "chain", "privkey", "fullchain"): "" in a warm
    scan's state means certbot's own layout, next to cert.pem."""
    value: Optional[str] = getattr(state, f"{kind}_path")
    if value == "" and state.cert_path:
        return os.path.join(os.path.dirname(state.cert_path), f"{kind}.pem")
    return value


def link_paths(state: LineageState) -> tuple[Optional[str], ...]:
    """cert, privkey, chain, fullchain (certbot's order of checks)."""
    return (state.cert_path, link_path(state, "privkey"), link_path(state, "chain"),
            link_path(state, "fullchain"))


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _column(name: str) -> str:
    if name == "name":
        return "name TEXT PRIMARY KEY"
    if name in _BOOL_FIELDS or name in ("failures", "renew_failures"):
        return f"{name} INTEGER"
    if name in ("not_before", "not_after", "window_start", "window_end", "chosen_time",
                "next_check", "ocsp_next", "last_scan", "last_renewed", "renew_failing_since",
                "renew_next_attempt"):
        return f"{name} REAL"
    return f"{name} TEXT"


def _ddl() -> str:
    return f"CREATE TABLE IF NOT EXISTS lineage ({', '.join(_column(f) for f in _FIELDS)})"


#: The runs of the renewal engine (the cadence of timer runs is learned from them).
RUNS_DDL = ("CREATE TABLE IF NOT EXISTS runs (started REAL NOT NULL, trigger TEXT NOT NULL, "
            "lineages INTEGER, due INTEGER, renewed INTEGER, interval REAL)")
#: Runs kept (the cadence needs a dozen; the rest is history for people).
RUNS_KEPT = 500


class RunRecord(NamedTuple):
    started: float
    trigger: str
    lineages: int
    due: int
    renewed: Optional[int]
    interval: Optional[float]


def _kind(exc: BaseException) -> str:
    """"busy" (another process holds a lock), "denied" (permissions, read-only), or
    "corrupt" (anything else sqlite calls a database error)."""
    text = str(exc).lower()
    if isinstance(exc, PermissionError) or "readonly" in text or "read-only" in text \
            or "unable to open" in text or "permission" in text:
        return "denied"
    if "locked" in text or "busy" in text:
        return "busy"
    if isinstance(exc, OSError):
        return "denied"
    return "corrupt"


class StateDB:
    """The state database. It is a cache, never a reason to fail: busy (locked by another
    process) or unusable (permissions), the run goes on with an in-memory database (a cold
    scan, one warning); only a corrupt file is moved aside and rebuilt. Writes that fail
    later in the run are dropped with one warning."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.rebuilt_reason: Optional[str] = None
        #: why the run goes without the on-disk database, or None
        self.unavailable: Optional[str] = None
        self._write_warned = False
        self.conn = self._open()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            uri = f"file:{self.path}?mode=ro"
            return sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT,
                                   check_same_thread=False)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(LOCK_TIMEOUT * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _memory(self, why: str) -> sqlite3.Connection:
        self.unavailable = why
        logger.warning("certbot-batch: the state database %s is %s; this run goes without "
                       "it (every lineage is checked as on a first run). Nothing else "
                       "changes.", self.path, why)
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._init_schema(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            return self._connect()
        conn: Optional[sqlite3.Connection] = None
        try:
            conn = self._connect()
            self._init_schema(conn)
            return conn
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            kind = _kind(exc)
            if kind == "busy":
                return self._memory(f"locked by another process ({exc})")
            if kind == "denied":
                return self._memory(f"not usable ({exc})")
            try:
                return self._rebuild(f"unreadable ({exc})")
            except (sqlite3.Error, OSError) as again:
                return self._memory(f"unreadable and could not be rebuilt ({again})")

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and row[0] != str(SCHEMA_VERSION):
            conn.execute("DROP TABLE IF EXISTS lineage")
        conn.execute(_ddl())
        cols = {r[1] for r in conn.execute("PRAGMA table_info(lineage)")}
        for name in _FIELDS:
            # A column a newer release added: added in place, the cached state is kept.
            if name not in cols:
                conn.execute(f"ALTER TABLE lineage ADD COLUMN {_column(name)}")
        conn.execute(RUNS_DDL)
        if "interval" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}:
            conn.execute("ALTER TABLE runs ADD COLUMN interval REAL")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        row = conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")
        conn.commit()

    def _rebuild(self, why: str) -> sqlite3.Connection:
        aside = f"{self.path}.corrupt-{int(time.time())}"
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except FileNotFoundError:
                pass
        logger.warning("certbot-batch: state database %s was %s; moved it to %s and rebuilt "
                       "it. Nothing is lost: the next checks repopulate it.",
                       self.path, why, aside)
        self.rebuilt_reason = why
        conn = self._connect()
        self._init_schema(conn)
        return conn

    def _write_failed(self, exc: BaseException) -> None:
        if not self._write_warned:
            self._write_warned = True
            logger.warning("certbot-batch: could not write the state database %s (%s); "
                           "the run goes on without saving its state there.", self.path, exc)

    def _select_all(self, for_scan: bool) -> sqlite3.Cursor:
        if self.readonly:
            # `status` on a database an older release wrote: the columns it has, the
            # defaults for the others.
            have = {r[1] for r in self.conn.execute("PRAGMA table_info(lineage)")}
            defaults = {f.name: f.default for f in dataclasses.fields(LineageState)}
            cols = [f if f in have else _sql_literal(defaults[f]) for f in _FIELDS]
        else:
            cols = list(_FIELDS)
        # NULLs of the text and count columns replaced in SQL, not per row in Python.
        for i in _TEXT_INDEXES:
            cols[i] = f"IFNULL({cols[i]}, '')"
        for i in _INT_INDEXES:
            cols[i] = f"IFNULL({cols[i]}, 0)"
        if for_scan:
            # The scan sets conf_path from the file it reads: no second copy of each path.
            cols[_FIELDS.index("conf_path")] = "''"
            # certbot's own layout (chain.pem & co. next to cert.pem): "" in memory, the path
            # derived where it is needed (link_path()); three paths less per lineage.
            for kind in ("chain", "privkey", "fullchain"):
                col = f"{kind}_path"
                cols[_FIELDS.index(col)] = (
                    f"CASE WHEN cert_path LIKE '%/cert.pem' AND {col} = "
                    f"substr(cert_path, 1, length(cert_path) - 8) || '{kind}.pem' "
                    f"THEN '' ELSE {col} END")
        # A cursor, not fetchall(): rows become states one at a time (peak memory).
        return self.conn.execute(f"SELECT {', '.join(cols)} FROM lineage")

    def load_all(self, for_scan: bool = False) -> dict[str, LineageState]:
        """Every row, as states. ``for_scan``: the scan's load (conf_path left empty)."""
        try:
            return self._states(self._select_all(for_scan))
        except sqlite3.Error as exc:
            if self.readonly:
                raise
            kind = _kind(exc)
            if kind == "corrupt":
                try:
                    self.conn = self._rebuild(f"unreadable ({exc})")
                except (sqlite3.Error, OSError) as again:
                    self.conn = self._memory(f"unreadable ({again})")
            else:
                self.conn.close()
                self.conn = self._memory(f"locked by another process ({exc})"
                                         if kind == "busy" else f"not usable ({exc})")
            return {}

    def _states(self, rows: Iterable[tuple[Any, ...]]) -> dict[str, LineageState]:
        # Positional construction and one shared copy of each repeated string (server URL,
        # plugins, OCSP URL, reasons): a warm run builds one state per lineage from here.
        out: dict[str, LineageState] = {}
        shared: dict[Any, Any] = {}
        intern = shared.setdefault
        make = LineageState
        bools, common = _BOOL_INDEXES, _SHARED_INDEXES
        for row in rows:
            values = list(row)
            for i in bools:
                values[i] = bool(values[i])
            for i in common:
                value = values[i]
                if value is not None:
                    values[i] = intern(value, value)
            out[values[0]] = make(*values)
        return out

    def save(self, states: Iterable[LineageState]) -> None:
        rows = []
        for s in states:
            row = list(_ROW(s))
            for i in _BOOL_INDEXES:
                row[i] = int(row[i])
            for i, kind in _LINK_INDEXES:
                if row[i] == "":
                    row[i] = link_path(s, kind)
            rows.append(row)
        if not rows:
            return
        sql = (f"INSERT OR REPLACE INTO lineage ({', '.join(_FIELDS)}) "
               f"VALUES ({', '.join('?' for _ in _FIELDS)})")
        self._write(sql, rows)

    def touch(self, when: float, names: Optional[Iterable[str]] = None) -> None:
        """``last_scan`` of every row (``names`` None: a full scan) in one statement: a warm
        run rewrites only the rows whose facts changed (:meth:`save`)."""
        if names is None:
            self._write("UPDATE lineage SET last_scan=?", [(when,)])
        else:
            self._write("UPDATE lineage SET last_scan=? WHERE name=?",
                        [(when, n) for n in names])

    def _write(self, sql: str, rows: list[Any]) -> None:
        try:
            with self.conn:
                self.conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            self._write_failed(exc)

    def delete_missing(self, present: set[str]) -> None:
        """Forget lineages that were deleted (full scans only)."""
        try:
            names = [r[0] for r in self.conn.execute("SELECT name FROM lineage")]
        except sqlite3.Error as exc:
            self._write_failed(exc)
            return
        gone = [(n,) for n in names if n not in present]
        if gone:
            self._write("DELETE FROM lineage WHERE name=?", gone)

    # -- runs ----------------------------------------------------------------------------
    def record_run(self, started: float, trigger: str, lineages: int, due: int,
                   interval: Optional[float] = None) -> Optional[int]:
        """Note that a run started (its scan is done); returns its id for :meth:`finish_run`.
        ``interval``: the time to the next run it expected."""
        try:
            with self.conn:
                cur = self.conn.execute(
                    "INSERT INTO runs (started, trigger, lineages, due, interval) "
                    "VALUES (?, ?, ?, ?, ?)", (started, trigger, lineages, due, interval))
                self.conn.execute(
                    "DELETE FROM runs WHERE rowid <= (SELECT MAX(rowid) FROM runs) - ?",
                    (RUNS_KEPT,))
                return cur.lastrowid
        except sqlite3.Error as exc:
            self._write_failed(exc)
            return None

    def finish_run(self, run_id: Optional[int], renewed: int) -> None:
        if run_id is not None:
            self._write("UPDATE runs SET renewed=? WHERE rowid=?", [(renewed, run_id)])

    def run_starts(self, trigger: str, limit: int = 50) -> list[float]:
        """Start times of the most recent runs of that trigger, oldest first."""
        try:
            rows = self.conn.execute(
                "SELECT started FROM runs WHERE trigger=? ORDER BY rowid DESC LIMIT ?",
                (trigger, limit)).fetchall()
        except sqlite3.Error:
            return []  # an old read-only database without the table: no cadence known
        return sorted(float(r[0]) for r in rows)

    def recent_runs(self, limit: int = 20) -> list[RunRecord]:
        """The most recent runs, newest first."""
        try:
            rows = self.conn.execute(
                "SELECT started, trigger, lineages, due, renewed, interval FROM runs "
                "ORDER BY rowid DESC LIMIT ?", (limit,)).fetchall()
        except sqlite3.Error:
            return []
        return [RunRecord(float(a), str(b), int(c or 0), int(d or 0), e, f)
                for a, b, c, d, e, f in rows]

    def mark_renewed(self, name: str, when: float, issued_by: Optional[str] = None) -> None:
        """A renewal succeeded: the cert facts are re-read next time, the backoff ends."""
        self._write(
            "UPDATE lineage SET last_renewed=?, due=0, reason='renewed', cert_sig='', "
            "renew_failures=0, renew_failing_since=NULL, renew_last_error=NULL, "
            "renew_next_attempt=NULL, renew_fail_conf_sig=NULL, issued_by=? WHERE name=?",
            [(when, issued_by, name)])

    def update(self, state: LineageState) -> None:
        """Write one lineage's row (e.g. its renewal backoff)."""
        self.save([state])

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass
