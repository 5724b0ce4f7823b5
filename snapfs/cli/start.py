"""`snapfs mount`: check everything, start the live disk's daemon, and return
once its mounts serve requests."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

from snapfs import mounts
from snapfs.cli.checks import (check_machine, check_mount_point, check_not_covering, check_snapshot,
                               check_source)
from snapfs.errors import UserError
from snapfs.daemon.state import LiveState, check_trusted
from snapfs.protocol import LiveConfig, copymap_path, parse_readiness

#: how long `mount` waits for the daemon to report its mounts up
START_TIMEOUT = 120


def start_timeout() -> float:
    """How long `mount` waits for the daemon (SNAPFS_START_TIMEOUT seconds)."""
    return float(os.environ.get("SNAPFS_START_TIMEOUT", START_TIMEOUT))


def check_mount_args(args) -> LiveConfig:
    check_machine()
    given, fmt, st = check_source(args.source, args.format)
    # Everything the daemon keeps for SOURCE (its state directory) goes
    # beside the file itself, not beside a symbolic link to it.
    source = os.path.realpath(given)
    live = check_mount_point(args.live, "LIVE")
    on_file = not os.path.isdir(live)
    if live != source:  # mounting the live disk over its own file is fine
        check_not_covering(given, args.source, live, "LIVE")
    snapshot = None
    if args.snapshot is not None:
        if args.target is None:
            raise UserError("a SNAPSHOT needs --target TARGET")
        snapshot = check_snapshot(args, given, st, fmt, live)
    else:
        options = [option for option, value in (
            ("--target", args.target), ("--target-format", args.target_format),
            ("--sync", args.sync != "full"), ("--cluster-size", args.cluster_size != 64 << 10),
            ("--speed", args.speed), ("--force", args.force), ("--base", args.base)) if value]
        if options:
            raise UserError(f"{options[0]} is an option of a snapshot: give SNAPSHOT too, or "
                            "take one later with snapfs snapshot")
    return LiveConfig(source=source, live=live, name=os.path.basename(given), format=fmt,
                      snapshot=snapshot, on_file=on_file)


def cmd_mount(args) -> int:
    cfg = check_mount_args(args)
    if args.foreground:
        from snapfs.daemon.live import LiveDaemon
        from snapfs.daemon.logs import run_logged, setup_logging
        from snapfs.protocol import Readiness

        setup_logging()
        readiness = Readiness(None)
        return run_logged(LiveDaemon(cfg, readiness).run, readiness, "live")

    state = LiveState(cfg.source)
    try:
        had_state = state.make_dir()
        log_fd = os.open(state.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{state.dir}: {e.strerror}") from None
    directory, log_file = state.dir, state.log
    read_end, write_end = os.pipe()
    with os.fdopen(log_fd, "a") as log:
        try:
            check_trusted(log_file, directory=False, st=os.fstat(log.fileno()))
        except ValueError as e:
            raise UserError(str(e)) from None
        process = subprocess.Popen(
            # -P: never import from the working directory (it is the caller's)
            [sys.executable, "-P", "-m", "snapfs.daemon", cfg.to_json(), "--ready-fd",
             str(write_end)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,),
            start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        line = _read_line(pipe, start_timeout())
    if line is None:
        _stop_daemon(process, cfg)
        _remove_what_a_failed_start_made(cfg, directory, had_state)
        raise UserError(f"the snapfs daemon did not report its mounts up within "
                        f"{start_timeout():g} s; stopped it")
    why, info = parse_readiness(line) if line else ("", {})
    if why is None:
        paths = [cfg.file]
        if cfg.snapshot:
            paths.append(cfg.snapshot.file(cfg.name))
        try:
            check_serving(paths)
        except UserError:
            _stop_daemon(process, cfg)
            raise
        for warning in info.get("warnings", []):
            print(f"snapfs: warning: {warning}", file=sys.stderr)
        return 0
    process.wait()
    if not why:
        raise UserError(f"the snapfs daemon exited before its mounts were up; see {log_file}")
    if not had_state:
        shutil.rmtree(directory, ignore_errors=True)
    raise UserError(why)


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


def _stop_daemon(process: subprocess.Popen, cfg: LiveConfig) -> None:
    """Stop a daemon that came up wrong (its snapshot processes with it: they
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
    points = [cfg.live] + ([cfg.snapshot.snapshot] if cfg.snapshot else [])
    for point in points:
        if mounts.mount_type(point) in mounts.SNAPFS_FSTYPES:
            mounts.lazy_unmount(point)


def _remove_what_a_failed_start_made(cfg: LiveConfig, directory: str, had_state: bool) -> None:
    if cfg.snapshot:
        for path in (cfg.snapshot.target, copymap_path(cfg.snapshot.target)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    if not had_state:
        shutil.rmtree(directory, ignore_errors=True)


def check_serving(paths: list[str], timeout: float = 60) -> None:
    """The files answer a stat: the mounts serve requests."""
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
