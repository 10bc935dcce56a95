"""`python -m chat_service --host H --port P`: serve the app with uvicorn."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from .app import create_app
from .characters import CharacterConfigError
from .config import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    settings, host, port = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except (CharacterConfigError, OSError, ValueError) as exc:
        # Configuration mistakes: one clear line instead of a traceback, and a non-zero exit for the pod.
        print(f"chat_service: {exc}", file=sys.stderr)
        return 2
    # One worker: the model lives in this process; scale out with replicas (and PostgreSQL), not workers.
    # On SIGTERM uvicorn stops accepting, lets the requests and streams in flight finish (at most the grace time; the
    # pod's terminationGracePeriodSeconds covers it), then closes the store.
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), proxy_headers=True,
                timeout_graceful_shutdown=settings.shutdown_grace_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
