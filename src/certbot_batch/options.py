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
        help="Due lineages validated together in one wave (one provisioning action and "
             "one cleanup per wave; also the number of concurrent orders). (default: 100)")
    parser.add_argument(
        "--batch-deploy-hook", dest="batch_deploy_hook", default=None,
        help="Command run once per renewal run, after the Apache reload, with every lineage "
             "renewed in the run: $RENEWED_LINEAGES, $RENEWED_DOMAINS and a JSON manifest "
             "in $CERTBOT_BATCH_MANIFEST. Executables in renewal-hooks/batch-deploy/ run "
             "the same way.")
