"""The workloads: what is done to a live disk, a snapshot or a copy, and how
fast it went (dd, fio), and whether the data came out right (cmp).

Each takes paths, so the same workload runs on snapfs' files and on QEMU's
FUSE exports alike.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess

from benchlib.config import KiB, MiB
from benchlib.host import MeasureError, PageCache, remove, run, timed

CLUSTER = 64 * KiB  # snapfs' default cluster size and qcow2's default cluster size


def fill_random(path: str, size: int, chunk: int = 4 * MiB) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def copy_file(source: str, dest: str) -> None:
    """A fresh copy of an image, as sparse as the original."""
    remove(dest)
    run(["cp", "--sparse=always", source, dest])


def fio(args: list[str], rw: str, depth: int | None = None) -> float:
    """Runs fio, returns the IOPS of `rw` ("read" or "write"): psync, or with
    `depth` libaio O_DIRECT with that many requests in flight."""
    engine = (["--ioengine=psync"] if depth is None else
              ["--ioengine=libaio", "--direct=1", f"--iodepth={depth}"])
    out = run(["fio", "--name=bench", *engine, "--fallocate=none",
               "--allow_file_create=0", "--output-format=json", *args], timeout=3600).stdout
    data = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    if job.get("error"):
        raise MeasureError(f"fio: error {job['error']}")
    return float(job[rw]["iops"])


def dd_write(source: str, dest: str, size: int) -> float:
    """dd bs=1M of `size` bytes with conv=notrunc,fdatasync; MB/s (input cached first)."""
    PageCache.load(source)
    seconds = timed(["dd", f"if={source}", f"of={dest}", "bs=1M", f"count={size // MiB}",
                     "conv=notrunc,fdatasync", "status=none"])
    return size / seconds / 1e6


def dd_read_cold(path: str, size: int) -> float:
    """dd bs=1M of the whole file after dropping the page cache; MB/s."""
    PageCache.drop()
    seconds = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return size / seconds / 1e6


def compare(path: str, reference: str, block_reads: bool) -> str | None:
    """None if the files are equal, else where they differ. With block_reads
    the file is read with dd bs=1M (the QEMU 7.2 snapshot-access bug)."""
    if block_reads:
        cmd = f"dd if={sh(path)} bs=1M status=none | cmp - {sh(reference)}"
    else:
        cmd = f"cmp {sh(path)} {sh(reference)}"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                            text=True, timeout=3600)
    if result.returncode == 0:
        return None
    text = result.stdout.strip() or result.stderr.strip()
    found = re.search(r"differ: (?:char|byte) (\d+)", text)
    if found:
        return f"first difference at byte {int(found.group(1)) - 1:,}"
    return text


def sh(text: str) -> str:
    """`text` quoted for bash."""
    return "'" + text.replace("'", "'\\''") + "'"


def replay_log(path: str, disk: str, clusters: list[int], seed: int) -> None:
    """An fio iolog: one 4 KiB write at a random 4 KiB block of each cluster."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write(f"fio version 2 iolog\n{disk} add\n{disk} open\n")
        for c in clusters:
            f.write(f"{disk} write {c * CLUSTER + rng.randrange(CLUSTER // (4 * KiB)) * 4 * KiB}"
                    f" {4 * KiB}\n")
        f.write(f"{disk} close\n")
