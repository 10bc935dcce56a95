"""`python -m finetune_operator`: run the operator (namespaced or cluster-wide, by flag or environment)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import kopf

from . import handlers as handlers  # registers the kopf handlers
from .settings import Settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune_operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable); default: FINETUNE_NAMESPACES, else cluster-wide")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--peering", default=None, help="peering object name (default: FINETUNE_PEERING_NAME)")
    parser.add_argument("--standalone", action="store_true", help="run without peering (a single replica)")
    parser.add_argument("--liveness", default=None,
                        help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz ('' disables it; "
                             "default: FINETUNE_LIVENESS_ENDPOINT)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace, environment: Settings) -> Settings:
    """The settings the operator runs with: the environment's, with the flags on top."""
    namespaces = () if args.all_namespaces else tuple(args.namespace) or environment.namespaces
    liveness = environment.liveness_endpoint if args.liveness is None else args.liveness
    return environment.model_copy(update={"namespaces": namespaces, "liveness_endpoint": liveness})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = resolve(args, Settings())
    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format, log_refkey="k8s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint or None,
        peering_name=args.peering,
        standalone=True if args.standalone else None,
        memo=kopf.Memo(settings=settings),  # the startup handler (handlers.configure) takes them from here
    )


if __name__ == "__main__":
    main()
