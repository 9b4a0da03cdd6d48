"""Shared helpers for the certbot-batch benchmarks (plain scripts, not collected by pytest).

* :func:`get_farm` builds a farm of certbot lineages once (on /dev/shm: creating and deleting
  tens of thousands of files on ext4 is slow) and reuses it on later runs; :func:`copy_farm`
  gives each measured run its own copy of it.
* :func:`start_responder` starts our ARI + OCSP responder (tests/bed/responder.py) on the
  farm's fixed port (certificates carry its OCSP URL, renewal confs its directory URL) with a
  chosen latency.
* :func:`run_certbot` runs one certbot flavour (tests/bed/certbots.py) as a subprocess and
  reports its wall time and peak RSS (``getrusage(RUSAGE_CHILDREN)`` taken in a fresh wrapper
  process, so runs don't mask each other's peak) and, with a responder, the CA requests it made.

Typical use::

    from benchmarks import common            # (after putting the repo root on sys.path)
    farm = common.get_farm("scan", 2000)
    base = common.copy_farm(farm, "stock-2000")
    with common.start_responder(farm, latency=0.05) as responder:
        run = common.run_certbot("pypi", base, "renew", responder=responder)
        print(run.wall, run.max_rss_mb, run.requests)
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.bed import certbots  # noqa: E402
from tests.bed.farm import FarmCA, make_farm  # noqa: E402
from tests.bed.ports import free_port  # noqa: E402
from tests.bed.responder import Responder  # noqa: E402

#: Where farms and run copies live. tmpfs by default.
BENCH_ROOT = Path(os.environ.get("CERTBOT_BATCH_BENCH_DIR", "/dev/shm/certbot-batch-bench"))
FARM_FORMAT = 1

__all__ = [
    "BENCH_ROOT",
    "REPO",
    "Farm",
    "RunResult",
    "get_farm",
    "copy_farm",
    "remove_tree",
    "start_responder",
    "run_certbot",
    "certbot_version",
    "machine_facts",
    "fmt_seconds",
]


# --------------------------------------------------------------------------------------------
# farms


@dataclasses.dataclass
class Farm:
    """A pristine farm: ``root/config`` is a certbot config dir, ``root/ca`` its FarmCA."""

    root: Path
    count: int
    port: int
    meta: dict[str, Any]

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}/directory"

    @property
    def ocsp_url(self) -> str:
        return f"{self.base_url}/ocsp"

    def ca(self) -> FarmCA:
        return FarmCA.load(str(self.ca_dir))


def get_farm(kind: str, count: int, *, ocsp: bool = True, authenticator: str = "webroot",
             installer: Optional[str] = None, lifetime_days: float = 90.0,
             age_days: float = 10.0, rebuild: bool = False, workers: Optional[int] = None,
             extra: Optional[Mapping[str, Any]] = None, log: bool = True) -> Farm:
    """The farm ``BENCH_ROOT/farms/{kind}-{count}``, built if missing (or ``rebuild``).

    Lineages ``lin00000.test`` ...: one shared EC key, certs from a FarmCA with an intermediate
    (AKI present, so they have an ARI certID), an OCSP URL pointing at the farm's responder
    port when ``ocsp``, ``server`` = the responder's directory URL, ``webroot`` authenticator.
    A farm whose parameters differ from the ones asked for is rebuilt.

    Must be called before any responder (or other busy thread) runs in this process: the
    builder forks writer processes.
    """
    root = BENCH_ROOT / "farms" / f"{kind}-{count}"
    wanted = {"format": FARM_FORMAT, "kind": kind, "count": count, "ocsp": ocsp,
              "authenticator": authenticator, "installer": installer,
              "lifetime_days": lifetime_days, "age_days": age_days,
              "extra": dict(extra or {})}
    meta_path = root / "meta.json"
    if not rebuild and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if {k: meta.get(k) for k in wanted} == wanted:
            if log:
                print(f"[farm] reusing {root} ({count} lineages, built {meta.get('built')})",
                      file=sys.stderr)
            return Farm(root, count, int(meta["port"]), meta)
    remove_tree(root)
    (root / "webroot").mkdir(parents=True)
    port = free_port()
    ca = FarmCA.create(f"certbot-batch bench {kind}")
    ca.save(str(root / "ca"))
    t0 = time.monotonic()
    base = f"http://127.0.0.1:{port}"
    make_farm(str(root / "config"), count, ca=ca, server=f"{base}/directory",
              lifetime=lifetime_days, age=age_days, ocsp_url=f"{base}/ocsp" if ocsp else None,
              authenticator=authenticator, installer=installer, webroot=str(root / "webroot"),
              extra_renewalparams=dict(extra) if extra else None,
              workers=workers or os.cpu_count() or 1)
    elapsed = time.monotonic() - t0
    meta = dict(wanted, port=port, built=_now_iso(), build_seconds=round(elapsed, 1))
    meta_path.write_text(json.dumps(meta, indent=1))
    if log:
        print(f"[farm] built {root}: {count} lineages in {elapsed:.1f} s (port {port})",
              file=sys.stderr)
    return Farm(root, count, port, meta)


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def copy_farm(farm: Farm, label: str, root: Optional[Path] = None) -> Path:
    """A fresh copy of the farm's config dir as ``{root}/{label}/config`` (root defaults to
    ``BENCH_ROOT/runs``), with empty work/logs/tmp dirs next to it. Returns the base dir, the
    layout :class:`tests.bed.certbots.Certbot` expects."""
    base = (root or BENCH_ROOT / "runs") / label
    remove_tree(base)
    base.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(farm.config_dir), str(base / "config")], check=True)
    _repoint_confs(base / "config", str(farm.config_dir), str(base / "config"))
    for sub in ("work", "logs", "tmp"):
        (base / sub).mkdir()
    return base


def _repoint_confs(config_dir: Path, old: str, new: str) -> None:
    """Renewal confs hold absolute archive/live paths: point the copy's at the copy (keeping
    each file's size-independent content otherwise identical)."""
    renewal = config_dir / "renewal"
    for entry in os.scandir(renewal):
        if not entry.name.endswith(".conf"):
            continue
        with open(entry.path, encoding="utf-8") as f:
            text = f.read()
        if old in text:
            with open(entry.path, "w", encoding="utf-8") as f:
                f.write(text.replace(old + "/", new + "/"))


# --------------------------------------------------------------------------------------------
# the responder


def start_responder(farm: Farm, latency: float = 0.05, **kwargs: Any) -> Responder:
    """Our ARI + OCSP responder for ``farm`` on its fixed port, already started (use it as a
    context manager to stop it). ``latency`` seconds are added to every ARI and OCSP answer
    (not to the directory). The default policy answers a window 30..32 days ahead (none due),
    Retry-After 6 h."""
    responder = Responder(farm.ca(), port=farm.port, **kwargs)
    try:
        responder.start()
    except OSError as exc:
        raise RuntimeError(f"responder port {farm.port} of farm {farm.root} is busy ({exc}); "
                           "free it or rebuild the farm (--rebuild)") from exc
    if latency > 0:
        responder.set_latency(latency, kind="ari")
        responder.set_latency(latency, kind="ocsp")
    return responder


# --------------------------------------------------------------------------------------------
# running certbot

# Runs the command given after the output path, inherits stdio, then writes wall time and
# the child's peak RSS (KiB on Linux) as JSON. A fresh process per run: RUSAGE_CHILDREN's
# ru_maxrss is the largest of all waited-for children, so it cannot be reused across runs.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.monotonic()
rc = subprocess.call(cmd)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"rc": rc, "wall": wall, "maxrss_kb": ru.ru_maxrss,
               "utime": ru.ru_utime, "stime": ru.ru_stime}, f)
"""


@dataclasses.dataclass
class RunResult:
    label: str
    args: list[str]
    returncode: int
    wall: float
    max_rss_kb: int
    cpu: float
    stdout: str
    stderr: str
    requests: dict[str, int]

    @property
    def max_rss_mb(self) -> float:
        return self.max_rss_kb / 1024.0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "rc": self.returncode, "wall_s": round(self.wall, 3),
                "cpu_s": round(self.cpu, 3), "max_rss_mb": round(self.max_rss_mb, 1),
                "requests": self.requests}


def run_certbot(flavour: str, base_dir: Path, *args: str, label: str = "",
                responder: Optional[Responder] = None, timeout: float = 3600.0,
                env_extra: Optional[Mapping[str, str]] = None,
                python_wrapper: Optional[Sequence[str]] = None) -> RunResult:
    """Run certbot (flavour "pypi" or "deb") on ``base_dir`` (config/work/logs inside), as
    :class:`tests.bed.certbots.Certbot` would (``renew`` gets ``--no-random-sleep-on-renew``,
    ``--non-interactive`` ...). Counts the responder's requests made during the run.

    ``python_wrapper`` replaces ``[python, "-c", boot]`` of the command (e.g. to run certbot
    under ``-m cProfile``)."""
    cb = certbots.Certbot(flavour, base_dir, None)
    cmd = cb.command(*args)
    if python_wrapper is not None:
        cmd = list(python_wrapper) + cmd[3:]
    if responder is not None:
        responder.reset_counters()
    fd, out_path = tempfile.mkstemp(prefix="bench-run-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, out_path, *cmd],
                              capture_output=True, text=True, env=cb.env(env_extra),
                              cwd=base_dir, timeout=timeout, check=False)
        with open(out_path) as f:
            data = json.load(f)
    finally:
        os.unlink(out_path)
    requests: dict[str, int] = {}
    if responder is not None:
        responder.wait_idle(10.0)
        requests = {"ari": responder.ari_requests, "ocsp": responder.ocsp_requests,
                    "directory": responder.directory_requests,
                    "other": responder.other_requests}
    return RunResult(label=label or " ".join(args), args=list(args),
                     returncode=int(data["rc"]), wall=float(data["wall"]),
                     max_rss_kb=int(data["maxrss_kb"]),
                     cpu=float(data["utime"]) + float(data["stime"]),
                     stdout=proc.stdout, stderr=proc.stderr, requests=requests)


# --------------------------------------------------------------------------------------------
# facts for the report


def certbot_version(flavour: str = "pypi") -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return certbots.Certbot(flavour, Path(tmp), None).version


def machine_facts(flavour: str = "pypi") -> dict[str, Any]:
    load = os.getloadavg()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"date": _now_iso(), "nproc": os.cpu_count(), "cpu": cpu_model,
            "python": platform.python_version(), "kernel": platform.release(),
            "certbot": certbot_version(flavour), "loadavg_at_start": [round(x, 2) for x in load],
            "bench_dir": str(BENCH_ROOT),
            "bench_fs": _fs_type(BENCH_ROOT)}


def _fs_type(path: Path) -> str:
    path = path.resolve()
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and \
                        len(parts[1]) > len(best):
                    best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 120:
        return f"{value / 60:.1f} min"
    if value >= 10:
        return f"{value:.1f} s"
    return f"{value:.2f} s"


def which_python(flavour: str) -> str:
    venv = certbots.venv_for(flavour)
    return str(venv / "bin" / "python") if venv else shutil.which("python3") or "python3"
