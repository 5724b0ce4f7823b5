"""Who may use the mounts. Both are mounted with allow_other, so every local
user reaches them: the files must carry SOURCE's owner and permission bits
(the snapshot's without write), and the kernel checks them for every user as
it does for SOURCE itself. Tried as user nobody with setpriv."""

from __future__ import annotations

import os
import stat
import subprocess

from conftest import AS_NOBODY, random_bytes, wait_until, write_image

MiB = 1 << 20
NOBODY = 65534


def as_nobody(*command) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, *map(str, command)], capture_output=True)


def nobody_reads(path) -> bool:
    result = as_nobody("head", "-c", "16", path)
    assert result.returncode == 0 or b"Permission denied" in result.stderr, result.stderr
    return result.returncode == 0


def nobody_writes(path) -> bool:
    result = as_nobody("dd", "if=/dev/zero", f"of={path}", "bs=512", "count=1",
                       "conv=notrunc", "status=none")
    assert (result.returncode == 0 or b"Permission denied" in result.stderr
            or b"Read-only file system" in result.stderr), result.stderr
    return result.returncode == 0


def test_a_private_disk_stays_private(public_tmp, mount):
    original = random_bytes(MiB, seed=1)
    source = write_image(public_tmp / "priv.img", original)
    source.chmod(0o600)
    inst = mount(source, sync="none", root=public_tmp)
    assert not nobody_reads(source), "the test's premise: nobody cannot read SOURCE"
    assert not nobody_reads(inst.snapshot), "the snapshot gave a 0600 disk to another user"
    assert not nobody_reads(inst.live)
    assert not nobody_writes(inst.live)

    # Every attribute the files report follows SOURCE (the snapshot without write).
    src, live, snap = source.stat(), inst.live.stat(), inst.snapshot.stat()
    assert stat.S_IMODE(live.st_mode) == 0o600
    assert stat.S_IMODE(snap.st_mode) == 0o400
    for attrs in (live, snap):
        assert stat.S_ISREG(attrs.st_mode)
        assert (attrs.st_uid, attrs.st_gid, attrs.st_size) == (src.st_uid, src.st_gid, src.st_size)
    assert live.st_mtime_ns == src.st_mtime_ns

    # Permissions given or taken on SOURCE reach the mounts.
    source.chmod(0o644)
    assert wait_until(lambda: nobody_reads(inst.snapshot), timeout=5)
    assert nobody_reads(inst.live)
    assert not nobody_writes(inst.live), "0644: nobody may read, not write"
    assert stat.S_IMODE(inst.snapshot.stat().st_mode) == 0o444
    os.chown(source, NOBODY, NOBODY)
    source.chmod(0o600)
    assert wait_until(lambda: inst.live.stat().st_uid == NOBODY, timeout=5)
    assert nobody_writes(inst.live), "the owner may write the live disk"
    assert nobody_reads(inst.snapshot)
    assert not nobody_writes(inst.snapshot)
    assert inst.snapshot.stat().st_uid == NOBODY
    assert inst.snapshot.read_bytes() == original
    os.chown(source, 0, 0)
    source.chmod(0o600)
    assert wait_until(lambda: not nobody_reads(inst.snapshot), timeout=5)
    inst.umount()
    assert source.read_bytes()[:512] == bytes(512)  # nobody's write, as the owner
