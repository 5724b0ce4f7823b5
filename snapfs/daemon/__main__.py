"""`python -m snapfs.daemon CONFIG_JSON [--ready-fd N]`: the live process,
as `snapfs mount` starts it in the background."""

import argparse
import sys

from snapfs.daemon.live import LiveDaemon
from snapfs.daemon.logs import run_logged, setup_logging
from snapfs.protocol import LiveConfig, Readiness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapfs.daemon")
    parser.add_argument("config")
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    setup_logging()
    readiness = Readiness(args.ready_fd)
    return run_logged(LiveDaemon(LiveConfig.from_json(args.config), readiness).run,
                      readiness, "live")


if __name__ == "__main__":
    sys.exit(main())
