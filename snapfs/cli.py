"""The `snapfs` command: mount, status, wait, cancel, umount.

Every refusal is one line on stderr and exit code 1 (2 for command-line
syntax), checked before anything is created or mounted.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import select
import signal
import threading
import time

from snapfs import control, filelock, mounts
from snapfs.errors import UserError
from snapfs.units import human, parse_size
from snapfs.image import FORMATS, open_image
from snapfs.instance import (SYNC_MODES, MountConfig, Readiness, log_path, parse_readiness,
                             state_path)

QCOW2_MAGIC = b"QFI\xfb"
MIN_CLUSTER = 4 << 10
MAX_CLUSTER = 2 << 20
#: how long `umount` waits for the daemon to flush and exit
UMOUNT_TIMEOUT = 300
#: how long `mount` waits for the daemon to report its mounts up
START_TIMEOUT = 120


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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"snapfs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapfs", description="Point-in-time snapshots of a disk image in use.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = commands.add_parser("mount", help="mount SOURCE as a live disk and its snapshot")
    mount.add_argument("source", metavar="SOURCE", help="the disk image")
    mount.add_argument("live", metavar="LIVE", help="directory where the live disk appears")
    mount.add_argument("snapshot", metavar="SNAPSHOT",
                       help="directory where the point-in-time image appears")
    mount.add_argument("--target", required=True, metavar="TARGET",
                       help="the backup target file to create (sparse raw)")
    mount.add_argument("--format", choices=FORMATS,
                       help="SOURCE's format (default raw; never guessed from its contents)")
    mount.add_argument("--target-format", choices=FORMATS,
                       help="TARGET's format (default: SOURCE's format)")
    mount.add_argument("--sync", choices=SYNC_MODES, default="full",
                       help="what the background copy copies (default: full)")
    mount.add_argument("--cluster-size", type=_cluster_size, default=64 << 10, metavar="SIZE",
                       help="copy granularity, a power of two from 4K to 2M (default 64K)")
    mount.add_argument("--speed", type=_speed, metavar="RATE",
                       help="limit of the background copy in bytes/s (K/M/G suffixes)")
    mount.add_argument("--force", action="store_true", help="replace an existing TARGET")
    mount.add_argument("--foreground", action="store_true",
                       help="stay attached and log to stderr until unmounted")

    status = commands.add_parser("status", help="show the state of the background copy")
    status.add_argument("live", metavar="LIVE")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    for name, text in (("wait", "wait until the background copy ends"),
                       ("cancel", "stop the background copy")):
        commands.add_parser(name, help=text).add_argument("live", metavar="LIVE")
    umount = commands.add_parser("umount", help="unmount both mounts and stop the instance")
    umount.add_argument("live", metavar="LIVE")
    umount.add_argument("--lazy", action="store_true",
                        help="detach LIVE even while in use; the instance stops when "
                             "the last program using the disk lets go")
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # paths need not be UTF-8
        stream.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
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


# --- mount ----------------------------------------------------------------

def check_mount_args(args) -> "MountConfig":
    """Refuse bad input before anything is created; returns the config."""
    source = os.path.abspath(args.source)
    try:
        st = os.stat(source)
    except OSError as e:
        raise UserError(f"source {args.source}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"source {args.source}: not a regular file")
    try:
        os.close(os.open(source, os.O_RDWR))
    except OSError as e:
        raise UserError(f"source {args.source}: cannot open for reading and writing: "
                        f"{e.strerror}") from None
    if st.st_size == 0:
        raise UserError(f"source {args.source}: empty image")
    other = mounts.snapfs_mount_containing(source)
    if other:
        raise UserError(f"source {args.source}: inside the snapfs mount {other}")
    filelock.check_free(source, "source")
    fmt = args.format or "raw"
    if fmt == "raw":
        with open(source, "rb") as f:
            looks_qcow2 = f.read(4) == QCOW2_MAGIC
        if looks_qcow2 and args.format is None:
            raise UserError(f"source {args.source}: starts with the qcow2 magic; give "
                            "--format qcow2 for its guest view, or --format raw for its bytes")
        if looks_qcow2:
            print(f"snapfs: warning: source {args.source} starts with the qcow2 magic; "
                  "using its bytes as a raw disk, as --format raw asks", file=sys.stderr)
    open_image(source, fmt, writable=True).close()  # refuses what the driver cannot serve

    live, snapshot = (_check_mount_point(p, what) for p, what in
                      ((args.live, "LIVE"), (args.snapshot, "SNAPSHOT")))
    if live == snapshot:
        raise UserError(f"LIVE and SNAPSHOT are the same directory: {args.live}")
    if mounts.inside(live, snapshot) or mounts.inside(snapshot, live):
        raise UserError("LIVE and SNAPSHOT must not lie inside each other")
    real_source = os.path.realpath(source)
    for mount_point, what in ((live, "LIVE"), (snapshot, "SNAPSHOT")):
        if mounts.inside(real_source, mount_point):
            raise UserError(f"source {args.source}: lies inside {what} {mount_point}, "
                            "which the mount would cover")

    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(args.target))),
                          os.path.basename(args.target))
    target_dir = os.path.dirname(target)
    if not os.path.isdir(target_dir):
        raise UserError(f"target {args.target}: directory {os.path.dirname(args.target) or '.'} "
                        "does not exist")
    if not os.path.basename(args.target):
        raise UserError(f"target {args.target}: names a directory, not a file")
    for mount_point in (live, snapshot):
        if mounts.inside(target, mount_point):
            raise UserError(f"target {args.target}: inside the mount point {mount_point}")
    other = mounts.snapfs_mount_containing(target_dir)
    if other:
        raise UserError(f"target {args.target}: inside the snapfs mount {other}")
    for path in (target, state_path(target), log_path(target)):
        if os.path.realpath(path) == os.path.realpath(source) or _same_file(path, st):
            raise UserError(f"target {args.target}: is the source")
        if os.path.lexists(path):
            if not args.force:
                raise UserError(f"target {path}: already exists (use --force to replace it)")
            if not os.path.isfile(path):
                raise UserError(f"target {path}: exists and is not a regular file")
            filelock.check_free(path, "target")
    return MountConfig(source=source, live=live, snapshot=snapshot, target=target,
                       sync=args.sync, cluster_size=args.cluster_size, speed=args.speed,
                       force=args.force, format=fmt, target_format=args.target_format or fmt)


def _check_mount_point(path: str, what: str) -> str:
    real = os.path.realpath(path)
    if mounts.mount_type(real) is not None:
        raise UserError(f"{what} {path}: busy, something is mounted there already")
    if not os.path.exists(real):
        raise UserError(f"{what} {path}: no such directory")
    if not os.path.isdir(real):
        raise UserError(f"{what} {path}: not a directory")
    return real


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def cmd_mount(args) -> int:
    cfg = check_mount_args(args)
    if args.foreground:
        from snapfs import daemon

        daemon.setup_logging()
        return daemon.run_live(cfg, Readiness(None))

    log_file = log_path(cfg.target)
    read_end, write_end = os.pipe()
    with open(log_file, "w" if args.force else "x") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "snapfs.daemon", cfg.to_json(),
             "--ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,),
            start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        line = _read_line(pipe, start_timeout())
    if line is None:
        _stop_daemon(process, [cfg.live, cfg.snapshot])
        _remove_instance_files(cfg)
        raise UserError(f"the snapfs daemon did not report its mounts up within "
                        f"{start_timeout():g} s; stopped it")
    why = parse_readiness(line) if line else None
    if line and why is None:
        try:
            _check_serving([os.path.join(cfg.live, cfg.name),
                            os.path.join(cfg.snapshot, cfg.name)])
        except UserError:
            _stop_daemon(process, [cfg.live, cfg.snapshot])
            raise
        return 0
    process.wait()
    if why is None:
        raise UserError(f"the snapfs daemon exited before its mounts were up; see {log_file}")
    os.unlink(log_file)
    raise UserError(why)


def start_timeout() -> float:
    """How long `mount` waits for the daemon (SNAPFS_START_TIMEOUT seconds)."""
    return float(os.environ.get("SNAPFS_START_TIMEOUT", START_TIMEOUT))


def _read_line(pipe, timeout: float) -> str | None:
    """One line from `pipe` ("" at end of file), or None after `timeout` s."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            return None
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def _remove_instance_files(cfg: MountConfig) -> None:
    """After a start that was given up: the files the daemon may have made."""
    for path in (cfg.target, state_path(cfg.target), log_path(cfg.target)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _stop_daemon(process: subprocess.Popen, mount_points: list[str]) -> None:
    """Stop a daemon that came up wrong (its snapshot process with it: they
    share a process group), and leave nothing mounted."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=60)
            break
        except subprocess.TimeoutExpired:
            continue
    for path in mount_points:
        if mounts.mount_type(path):
            mounts.lazy_unmount(path)


def _check_serving(paths: list[str], timeout: float = 60) -> None:
    """Both files answer a stat: the mounts serve requests."""
    errors: list[str] = []

    def probe():
        for path in paths:
            try:
                os.stat(path)
            except OSError as e:
                errors.append(f"{path}: {e.strerror}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise UserError(f"the mounts do not answer: {', '.join(paths)}")
    if errors:
        raise UserError(f"the mounts do not work: {errors[0]}")


# --- the other commands ---------------------------------------------------

def cmd_status(args) -> int:
    info = control.status(control.live_mount(args.live))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [f"state:     {info['state']}" + (f" ({info['error']})" if info["error"] else ""),
             f"sync:      {info['sync']}"]
    if info["sync"] != "none":
        total = info["bytes_total"]
        percent = 100 * info["bytes_done"] / total if total else 100.0
        lines.append(f"copied:    {human(info['bytes_done'])} of {human(total)} ({percent:.0f}%)")
    lines += [f"by writes: {info['clusters_copied_by_writes']} clusters of "
              f"{human(info['cluster_size'])} copied before a write",
              f"live:      {info['live']}",
              f"snapshot:  {info['snapshot']}",
              f"source:    {info['source']}",
              f"target:    {info['target']}"]
    print("\n".join(lines))
    return 0


def cmd_wait(args) -> int:
    live = control.live_mount(args.live)
    info = control.status(live)
    if info["sync"] == "none":
        raise UserError("nothing to wait for: sync mode none has no background copy")
    while info["state"] == "running":
        time.sleep(0.05)
        try:
            info = control.status(live)
        except UserError:
            raise UserError(f"{args.live}: unmounted before the background copy ended") from None
    if info["state"] == "completed":
        return 0
    raise UserError(f"the background copy {info['state']}"
                    + (f": {info['error']}" if info["error"] else ""))


def cmd_cancel(args) -> int:
    live = control.live_mount(args.live)
    info = control.status(live)
    if info["sync"] == "none":
        raise UserError("nothing to cancel: sync mode none has no background copy")
    if info["state"] != "running":
        raise UserError(f"nothing to cancel: the background copy has {info['state']}")
    control.send(live, "cancel")
    while control.status(live)["state"] == "running":
        time.sleep(0.05)
    return 0


def cmd_umount(args) -> int:
    live = control.live_mount(args.live)
    try:
        info = control.status(live)
    except control.DaemonGone:
        mounts.lazy_unmount(live)
        raise UserError(f"{args.live}: the daemon had died; unmounted what was left; "
                        "the target may be incomplete") from None
    snapshot = os.path.dirname(info["snapshot"])
    if args.lazy:
        # The daemon serves whoever still has the disk open and stops, as
        # after any unmount, when the last of them lets go.
        mounts.lazy_unmount(live)
        return 0
    for point in (live, snapshot):
        held = mounts.holders(point)
        if held:
            raise UserError(f"{point} is busy, in use by {', '.join(held)}; nothing unmounted")
    # Unmounting the live mount (never while busy) stops the instance.
    why = mounts.unmount(live)
    if why is not None:
        held = mounts.holders(live)
        raise UserError(f"{live}: {why}" + (f", in use by {', '.join(held)}" if held else "")
                        + "; nothing unmounted")
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while control.process_running(info["pid"]):
        if time.monotonic() > deadline:
            raise UserError(f"the snapfs daemon (pid {info['pid']}) did not stop in time")
        time.sleep(0.05)
    left = [p for p in (live, snapshot) if mounts.mount_type(p)]
    if left:
        for path in left:
            mounts.lazy_unmount(path)
        raise UserError(f"the daemon exited but left {', '.join(left)} mounted; unmounted now")
    return 0


COMMANDS = {"mount": cmd_mount, "status": cmd_status, "wait": cmd_wait,
            "cancel": cmd_cancel, "umount": cmd_umount}

if __name__ == "__main__":
    sys.exit(main())
