"""Batched deploy hooks: run once per renewal run, after the one reload, with every
lineage renewed in the run (environment variables plus a JSON manifest)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from typing import Any, Optional

from cryptography import x509

logger = logging.getLogger(__name__)

HOOK_DIR = os.path.join("renewal-hooks", "batch-deploy")


def describe_lineage(config: Any, name: str) -> dict[str, Any]:
    live_dir = os.path.join(str(config.config_dir), "live", name)
    info: dict[str, Any] = {"lineage": name, "live_dir": live_dir}
    try:
        with open(os.path.join(live_dir, "cert.pem"), "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            info["names"] = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        except x509.ExtensionNotFound:
            info["names"] = []
        info["serial"] = format(cert.serial_number, "x")
        not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
        info["not_after"] = not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OSError, ValueError) as exc:
        info["error"] = f"cannot read {live_dir}/cert.pem: {exc}"
    return info


def hook_commands(config: Any) -> list[str]:
    cmds: list[str] = []
    cli_hook = getattr(config, "batch_deploy_hook", None)
    if cli_hook:
        cmds.append(str(cli_hook))
    hook_dir = os.path.join(str(config.config_dir), HOOK_DIR)
    if os.path.isdir(hook_dir):
        for entry in sorted(os.listdir(hook_dir)):
            path = os.path.join(hook_dir, entry)
            if os.path.isfile(path) and os.access(path, os.X_OK) and not entry.endswith("~"):
                cmds.append(path)
            elif os.path.isfile(path):
                logger.warning("Skipping batch deploy hook %s: it is not executable "
                               "(chmod +x it to run it)", path)
    return cmds


def run_batch_hooks(config: Any, lineages: list[dict[str, Any]],
                    apache_reload: str = "none",
                    commands: Optional[list[str]] = None) -> Optional[str]:
    """Run every batch deploy hook once (``commands``, default: those configured now).
    Returns an error message, or None.

    ``apache_reload`` (exported as $CERTBOT_BATCH_APACHE_RELOAD): "reloaded" (every server
    of the run reloaded and confirmed), "none" (no server reload in this run), or the first
    failure: "configtest-failed", "reload-failed", "refused" (a lineage's live/ links could
    not be made safe), "down", "unconfirmed", "not-serving" (deploy/reload.py)."""
    if not lineages:
        return None
    cmds = hook_commands(config) if commands is None else list(commands)
    if not cmds:
        return None
    fd, manifest = tempfile.mkstemp(prefix="batch-deploy-", suffix=".json",
                                    dir=os.path.join(str(config.work_dir)))
    errors: list[str] = []
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"renewed": lineages}, fh, indent=2)
        env = dict(os.environ)
        # certbot's per-lineage deploy hooks leave RENEWED_LINEAGE (the last lineage) in the
        # process environment; a batch hook is about every lineage of the run.
        env.pop("RENEWED_LINEAGE", None)
        env["CERTBOT_BATCH_MANIFEST"] = manifest
        env["RENEWED_LINEAGES"] = " ".join(str(item["live_dir"]) for item in lineages)
        env["RENEWED_DOMAINS"] = " ".join(n for item in lineages for n in item.get("names", []))
        env["CERTBOT_BATCH_COUNT"] = str(len(lineages))
        env["CERTBOT_BATCH_APACHE_RELOAD"] = apache_reload
        for cmd in cmds:
            logger.info("Running batch deploy hook: %s", cmd)
            proc = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True,
                                  check=False)
            if proc.stdout.strip():
                logger.info("Batch deploy hook %s said: %s", cmd, proc.stdout.strip())
            if proc.returncode != 0:
                errors.append(f"batch deploy hook '{cmd}' exited {proc.returncode}: "
                              f"{proc.stderr.strip() or proc.stdout.strip()}")
    finally:
        os.unlink(manifest)
    if errors:
        deployed = "renewed and deployed" if apache_reload in ("reloaded", "none") else \
            "renewed"
        return "; ".join(errors) + f" (the certificates were {deployed}; the next " \
            "`certbot renew` runs the hook again)"
    return None
