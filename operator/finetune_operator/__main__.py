"""`python -m finetune_operator`: run the operator (namespaced or cluster-wide, by flag or environment)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import kopf

from . import handlers
from .handlers import SETTINGS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune_operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable); default: FINETUNE_NAMESPACES, else cluster-wide")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--peering", default=None, help="peering object name (default: FINETUNE_PEERING_NAME)")
    parser.add_argument("--standalone", action="store_true", help="run without peering (a single replica)")
    parser.add_argument("--liveness", default=SETTINGS.liveness_endpoint,
                        help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz ('' disables it)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    namespaces: list[str] = [] if args.all_namespaces else (args.namespace or list(SETTINGS.namespaces))
    handlers.WATCHED_NAMESPACES[:] = namespaces
    log_format = kopf.LogFormat.JSON if SETTINGS.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format, log_refkey="k8s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
        peering_name=args.peering,
        standalone=True if args.standalone else None,
    )


if __name__ == "__main__":
    main()
