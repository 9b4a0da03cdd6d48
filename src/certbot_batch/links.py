"""The four ``live/`` links of a lineage: one complete version, a key that fits its certificate.

certbot saves a renewal by writing ``archive/NAME/{cert,chain,fullchain,privkey}N.pem`` and
then moving the four ``live/NAME/*.pem`` links one by one (``update_all_links_to``, with
``previous_*.pem`` links as its undo record). A process killed in between (SIGKILL, the OOM
killer, systemd's stop timeout) leaves the links on two versions: a key of version 2 next
to a certificate of version 1. Apache and nginx then refuse the pair at their next reload
and **exit**; a configtest does not load certificates, so it does not see it.

Before any reload (end of a run, recovery) and whenever the scan meets such a lineage, the
links are brought back to one complete version the way certbot itself does on its next
``renew`` (``RenewableCert._fix_symlinks`` then ``ensure_deployed``): the undo record is
applied, then the links move to the newest version whose four archive files are complete
-- checked more closely than certbot does: every file parses and the key fits the
certificate, so an archive file cut short by the kill is never linked. When no version is
complete, nothing is changed and the caller must not reload.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization

logger = logging.getLogger(__name__)

KINDS = ("cert", "privkey", "chain", "fullchain")
_VERSION = {kind: re.compile(rf"^{kind}(\d+)\.pem$") for kind in KINDS}


@dataclasses.dataclass
class Lineage:
    """Where a lineage's links are (from its renewal conf, or ``live/NAME`` by default)."""
    name: str
    links: dict[str, str]

    @classmethod
    def in_live_dir(cls, live_dir: str) -> Lineage:
        return cls(os.path.basename(live_dir.rstrip(os.sep)),
                   {k: os.path.join(live_dir, f"{k}.pem") for k in KINDS})

    def previous(self, kind: str) -> str:
        return os.path.join(os.path.dirname(self.links[kind]), f"previous_{kind}.pem")


@dataclasses.dataclass
class Outcome:
    """What ``ensure_consistent`` found and did."""
    ok: bool
    changed: bool = False
    version: Optional[int] = None
    message: str = ""


def _target(link: str) -> Optional[str]:
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return os.path.normpath(os.path.join(os.path.dirname(link), target))


def _version_of(kind: str, target: Optional[str]) -> Optional[int]:
    if target is None:
        return None
    match = _VERSION[kind].match(os.path.basename(target))
    return int(match.group(1)) if match else None


def quick_problem(lineage: Lineage) -> Optional[str]:
    """A problem visible without reading any file (readlink and lstat only): an undo record
    left by an interrupted save, or links on different versions. None when it looks fine."""
    if any(os.path.lexists(lineage.previous(k)) for k in KINDS):
        return "an interrupted save left previous_*.pem links"
    versions = {k: _version_of(k, _target(lineage.links[k])) for k in KINDS}
    if len(set(versions.values())) != 1 or None in versions.values():
        shown = ", ".join(f"{k} v{v}" if v is not None else f"{k} ?"
                          for k, v in versions.items())
        return f"live/ links on different versions ({shown})"
    return None


def version_problem(archive_dir: str, version: int) -> Optional[str]:
    """Why version ``version`` in ``archive_dir`` cannot be served, or None: all four files
    there, every one parses, the key fits the certificate, fullchain starts with it."""
    files = {k: os.path.join(archive_dir, f"{k}{version}.pem") for k in KINDS}
    try:
        data = {}
        for kind, path in files.items():
            with open(path, "rb") as fh:
                data[kind] = fh.read()
        cert = x509.load_pem_x509_certificate(data["cert"])
        key = serialization.load_pem_private_key(data["privkey"], password=None)
        chain = x509.load_pem_x509_certificate(data["chain"])
        first = x509.load_pem_x509_certificate(data["fullchain"])
    except FileNotFoundError as exc:
        return f"{exc.filename} is missing"
    except (OSError, ValueError, TypeError) as exc:
        return f"version {version} does not parse ({exc})"
    del chain
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        return f"privkey{version}.pem does not fit cert{version}.pem"
    if first != cert:
        return f"fullchain{version}.pem does not start with cert{version}.pem"
    return None


def _archive_dir(lineage: Lineage) -> Optional[str]:
    for path in [lineage.previous(k) for k in KINDS] + list(lineage.links.values()):
        target = _target(path)
        if target is not None:
            return os.path.dirname(target)
    return None


def _versions(archive_dir: str) -> list[int]:
    """Versions with all four files, newest first."""
    try:
        names = os.listdir(archive_dir)
    except OSError:
        return []
    found: dict[str, set[int]] = {k: set() for k in KINDS}
    for name in names:
        for kind, pattern in _VERSION.items():
            match = pattern.match(name)
            if match:
                found[kind].add(int(match.group(1)))
    common = set.intersection(*found.values())
    return sorted(common, reverse=True)


def _point(link: str, target: str) -> None:
    """Make ``link`` point at ``target`` (relative, as certbot writes them), atomically."""
    rel = os.path.relpath(target, os.path.dirname(link))
    tmp = os.path.join(os.path.dirname(link), f".certbot-batch-{os.path.basename(link)}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def _link_all(lineage: Lineage, archive_dir: str, version: int) -> None:
    """certbot's update_all_links_to: the undo record first, then the four links, then the
    undo record goes (a kill in between is repaired the same way next time)."""
    previous = []
    for kind in KINDS:
        current = _target(lineage.links[kind])
        if current is not None and os.path.exists(current):
            _point(lineage.previous(kind), current)
            previous.append(lineage.previous(kind))
    if len(previous) != len(KINDS):  # no complete undo record: none at all
        for path in previous:
            os.unlink(path)
    for kind in KINDS:
        _point(lineage.links[kind], os.path.join(archive_dir, f"{kind}{version}.pem"))
    for kind in KINDS:
        try:
            os.unlink(lineage.previous(kind))
        except FileNotFoundError:
            pass


def ensure_consistent(lineage: Lineage, deep: bool = True) -> Outcome:
    """Bring ``lineage``'s links to one complete version (see the module docstring).
    ``deep``: also read the files of the version in place (needed before a reload when the
    lineage was just renewed); without it only a quick problem leads to reading files."""
    problem = quick_problem(lineage)
    if problem is None and not deep:
        return Outcome(ok=True)
    archive_dir = _archive_dir(lineage)
    if archive_dir is None:
        return Outcome(ok=False, message=f"lineage {lineage.name}: its live/ links point "
                       "nowhere (no archive directory found)")
    current = _version_of("cert", _target(lineage.links["cert"]))
    complete = _versions(archive_dir)
    if problem is None and current is not None:
        if complete and complete[0] > current:
            # certbot's ensure_deployed: "Found a new certificate /archive/ that was not
            # linked to in /live/" (a kill after the archive was written).
            problem = f"version {complete[0]} in the archive was never linked in live/"
        else:
            bad = version_problem(archive_dir, current)
            if bad is None:
                return Outcome(ok=True, version=current)
            problem = bad
    changed = False
    try:
        # certbot's _fix_symlinks: a complete undo record is applied, any other one dropped.
        previous = [lineage.previous(k) for k in KINDS]
        if all(os.path.exists(p) for p in previous):
            for kind in KINDS:
                _point(lineage.links[kind], str(_target(lineage.previous(kind))))
            changed = True
        for path in previous:
            if os.path.lexists(path):
                os.unlink(path)
                changed = True
        # certbot's ensure_deployed, with every file checked: the newest complete version.
        skipped = []
        for version in complete:
            bad = version_problem(archive_dir, version)
            if bad is not None:
                skipped.append(f"v{version}: {bad}")
                continue
            if quick_problem(lineage) is not None or _version_of(
                    "cert", _target(lineage.links["cert"])) != version:
                _link_all(lineage, archive_dir, version)
                changed = True
            note = f" (skipped {'; '.join(skipped)})" if skipped else ""
            message = (f"lineage {lineage.name}: {problem}; live/ now on version {version}"
                       f"{note}") if changed else ""
            return Outcome(ok=True, changed=changed, version=version, message=message)
    except OSError as exc:
        return Outcome(ok=False, changed=changed, message=f"lineage {lineage.name}: {problem}; "
                       f"repairing its live/ links failed: {exc}")
    return Outcome(ok=False, changed=changed, message=f"lineage {lineage.name}: {problem}; no "
                   "version in its archive is complete with a key that fits its certificate")
