"""The parallel renewal status scan: which lineages are due, decided for all at once.

Per lineage: read the renewal conf and the certificate only when they changed since the
last run (state in SQLite), ask the CA's ARI endpoint (in a bounded thread pool, per-CA rate
limited) only when the stored Retry-After has passed, fall back to OCSP only for certs that
have an OCSP URL and no ARI answer, then apply certbot's own rules. See docs/decisions.md
for every deliberate difference from certbot's ``should_renew``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Optional

from cryptography import x509

from certbot_batch import links, retry
from certbot_batch.scan import ari, ratelimit, schedule
from certbot_batch.scan import ocsp as ocsp
from certbot_batch.scan.state import LineageState, StateDB, link_path, link_paths

logger = logging.getLogger(__name__)

UTC = datetime.timezone.utc
#: A CA without ARI is asked again after this long (retry.py holds every retry number).
DEFAULT_RETRY = retry.NO_ARI_RECHECK
MAX_BACKOFF = retry.CHECK_BACKOFF.high
# A certificate this close to expiry renews whatever ARI says (a CA's window can be wrong):
# at most this long, a tenth of the lifetime for short certificates (schedule.py).
EXPIRY_SAFETY = schedule.SAFETY_MAX


@dataclasses.dataclass
class ScanSettings:
    workers: int = 32
    ari_rate: float = 500.0
    timeout: float = 10.0
    force: bool = False
    dry_run: bool = False
    user_agent: str = "certbot-batch"
    progress: bool = False
    rng: Optional[random.Random] = None
    #: False: certbot's --no-verify-ssl (ARI and OCSP requests do not check TLS certificates)
    verify_ssl: bool = True
    #: seconds between two timer runs (--batch-run-interval); None: learned from the runs
    #: recorded in the state database (schedule.py)
    run_interval: Optional[float] = None
    #: a person at a terminal: ARI and OCSP are asked afresh for every lineage (a revocation
    #: the CA announced is seen at once), unless ``cached_status`` (--batch-cached-status)
    interactive: bool = False
    cached_status: bool = False

    @property
    def fresh(self) -> bool:
        return self.interactive and not self.cached_status


@dataclasses.dataclass
class ScanReport:
    states: list[LineageState]
    broken: dict[str, str]          # lineage -> error, lineages certbot must report itself
    ari_requests: int = 0
    ocsp_requests: int = 0
    elapsed: float = 0.0
    #: lineage -> a bug of certbot-batch met while checking it (also in ``broken``)
    internal_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    #: seconds to the next expected run (schedule.py), None when unknown
    interval: Optional[float] = None
    #: where the interval comes from: "--batch-run-interval", "learned" or "unknown"
    interval_source: str = "unknown"
    #: this run's row in the state database's runs table
    run_id: Optional[int] = None

    def by_name(self) -> dict[str, LineageState]:
        index: Optional[dict[str, LineageState]] = self.__dict__.get("_by_name")
        if index is None or len(index) != len(self.states):
            index = {s.name: s for s in self.states}
            self.__dict__["_by_name"] = index
        return index

    @property
    def due(self) -> list[LineageState]:
        return [s for s in self.states if s.due]

    @property
    def not_due(self) -> list[LineageState]:
        return [s for s in self.states if not s.due and s.name not in self.broken]


def _ts(dt: datetime.datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _cert_time(cert: x509.Certificate, attr: str) -> float:
    value = getattr(cert, attr + "_utc", None)
    if value is None:
        value = getattr(cert, attr)
    return _ts(value)


fmt_time = schedule.fmt_time


parse_interval = schedule.parse_interval


def _conf_value(conf: Any, key: str) -> Optional[str]:
    value = conf.get(key)
    if value is None or value == "None":
        return None
    return str(value)


_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def read_conf(state: LineageState, path: str) -> None:
    """Fields of the renewal conf the decision needs (configobj, as certbot)."""
    import configobj

    try:
        conf = configobj.ConfigObj(path, encoding="utf-8", default_encoding="utf-8",
                                   file_error=True)
    except (configobj.ConfigObjError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"renewal conf {path} cannot be parsed: {exc}") from exc
    params = conf.get("renewalparams")
    if not isinstance(params, dict):
        raise ValueError(f"renewal conf {path} has no [renewalparams] section")
    cert = _conf_value(conf, "cert")
    if not cert:
        raise ValueError(f"renewal conf {path} names no 'cert' file")
    state.cert_path = cert
    state.chain_path = _conf_value(conf, "chain")
    state.privkey_path = _conf_value(conf, "privkey")
    state.fullchain_path = _conf_value(conf, "fullchain")
    state.server = _conf_value(params, "server")
    state.authenticator = _conf_value(params, "authenticator")
    state.installer = _conf_value(params, "installer")
    # certbot reads it from [renewalparams] (RenewableCert.autorenewal_is_enabled:
    # configobj's as_bool, which refuses anything but these words).
    autorenew = _conf_value(params, "autorenew")
    if autorenew is None:
        state.autorenew = True
    elif autorenew.strip().lower() in _TRUE:
        state.autorenew = True
    elif autorenew.strip().lower() in _FALSE:
        state.autorenew = False
    else:
        raise ValueError(f"renewal conf {path}: autorenew = {autorenew!r} is neither True "
                         "nor False")
    state.renew_before_expiry = _conf_value(conf, "renew_before_expiry")


def read_cert(state: LineageState) -> x509.Certificate:
    assert state.cert_path
    with open(state.cert_path, "rb") as fh:
        data = fh.read()
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"certificate {state.cert_path} is not a valid PEM certificate: "
                         f"{exc}") from exc
    state.serial = format(cert.serial_number, "x")
    state.not_before = _cert_time(cert, "not_valid_before")
    state.not_after = _cert_time(cert, "not_valid_after")
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    state.names = " ".join(names)
    try:
        state.ari_cert_id = ari.cert_id(cert)
    except ari.AriError:
        state.ari_cert_id = None
    state.ocsp_url = ocsp.ocsp_url(cert)
    return cert


def _cert_sig(path: str) -> str:
    st = os.stat(path)  # follows live/ symlinks: a new version is a new inode
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def default_renewal_time(state: LineageState) -> Optional[float]:
    """certbot 4.x's default: 1/3 of the lifetime left, 1/2 for certs living under 10 days."""
    return schedule.default_renewal_time(state.not_before, state.not_after)


def plan(state: LineageState, now: float, settings: ScanSettings,
         interval: Optional[float] = None, quiet: bool = False) -> schedule.Decision:
    """certbot's should_renew on stored facts, scheduled for timer runs (schedule.py):
    ``interval`` is the time to the next expected run."""
    if settings.force:
        return schedule.Decision(True, now, "forced (--force-renewal)", "--force-renewal")
    if settings.dry_run:
        return schedule.Decision(True, now, "dry run", "dry run")
    if not state.autorenew:
        return schedule.Decision(False, None, "autorenew is disabled in the renewal conf",
                                 "autorenew is disabled")
    return schedule.decide(now=now, not_before=state.not_before, not_after=state.not_after,
                           window_start=state.window_start, window_end=state.window_end,
                           chosen_time=state.chosen_time, ocsp_status=state.ocsp_status,
                           renew_before_expiry=state.renew_before_expiry, interval=interval,
                           name=state.name, warn=None if quiet else logger.warning)


def decide(state: LineageState, now: float, settings: ScanSettings,
           interval: Optional[float] = None) -> tuple[bool, str]:
    """(due, reason) of :func:`plan`."""
    d = plan(state, now, settings, interval)
    return d.due, d.reason


class _NetResult:
    __slots__ = ("name", "ari", "ari_error", "ocsp", "ocsp_error", "window_kept")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ari: Optional[ari.AriResult] = None
        self.ari_error: Optional[Exception] = None
        self.ocsp: Optional[ocsp.OcspResult] = None
        self.ocsp_error: Optional[Exception] = None


class Scanner:
    def __init__(self, settings: ScanSettings, db: StateDB,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.limiter = ratelimit.RateLimiter(rate=settings.ari_rate,
                                             burst=max(1.0, settings.ari_rate))
        self.ari_client = ari.AriClient(session_factory=self._new_session,
                                        timeout=(min(5.0, settings.timeout), settings.timeout),
                                        rate_limiter=self.limiter,
                                        user_agent=settings.user_agent)
        self.rng = settings.rng or random.Random()
        self._counts = {"ari": 0, "ocsp": 0}
        self._count_lock = threading.Lock()
        #: lineages of the current scan whose stored row must be rewritten
        self._dirty: set[str] = set()

    # -- network, in worker threads ------------------------------------------------------
    def _new_session(self) -> Any:
        import requests

        sess = requests.Session()
        # certbot's --no-verify-ssl applies to every request certbot makes, ARI included
        # (certbot's own ARI client is acme's ClientNetwork(verify_ssl=...)); otherwise
        # requests' own CA bundle rules (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE), as certbot.
        sess.verify = self.settings.verify_ssl
        return sess

    def _session(self) -> Any:
        """The calling worker thread's session (the ARI client's pool: one per thread, for
        ARI and OCSP alike)."""
        return self.ari_client.session()

    def _check(self, state: LineageState, want_ari: bool, want_ocsp: str) -> _NetResult:
        """ARI and/or OCSP for one lineage, in a worker thread. ``want_ocsp``: "" (no),
        "fallback" (only when ARI gave no answer) or "always"."""
        res = _NetResult(state.name)
        cert: Optional[x509.Certificate] = None
        try:
            assert state.cert_path
            with open(state.cert_path, "rb") as fh:
                cert = x509.load_pem_x509_certificate(fh.read())
        except (OSError, ValueError) as exc:
            res.ari_error = exc
            return res
        if want_ari and state.server:
            with self._count_lock:
                self._counts["ari"] += 1
            try:
                res.ari = self.ari_client.fetch(state.server, cert)
            except ari.AriError as exc:  # every failure the ARI client knows of
                res.ari_error = exc
        if state.ocsp_url and (want_ocsp == "always"
                               or (want_ocsp == "fallback" and res.ari is None)):
            try:
                issuer = self._issuer(state)
                with self._count_lock:
                    self._counts["ocsp"] += 1
                res.ocsp = ocsp.check(cert, issuer, state.ocsp_url, session=self._session(),
                                      timeout=self.settings.timeout,
                                      rate_limiter=self.limiter)
            except ocsp.OcspError as exc:
                res.ocsp_error = exc
            except (OSError, ValueError) as exc:  # the chain file: unreadable, not PEM
                res.ocsp_error = exc
        return res

    def _issuer(self, state: LineageState) -> x509.Certificate:
        chain = link_path(state, "chain")
        if not chain:
            raise ocsp.OcspError("malformed", f"lineage {state.name} has no chain file, so "
                                 "its OCSP response cannot be verified")
        with open(chain, "rb") as fh:
            return x509.load_pem_x509_certificate(fh.read())

    # -- applying results, in the main thread --------------------------------------------
    def _apply(self, state: LineageState, res: _NetResult, now: float) -> None:
        if res.ari is not None:
            start, end = _ts(res.ari.window_start), _ts(res.ari.window_end)
            if (state.window_start, state.window_end) != (start, end) or \
                    state.chosen_time is None:
                state.window_start, state.window_end = start, end
                state.chosen_time = _ts(ari.choose_time(res.ari.window_start,
                                                        res.ari.window_end, self.rng))
            state.next_check = now + float(res.ari.retry_after_seconds)
            state.failures = 0
            state.last_error = None
        elif res.ari_error is not None:
            err = res.ari_error
            kind = getattr(err, "kind", "error")
            if kind == "no_ari":
                # The CA has no ARI: not a failure, just nothing to ask for a while.
                state.next_check = now + DEFAULT_RETRY
                state.last_error = None
            else:
                state.failures += 1
                state.last_error = f"ARI: {err}"
                state.next_check = now + retry.check_backoff(
                    state.failures, getattr(err, "retry_after", None), self.rng)
                if kind == "bad_window":
                    state.window_start = state.window_end = state.chosen_time = None
        if res.ocsp is not None:
            state.ocsp_status = res.ocsp.status
            nxt = getattr(res.ocsp, "next_update", None)
            # Kept until its nextUpdate, but never longer than the stated bound: a revocation
            # the responder announces is seen within it (retry.OCSP_GOOD_MAX).
            horizon = now + retry.OCSP_GOOD_MAX
            state.ocsp_next = min(_ts(nxt), horizon) if nxt is not None else horizon
            if state.last_error and state.last_error.startswith("OCSP"):
                state.last_error = None
        elif res.ocsp_error is not None:
            state.ocsp_status = None
            state.ocsp_next = now + retry.OCSP_FAILURE_RECHECK
            if res.ari_error is None or getattr(res.ari_error, "kind", "") == "no_ari":
                state.failures += 1  # one failed check per scan, even if ARI failed too
            msg = f"OCSP: {res.ocsp_error}"
            state.last_error = f"{state.last_error}; {msg}" if state.last_error else msg

    # -- the scan -----------------------------------------------------------------------
    def scan(self, conf_files: list[str], full: bool = True) -> ScanReport:
        t0 = time.monotonic()
        now = self.clock()
        known = self.db.load_all(for_scan=True)
        states: list[LineageState] = []
        broken: dict[str, str] = {}
        internal: dict[str, str] = {}
        # Network checks start while the remaining confs are still being read: the reading
        # is CPU work in this thread, the checks mostly wait for the CA.
        #: lineages whose stored row must be rewritten (a warm run rewrites only those)
        dirty: set[str] = set()
        self._dirty = dirty
        net = _NetworkRun(self, now)
        with _quiet_unverified(not self.settings.verify_ssl):
            try:
                for path in conf_files:
                    want = self._read_one(path, known, now, states, broken)
                    if want is not None:
                        net.submit(*want)
            except BaseException:
                net.abort()
                raise
            net.finish()
        dirty.update(state.name for state in net.futures.values())
        for name, msg in net.internal_errors.items():
            broken[name] = msg
            internal[name] = msg
        interval, source = self._interval(now, timer=full and not self.settings.interactive)
        settings = self.settings
        for state in states:
            if state.name in broken:
                continue
            due, reason = decide(state, now, settings, interval)
            if due != state.due or reason != state.reason:
                state.due, state.reason = due, reason
                dirty.add(state.name)
            state.last_scan = now
        run_id = None
        if not settings.dry_run:  # a dry run leaves the stored state as it was
            self.db.save([s for s in states if s.name in dirty])
            self.db.touch(now, None if full else [s.name for s in states])
            if full:
                self.db.delete_missing({s.name for s in states})
            trigger = "cert-name" if not full else (
                "interactive" if settings.interactive else "timer")
            run_id = self.db.record_run(now, trigger, len(states),
                                        sum(1 for s in states if s.due), interval)
        return ScanReport(states=states, broken=broken, ari_requests=self._counts["ari"],
                          ocsp_requests=self._counts["ocsp"], elapsed=time.monotonic() - t0,
                          internal_errors=internal, interval=interval,
                          interval_source=source, run_id=run_id)

    def _interval(self, now: float, timer: bool) -> tuple[Optional[float], str]:
        """Seconds to the next expected run, and where that comes from (this run counts when
        a timer started it)."""
        if self.settings.run_interval:
            return float(self.settings.run_interval), "--batch-run-interval"
        starts = self.db.run_starts("timer") + ([now] if timer else [])
        learned = schedule.learned_interval(starts)
        return (learned, "learned from the recent runs") if learned else (None, "unknown")

    def _read_one(self, path: str, known: dict[str, LineageState], now: float,
                  states: list[LineageState], broken: dict[str, str]
                  ) -> Optional[tuple[LineageState, bool, str]]:
        """Refresh one lineage's conf/cert facts; (state, want_ari, want_ocsp) when the CA
        must be asked about it."""
        name = os.path.basename(path)[:-len(".conf")]
        state = known.get(name)
        if state is None:
            state = LineageState(name=name)
            self._dirty.add(name)
        state.conf_path = path
        states.append(state)
        try:
            st = os.stat(path)
            conf_sig = f"{st.st_mtime_ns}:{st.st_size}"
            if conf_sig != state.conf_sig or not state.cert_path:
                read_conf(state, path)
                state.conf_sig = conf_sig
                state.links_sig = ""
                self._dirty.add(name)
            assert state.cert_path
            if not _links_unchanged(state):
                # certbot's RenewableCert checks all four live/ links of a lineage on every
                # run and calls the lineage broken when one does not resolve: so do we, and
                # repair links an interrupted save left on two versions. Then the
                # directories holding the links and their targets are noted: until one of
                # them changes (a link moved, a file added or removed), the links are as
                # found now, and a warm run stats those directories instead.
                for link in link_paths(state):
                    if link and not os.path.exists(link):
                        raise ValueError(f"{link}: No such file or directory (a broken live/ "
                                         "link?)")
                _repair_links(state)
                state.links_sig = _links_sig(state)
                self._dirty.add(name)
            cert_sig = _cert_sig(state.cert_path)
            if cert_sig != state.cert_sig or state.not_after is None:
                state.reset_cert_facts()
                read_cert(state)
                state.cert_sig = cert_sig
                self._dirty.add(name)
        except (OSError, ValueError, AssertionError) as exc:
            msg = str(exc) if not isinstance(exc, OSError) else \
                f"{exc.strerror or exc}: {exc.filename or path}"
            broken[name] = msg
            state.conf_sig = ""  # re-read next time
            state.cert_sig = ""
            state.links_sig = ""
            state.last_error = f"lineage {name}: {msg}"
            state.due, state.reason = True, "unreadable: certbot will report it"
            self._dirty.add(name)
            return None
        if self.settings.force or self.settings.dry_run or not state.autorenew:
            return None
        fresh = self.settings.fresh
        want_ari = bool(state.server and state.ari_cert_id) and (
            fresh or state.next_check is None or state.next_check <= now)
        want_ocsp = ""
        if state.ocsp_url:
            stale = state.ocsp_next is None or state.ocsp_next <= now
            if fresh or (stale and state.ocsp_status is not None):
                # A person at a terminal asks afresh; a stored answer older than the bound is
                # asked again even when an ARI window is known.
                want_ocsp = "always"
            elif stale and state.window_start is None:
                want_ocsp = "fallback"
        if want_ari or want_ocsp:
            return state, want_ari, want_ocsp
        return None


def _links_sig(state: LineageState) -> str:
    """The directories holding the lineage's four links and the files they point at, each
    with its inode and mtime: "DIR|INO:MTIME_NS" joined by newlines, DIR written "L" for the
    directory of the cert link and "A" for certbot's archive directory of the lineage (most
    lineages: "L|..." and "A|...", a few bytes per lineage in a warm run's memory)."""
    dirs = set()
    for link in link_paths(state):
        if not link:
            continue
        dirs.add(os.path.dirname(link))
        target = links._target(link)  # noqa: SLF001  (our own module)
        if target is not None:
            dirs.add(os.path.dirname(target))
    live, archive = _standard_dirs(state)
    parts = []
    for d in sorted(dirs):
        st = os.stat(d)
        short = "L" if d == live else ("A" if d == archive else d)
        parts.append(f"{short}|{st.st_ino}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _standard_dirs(state: LineageState) -> tuple[str, str]:
    """live/NAME (the cert link's directory) and certbot's archive/NAME next to it (plain
    string slicing: a warm run computes it for every lineage; a path it gets wrong only
    costs that lineage a full check)."""
    cert = state.cert_path or ""
    live = cert[:cert.rfind("/")]
    config = live[:live[:live.rfind("/")].rfind("/")]
    return live, f"{config}/archive/{state.name}"


def _links_unchanged(state: LineageState) -> bool:
    """Is every directory of the stored :func:`_links_sig` as it was (one stat each)?"""
    sig = state.links_sig
    if not sig:
        return False
    standard: Optional[tuple[str, str]] = None
    for part in sig.split("\n"):
        path, _, stamp = part.rpartition("|")
        if path in ("L", "A"):
            standard = standard or _standard_dirs(state)
            path = standard[0] if path == "L" else standard[1]
        try:
            st = os.stat(path)
        except OSError:
            return False
        if f"{st.st_ino}:{st.st_mtime_ns}" != stamp:
            return False
    return True


def _repair_links(state: LineageState) -> None:
    """A lineage whose live/ links an interrupted save left on two versions is repaired
    here, as certbot's own renew would (its RenewableCert does it for every lineage it
    loads; the session loads only the due ones): before anything reloads a server."""
    cert, privkey, chain, fullchain = link_paths(state)
    lineage = links.Lineage(state.name, {
        "cert": str(cert), "privkey": str(privkey), "chain": str(chain),
        "fullchain": str(fullchain)})
    if links.quick_problem(lineage) is None:
        return
    outcome = links.ensure_consistent(lineage)
    if outcome.changed:
        logger.warning("certbot-batch: %s", outcome.message)
    if not outcome.ok:
        raise ValueError(outcome.message)


@contextlib.contextmanager
def _quiet_unverified(quiet: bool) -> Iterator[None]:
    """With --no-verify-ssl, urllib3 warns (InsecureRequestWarning, on every new connection)
    for each unverified request: thousands of lines in a scan, for a choice the user made.
    Silenced while the scan's requests are in flight: entered and left in the scanning
    thread, around the worker pool (every worker has finished when it is left), and the
    scan is the only phase of the run with requests in flight, so certbot's own ACME
    requests keep their warnings as stock."""
    if not quiet:
        yield
        return
    from urllib3.exceptions import InsecureRequestWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        yield


class _NetworkRun:
    """The scan's ARI/OCSP checks: a bounded thread pool, created on the first submission;
    results are applied in the scanning thread (by :meth:`finish`)."""

    def __init__(self, scanner: Scanner, now: float) -> None:
        self.scanner = scanner
        self.now = now
        self.pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.futures: dict[concurrent.futures.Future[_NetResult], LineageState] = {}
        #: lineage -> the bug that made its check fail (never a decision of ours)
        self.internal_errors: dict[str, str] = {}

    def submit(self, state: LineageState, want_ari: bool, want_ocsp: str) -> None:
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, self.scanner.settings.workers),
                thread_name_prefix="certbot-batch-scan")
        fut = self.pool.submit(self.scanner._check, state, want_ari, want_ocsp)
        self.futures[fut] = state

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def finish(self) -> None:
        if self.pool is None:
            return
        scanner, now = self.scanner, self.now
        progress = scanner.settings.progress
        total = len(self.futures)
        done = 0
        last_progress = time.monotonic()
        try:
            for fut in concurrent.futures.as_completed(self.futures):
                state = self.futures[fut]
                try:
                    scanner._apply(state, fut.result(), now)
                except Exception as exc:  # noqa: BLE001  (a bug: see below)
                    # Every failure the checks expect is a result (AriError, OcspError, an
                    # unreadable file); what is left is a bug of ours. It must not become a
                    # decision: the traceback goes to the log, and the lineage is handed to
                    # certbot's own loop as an unreadable one (certbot decides for it, as
                    # stock), and the run's exit status says so.
                    logger.error("certbot-batch: internal error while checking lineage %s; "
                                 "certbot decides for it itself", state.name, exc_info=True)
                    msg = f"certbot-batch internal error: {type(exc).__name__}: {exc}"
                    self.internal_errors[state.name] = msg
                    state.last_error = msg
                    state.due, state.reason = True, "internal error: certbot decides"
                done += 1
                if progress and time.monotonic() - last_progress > 1.0:
                    last_progress = time.monotonic()
                    sys.stderr.write(f"\rcertbot-batch: checked {done}/{total} lineages")
                    sys.stderr.flush()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if progress and total:
            sys.stderr.write(f"\rcertbot-batch: checked {total}/{total} lineages\n")
