"""The `snapfs` command line: its options, and one line for every error.

Every refusal is one line on stderr and exit code 1 (2 for command-line
syntax), checked before anything is created or mounted.
"""

from __future__ import annotations

import argparse
import os
import sys

from snapfs import __version__
from snapfs.errors import UserError
from snapfs.image import FORMATS
from snapfs.protocol import CBW_ERROR_POLICIES, SYNC_MODES
from snapfs.units import parse_size

MIN_CLUSTER = 4 << 10
MAX_CLUSTER = 2 << 20


def _cluster_size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad cluster size {text!r}") from None
    if size & (size - 1) or not MIN_CLUSTER <= size <= MAX_CLUSTER:
        raise argparse.ArgumentTypeError(
            f"bad cluster size {text!r}: must be a power of two from 4K to 2M")
    return size


def _speed(text: str) -> int:
    try:
        speed = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad speed {text!r}: bytes/s, e.g. 50M") from None
    if speed <= 0:
        raise argparse.ArgumentTypeError(f"bad speed {text!r}: must be more than 0")
    return speed


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}: seconds, e.g. 45") from None
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}: more than 0, at most 86400")
    return seconds


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: a number from 1 to 65535")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"snapfs: {message} (see {self.prog} --help)\n")


def _snapshot_options(parser: argparse.ArgumentParser, target_required: bool) -> None:
    parser.add_argument("--target", required=target_required, metavar="TARGET",
                        help="the backup target file to create")
    parser.add_argument("--target-format", choices=FORMATS,
                        help="TARGET's format (default: SOURCE's format)")
    parser.add_argument("--sync", choices=SYNC_MODES, default="full",
                        help="what the background copy copies (default: full)")
    parser.add_argument("--cluster-size", type=_cluster_size, default=64 << 10, metavar="SIZE",
                        help="copy granularity, a power of two from 4K to 2M (default 64K)")
    parser.add_argument("--speed", type=_speed, metavar="RATE",
                        help="limit of the background copy in bytes/s (K/M/G suffixes)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing TARGET (never one a running instance holds)")
    parser.add_argument("--on-cbw-error", choices=CBW_ERROR_POLICIES, default="break-guest-write",
                        help="when old data cannot be saved: fail the write (default) or "
                             "break the snapshot and let the write through")
    parser.add_argument("--cbw-timeout", type=_seconds, metavar="SECONDS",
                        help="a write whose copy-before-write takes longer fails as if the "
                             "copy had failed (default: no limit)")
    parser.add_argument("--base", metavar="BACKUP",
                        help="with --sync incremental: the completed backup (its target) to "
                             "build on, instead of the last one")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapfs", description="Point-in-time snapshots of a disk image in use.")
    parser.add_argument("--version", action="version", version=f"snapfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = commands.add_parser("mount", help="mount SOURCE as a live disk (and a first snapshot)")
    mount.add_argument("source", metavar="SOURCE", help="the disk image")
    mount.add_argument("live", metavar="LIVE", help="directory where the live disk appears")
    mount.add_argument("snapshot", metavar="SNAPSHOT", nargs="?",
                       help="directory where a snapshot taken now appears (needs --target)")
    mount.add_argument("--format", choices=FORMATS,
                       help="SOURCE's format (default raw; never guessed from its contents)")
    _snapshot_options(mount, target_required=False)
    mount.add_argument("--foreground", action="store_true",
                       help="stay attached and log to stderr until unmounted")

    snapshot = commands.add_parser("snapshot", help="take a snapshot of a live disk now")
    snapshot.add_argument("live", metavar="LIVE")
    snapshot.add_argument("snapshot", metavar="SNAPSHOT",
                          help="directory where the point-in-time image appears")
    _snapshot_options(snapshot, target_required=True)
    snapshot.add_argument("--wait", action="store_true",
                          help="return once the background copy has ended, as snapfs wait "
                               "does (not with --sync none)")

    release = commands.add_parser("release", help="end a snapshot; the live disk stays")
    release.add_argument("snapshot", metavar="SNAPSHOT")
    release.add_argument("--lazy", action="store_true",
                         help="detach SNAPSHOT even while in use; it ends when its last "
                              "user lets go")

    export = commands.add_parser("export", help="serve a snapshot read-only over NBD (nbdkit)")
    export.add_argument("snapshot", metavar="SNAPSHOT")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=_port, metavar="N", help="listen on this TCP port")
    export.add_argument("--bind", metavar="ADDR", default="127.0.0.1",
                        help="with --port: the address to listen on (default 127.0.0.1; "
                             "0.0.0.0 for every network)")

    changes = commands.add_parser("changes", help="list what an incremental snapshot copies")
    changes.add_argument("snapshot", metavar="SNAPSHOT")
    changes.add_argument("--json", action="store_true",
                         help="print the extents as qemu-img map --output=json does")

    status = commands.add_parser("status", help="show a live disk and its snapshots, or one "
                                                "snapshot")
    status.add_argument("path", metavar="LIVE|SNAPSHOT")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    wait = commands.add_parser("wait", help="wait until a snapshot's background copy ends")
    wait.add_argument("path", metavar="SNAPSHOT|LIVE")
    wait.add_argument("--quiet", action="store_true",
                      help="no progress line (there is none unless stdout is a terminal)")
    commands.add_parser("cancel", help="stop a snapshot's background copy").add_argument(
        "path", metavar="SNAPSHOT|LIVE")
    umount = commands.add_parser("umount", help="release every snapshot, unmount the live disk")
    umount.add_argument("live", metavar="LIVE")
    umount.add_argument("--lazy", action="store_true",
                        help="detach the mounts even while in use; the instance stops when "
                             "the last program using them lets go")
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # paths need not be UTF-8
        if stream is not None:  # None: started with that descriptor closed
            stream.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    from snapfs.cli import commands

    try:
        return commands.COMMANDS[args.command](args)
    except UserError as e:
        print(f"snapfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`snapfs status LIVE | head -1`): no traceback,
        # and no second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
