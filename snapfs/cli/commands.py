"""The commands that talk to a running live disk: snapshot, release, status,
wait, cancel, umount (and mount, in start.py)."""

from __future__ import annotations

import json
import os
import sys
import time

from snapfs.cli import client
from snapfs.cli.checks import check_snapshot
from snapfs.cli.start import check_serving, cmd_mount
from snapfs.errors import UserError
from snapfs.units import human

#: how often `wait` and `cancel` look at the status (`wait` starts at
#: FIRST_POLL_SECONDS and doubles up to this: a copy that takes milliseconds,
#: a clone, is seen to end soon after it does)
POLL_SECONDS = 0.05
FIRST_POLL_SECONDS = 0.005
#: how often `wait` updates its progress line on a terminal
PROGRESS_SECONDS = 0.25
#: how long `umount` waits for the daemon to flush and exit
UMOUNT_TIMEOUT = 300


# --- snapshots ------------------------------------------------------------

def cmd_snapshot(args) -> int:
    if args.wait and args.sync == "none":
        raise UserError("--wait: nothing to wait for, sync mode none has no background copy")
    live = client.locate_live(args.live)
    info = client.status(live.instance)
    request = check_snapshot(args, info["source"], _source_status(info), info["format"],
                             live.point)
    taken = client.request(live.instance, "snapshot", request=request.to_dict())
    check_serving([taken["snapshot"]])
    if args.wait:
        return _wait_for_copy(live.instance, taken, args.snapshot, quiet=False)
    return 0


def _source_status(info: dict) -> os.stat_result | None:
    """SOURCE's status, to refuse it as a target (it may have been renamed)."""
    try:
        return os.stat(info["source"])
    except OSError:
        return None


def cmd_release(args) -> int:
    point = os.path.realpath(args.snapshot)
    try:
        where = client.locate(args.snapshot)
    except UserError:
        found = client.find_snapshot_anywhere(point)  # one left without a mount
        if found is None:
            raise UserError(f"{args.snapshot}: not a snapfs snapshot") from None
        instance = found[0]
    else:
        if where.kind != "snapshot":
            raise UserError(f"{args.snapshot}: a live disk, not a snapshot (snapfs umount "
                            "ends a live disk)")
        instance = where.instance
    client.request(instance, "release", snapshot=point, lazy=args.lazy)
    return 0


# --- status, wait, cancel, changes ----------------------------------------

def cmd_status(args) -> int:
    where = client.locate(args.path)
    if where.kind == "live":
        info = client.status(where.instance)
    else:
        info = client.snapshot_status(args.path)[1]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if where.kind == "live":
        lines = [f"live:      {info['live']}",
                 f"source:    {info['source']} ({info['format']}, {human(info['size'])})",
                 f"daemon:    pid {info['pid']}"]
        if info["bytes_changed"] is not None:
            lines.append(f"changed:   {human(info['bytes_changed'])} since the last completed "
                         f"backup ({info['checkpoints'][-1]['target']})")
        elif info["change_tracking_reset"]:
            lines.append(f"changed:   unknown ({info['change_tracking_reset']}); the next "
                         "backup must be a full one")
        lines.append(f"snapshots: {len(info['snapshots'])}")
        for snap in info["snapshots"]:
            lines += [""] + _snapshot_lines(snap)
    else:
        lines = _snapshot_lines(info)
    print("\n".join(lines))
    return 0


def _snapshot_lines(info: dict) -> list[str]:
    lines = [f"snapshot:  {info['snapshot']}",
             f"state:     {info['state']}" + (f" ({info['error']})" if info["error"] else ""),
             f"sync:      {info['sync']}" + (f" (on {info['base']})" if info["base"] else "")]
    if info["sync"] != "none":
        lines.append(f"copied:    {progress(info)}")
        if info.get("bytes_cloned"):
            lines.append(f"cloned:    {human(info['bytes_cloned'])} of them shared with SOURCE "
                         "(reflink), not copied")
    lines += [f"by writes: {info['clusters_copied_by_writes']} clusters of "
              f"{human(info['cluster_size'])} copied before a write",
              f"target:    {info['target']}"]
    if info.get("broken"):
        lines.append(f"broken:    {info['broken']}; every read of it fails")
    if info.get("failed_writes"):
        lines.append(f"failed:    {info['failed_writes']} writes to the live disk failed: "
                     f"{info['last_error']}")
    policy = info.get("on_cbw_error")
    if policy is not None:
        timeout = info.get("cbw_timeout")
        lines.append(f"on error:  {policy}" + (f", timeout {timeout:g} s" if timeout else ""))
    return lines


def cmd_export(args) -> int:
    where = client.locate(args.snapshot)
    if where.kind != "snapshot":
        raise UserError(f"{args.snapshot}: not a snapshot (only a snapshot is exported)")
    if args.socket is not None:
        socket_path = os.path.abspath(args.socket)
        if not os.path.isdir(os.path.dirname(socket_path)):
            raise UserError(f"socket {args.socket}: its directory does not exist")
        address = client.request(where.instance, "export", snapshot=where.point,
                                 socket=socket_path)
    else:
        if args.bind is None:
            raise UserError("--bind goes with --port")
        address = client.request(where.instance, "export", snapshot=where.point,
                                 port=args.port, bind=args.bind)
    print(address)
    return 0


def cmd_changes(args) -> int:
    where = client.locate(args.snapshot)
    if where.kind != "snapshot":
        raise UserError(f"{args.snapshot}: not a snapshot")
    info = client.request(where.instance, "changes", snapshot=where.point)
    changed = [e for e in info["extents"] if e["changed"]]
    if args.json:
        print(json.dumps(info["extents"], indent=2))
        return 0
    print(f"base:    {info['base']}")
    print(f"changed: {human(sum(e['length'] for e in changed))} in {len(changed)} extents")
    for extent in changed:
        print(f"{extent['start']:>16} {extent['length']:>14}")
    return 0


def progress(info: dict) -> str:
    """Percent, bytes done of total, rate and time left of a background copy."""
    total = info["bytes_total"]
    percent = 100 * info["bytes_done"] / total if total else 100.0
    text = f"{percent:3.0f}% {human(info['bytes_done'])} of {human(total)}"
    if info.get("rate") is not None:
        text += f", {human(info['rate'])}/s"
    if info.get("seconds_left") is not None:
        text += f", {duration(info['seconds_left'])} left"
    return text


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def cmd_wait(args) -> int:
    where, info = client.snapshot_status(args.path)
    if info.get("broken"):
        raise UserError(f"the snapshot is broken: {info['broken']}")
    if info["sync"] == "none":
        raise UserError("nothing to wait for: sync mode none has no background copy")
    return _wait_for_copy(where.instance, info, args.path, args.quiet)


def _wait_for_copy(instance: str, info: dict, path: str, quiet: bool) -> int:
    """Until the background copy of the snapshot `info` describes ends: 0 if
    it completed, else UserError saying how it ended. A progress line on a
    terminal unless `quiet`. Interrupted (Ctrl-C), it says that the snapshot
    stays."""
    show = sys.stdout is not None and sys.stdout.isatty() and not quiet
    try:
        info = _poll_until_ended(instance, info, path, show)
    except KeyboardInterrupt:
        print(f"snapfs: interrupted; the snapshot {path} stays and its copy goes on "
              "(snapfs wait, snapfs release)", file=sys.stderr)
        raise
    if info["state"] == "completed":
        return 0
    if info.get("broken"):
        raise UserError(f"the snapshot is broken: {info['broken']}")
    raise UserError(f"the background copy {info['state']}"
                    + (f": {info['error']}" if info["error"] else ""))


def _poll_until_ended(instance: str, info: dict, path: str, show: bool) -> dict:
    """The snapshot's status once its copy is no longer running; with `show`,
    a progress line updated in place meanwhile (and ended, however this ends)."""
    shown = 0.0
    pause = FIRST_POLL_SECONDS
    try:
        while info["state"] == "running":
            if show and time.monotonic() - shown >= PROGRESS_SECONDS:
                sys.stdout.write("\r\033[K" + progress(info))  # one line, updated in place
                sys.stdout.flush()
                shown = time.monotonic()
            time.sleep(pause)
            pause = min(2 * pause, POLL_SECONDS)
            now = _same_snapshot(instance, info)  # the daemon's errors say what they are
            if now is None:
                raise UserError(f"{path}: released or unmounted before the background "
                                "copy ended")
            info = now
    finally:
        if show and shown:
            sys.stdout.write("\r\033[K" + progress(info) + "\n")
            sys.stdout.flush()
    return info


def _same_snapshot(instance: str, info: dict) -> dict | None:
    """The status of the snapshot `info` describes, now; None once it is gone.
    Another snapshot taken since on the same directory is not it (its time
    of creation differs)."""
    for snap in client.status(instance)["snapshots"]:
        if snap["snapshot_dir"] == info["snapshot_dir"] and snap["created"] == info["created"]:
            return snap
    return None


def cmd_cancel(args) -> int:
    where, info = client.snapshot_status(args.path)
    client.request(where.instance, "cancel", snapshot=info["snapshot_dir"])
    return 0


# --- umount ---------------------------------------------------------------

def cmd_umount(args) -> int:
    live = client.locate_live(args.live)
    try:
        reply = client.request(live.instance, "umount", lazy=args.lazy)
    except client.DaemonGone:
        client.unmount_leftovers(live.instance)
        raise UserError(f"{args.live}: the daemon had died; unmounted what was left; "
                        "snapfs mount SOURCE LIVE brings its snapshots back") from None
    if args.lazy:
        return 0
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while client.process_running(reply["pid"]):
        if time.monotonic() > deadline:
            raise UserError(f"the snapfs daemon (pid {reply['pid']}) did not stop in time")
        time.sleep(POLL_SECONDS)
    left = client.unmount_leftovers(live.instance)
    if left:
        raise UserError(f"the daemon exited but left {', '.join(left)} mounted; unmounted now")
    return 0


COMMANDS = {"mount": cmd_mount, "snapshot": cmd_snapshot, "release": cmd_release,
            "changes": cmd_changes, "export": cmd_export, "status": cmd_status, "wait": cmd_wait, "cancel": cmd_cancel, "umount": cmd_umount}
