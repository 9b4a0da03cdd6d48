"""Run-wide command line / cli.ini options of certbot-batch."""
from __future__ import annotations

import argparse
from typing import Any


def add_run_options(parser: Any) -> None:
    """Register the run-wide options once (certbot 1.x injects a plugin's options twice:
    once more under its legacy prefixed name)."""
    if getattr(parser, "_certbot_batch_options", False):
        return
    try:
        _add(parser)
    except argparse.ArgumentError:
        pass  # already there
    try:
        parser._certbot_batch_options = True
    except AttributeError:
        pass


def _add(parser: Any) -> None:
    parser.add_argument(
        "--batch-engine", dest="batch_engine", action="store_true", default=False,
        help="Let certbot-batch run `certbot renew` (parallel status scan, one reload per "
             "run) even when no batch plugin is chosen. In cli.ini: batch-engine = true. "
             "(certbot-batch)")
    parser.add_argument(
        "--batch-workers", dest="batch_workers", type=int, default=32,
        help="Concurrent ARI/OCSP status checks. (default: 32)")
    parser.add_argument(
        "--batch-ari-rate", dest="batch_ari_rate", type=float, default=500.0,
        help="Maximum ARI/OCSP requests per second to one CA. (default: 500)")
    parser.add_argument(
        "--batch-timeout", dest="batch_timeout", type=float, default=10.0,
        help="Timeout in seconds for one ARI or OCSP request. (default: 10)")
    parser.add_argument(
        "--batch-size", dest="batch_size", type=int, default=100,
        help="Due lineages renewed together in one wave: one provisioning action and one "
             "cleanup per wave, the wave's certificates saved before the next wave starts "
             "(so a SIGKILL loses at most one wave). (default: 100)")
    parser.add_argument(
        "--batch-deploy-hook", dest="batch_deploy_hook", default=None,
        help="Command run once per renewal run, after the Apache reload, with every lineage "
             "renewed in the run: $RENEWED_LINEAGES, $RENEWED_DOMAINS and a JSON manifest "
             "in $CERTBOT_BATCH_MANIFEST. Executables in renewal-hooks/batch-deploy/ run "
             "the same way.")
    parser.add_argument(
        "--batch-acme-rate", dest="batch_acme_rate", type=float, default=None,
        help="Maximum ACME requests per second to one CA while renewing (new-order, "
             "authorizations, challenges, finalize, downloads); a 503 or 429 answer pauses "
             "the requests to that endpoint of the CA (new-order, new-nonce, or the rest) "
             "for its Retry-After, and an endpoint refusing for 2 minutes is not asked "
             "again in the run. (default: 100, and 20 on Let's Encrypt's staging CA, where "
             "--dry-run goes: it allows one IP 20; production allows 250)")
    parser.add_argument(
        "--batch-fallback-server", dest="batch_fallback_server", default=None,
        metavar="URL",
        help="ACME directory of a fallback CA (register an account there first: certbot "
             "register --server URL). A due lineage whose own CA is unreachable, answers "
             "5xx, refuses it for a rate limit or keeps refusing requests for 2 minutes, "
             "and whose certificate expires within --batch-fallback-within days, is "
             "renewed from it in the same run (within 2 minutes of the CA's first refusal); "
             "its renewal conf keeps its own CA for the next renewal. Never used by "
             "--dry-run.")
    parser.add_argument(
        "--batch-fallback-within", dest="batch_fallback_within", type=float, default=7.0,
        metavar="DAYS",
        help="Use the fallback CA only for certificates expiring within this many days. "
             "(default: 7)")
    parser.add_argument(
        "--batch-run-interval", dest="batch_run_interval", type=float, default=None,
        metavar="SECONDS",
        help="Seconds between two scheduled runs (the timer's or cron's period). A lineage "
             "whose renewal time (chosen in its ARI window, or by the lifetime rules) comes "
             "before the next run is renewed in this run (RFC 9773 section 4.2), so no "
             "certificate expires between two runs. (default: learned from the recent runs "
             "kept in the state database)")
    parser.add_argument(
        "--batch-cached-status", dest="batch_cached_status", action="store_true",
        default=False,
        help="In a run from a terminal, use the stored ARI and OCSP answers as timer runs "
             "do, instead of asking the CA afresh for every certificate (the default "
             "there, so that a revocation the CA announced is seen at once).")
    parser.add_argument(
        "--batch-skip-if-locked", dest="batch_skip_if_locked", action="store_true",
        default=False,
        help="When another certbot run holds certbot's lock, say so in one line and exit 0 "
             "instead of failing (for frequent timer or cron runs).")


#: What the man page and README say for options whose default depends on the run
#: (argparse's default is then None).
DEFAULT_NOTES = {"batch_acme_rate": "100; 20 on Let's Encrypt's staging CA"}

#: (option, attribute, minimum, whether the minimum itself is allowed)
_BOUNDS = (
    ("--batch-workers", "batch_workers", 1, True),
    ("--batch-size", "batch_size", 1, True),
    ("--batch-ari-rate", "batch_ari_rate", 0, False),
    ("--batch-timeout", "batch_timeout", 0, False),
    ("--batch-acme-rate", "batch_acme_rate", 0, False),
    ("--batch-fallback-within", "batch_fallback_within", 0, True),
    ("--batch-run-interval", "batch_run_interval", 0, False),
)


def validate(config: Any) -> None:
    """Check every run-wide option before any CA contact: a clear error naming the option
    (and cli.ini, where it may come from), never a traceback deep inside a worker."""
    from certbot import errors

    for flag, attr, minimum, inclusive in _BOUNDS:
        value = getattr(config, attr, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.Error(f"{flag} must be a number (got {value!r}); check the command "
                               "line and cli.ini")
        if value < minimum or (not inclusive and value == minimum):
            bound = f"at least {minimum}" if inclusive else f"more than {minimum}"
            raise errors.Error(f"{flag} must be {bound} (got {value}); check the command "
                               "line and cli.ini")
    fallback = getattr(config, "batch_fallback_server", None)
    if fallback is not None and (not isinstance(fallback, str)
                                 or not fallback.startswith(("https://", "http://"))):
        raise errors.Error(f"--batch-fallback-server must be an ACME directory URL (got "
                           f"{fallback!r}); check the command line and cli.ini")
