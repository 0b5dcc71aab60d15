"""`fused-lora merge` when the run does not end normally: stop signals (a real child process signalled while it
is known to be mid-write), leftovers of a merge killed outright, and I/O failures at every kind of write. In
every case: the documented exit status, one line on stderr naming what happened, no hidden folder left, --out
as it was, the inputs unmodified."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_merge_cli import base_tensors, lora_pair, write_adapter, write_base

from fused_lora.merge_cli import signals
from fused_lora.merge_cli.cli import main
from fused_lora.merge_cli.hooks import PAUSE_ENV

fcntl = pytest.importorskip("fcntl")  # flock, and the POSIX signals below

SHARD1 = "model-00001-of-00002.safetensors"
# The child resets the stop signals to their defaults first: whoever runs pytest (nohup, a CI runner) may have
# left them ignored, and an ignored signal is rightly left ignored by the merge.
CHILD = (
    "import signal, sys\n"
    "for s in (signal.SIGTERM, signal.SIGHUP): signal.signal(s, signal.SIG_DFL)\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from fused_lora.merge_cli.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture
def sharded(tmp_path):
    torch.manual_seed(7)
    base = base_tensors()
    write_base(tmp_path / "base", base, shards=[list(base)[:3], list(base)[3:]])
    ad = lora_pair("model.layers.0.q_proj", 37, 29, 4)
    ad.update(lora_pair("model.layers.1.up", 29, 37, 4))
    write_adapter(tmp_path / "ad", ad)
    return tmp_path


def snapshot(*folders):
    return {p: (p.read_bytes(), p.stat().st_mode) for f in folders for p in f.rglob("*") if p.is_file()}


def hidden(parent, name="out"):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def argv(tmp, *extra):
    return ["--base", str(tmp / "base"), "--adapter", str(tmp / "ad"), "--out", str(tmp / "out"), *extra]


def start_paused(tmp, *extra):
    """A merge child paused (test hook) right after the first tensor of the first shard was written."""
    marker = tmp / "paused"
    env = dict(os.environ, **{PAUSE_ENV: str(marker)})
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv(tmp, *extra)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the merge ended (status {proc.returncode}) without pausing: {out} {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the merge did not reach the pause point in 180 s")
        time.sleep(0.02)
    assert int(marker.read_text()) == proc.pid
    return proc


def assert_mid_write(tmp):
    """The child really is mid-write: its hidden folder holds a partial first shard (and its lock is held)."""
    folders = [n for n in hidden(tmp) if not n.endswith(".lock")]
    assert len(folders) == 1, hidden(tmp)
    partial = tmp / folders[0] / SHARD1
    assert partial.exists() and 0 < partial.stat().st_size < (tmp / "base" / SHARD1).stat().st_size
    return folders[0]


def assert_lock_held(lock_path):
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


@pytest.mark.parametrize("signame, existing_out", [("SIGTERM", False), ("SIGHUP", True)])
def test_stop_signal_mid_write_cleans_up_and_exits_128_plus_n(sharded, signame, existing_out):
    tmp = sharded
    extra = []
    if existing_out:
        os.makedirs(tmp / "out")
        (tmp / "out" / "keep").write_text("previous result")
        extra = ["--force"]
    inputs = snapshot(tmp / "base", tmp / "ad")
    proc = start_paused(tmp, *extra)
    stem = assert_mid_write(tmp)
    if os.path.exists(tmp / f"{stem}.lock"):
        assert_lock_held(tmp / f"{stem}.lock")
    signum = getattr(signal, signame)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {signame}" in lines[0] and "temporary files removed" in lines[0], err
    assert out == ""
    assert hidden(tmp) == [], "hidden folder or lock file left behind"
    if existing_out:
        assert os.listdir(tmp / "out") == ["keep"] and (tmp / "out" / "keep").read_text() == "previous result"
    else:
        assert not (tmp / "out").exists()
    assert snapshot(tmp / "base", tmp / "ad") == inputs, "inputs modified"


def test_next_run_removes_what_a_killed_merge_left(sharded, capsys):
    tmp = sharded
    inputs = snapshot(tmp / "base", tmp / "ad")
    proc = start_paused(tmp)
    stem = assert_mid_write(tmp)
    proc.send_signal(signal.SIGKILL)  # no handler runs: what is left is what kill -9 or a power loss leaves
    proc.communicate(timeout=60)
    assert stem in hidden(tmp)
    code = main(argv(tmp))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"removed stale temporary folder {tmp / stem}" in out and f"pid {proc.pid}" in out, out
    assert hidden(tmp) == []
    assert set(load_file(tmp / "out" / SHARD1)) == {
        "model.layers.0.q_proj.weight",
        "model.layers.0.q_proj.bias",
        "model.layers.0.o_proj.weight",
    }
    assert snapshot(tmp / "base", tmp / "ad") == inputs


def make_leftover(parent, stem, *, folder=True, aside=False, lock=True):
    if lock:
        (parent / f"{stem}.lock").write_bytes(b"")
    if folder:
        os.makedirs(parent / stem)
        (parent / stem / SHARD1).write_bytes(b"half a shard")
    if aside:
        os.makedirs(parent / f"{stem}.old")
        (parent / f"{stem}.old" / "keep").write_text("previous result")


def test_sweep_removes_only_dead_leftovers_of_this_output(sharded, capsys):
    tmp = sharded
    os.makedirs(tmp / "out")
    dead, dead_aside = ".out.tmp-4000001-0123abcd", ".out.tmp-4000002-00ff00ff"
    live = ".out.tmp-4000003-89abcdef"
    make_leftover(tmp, dead)
    make_leftover(tmp, dead_aside, folder=False, aside=True)  # died after the swap: the new --out is in place
    make_leftover(tmp, live)
    kept = [
        ".other.tmp-4000001-0123abcd",
        ".other.tmp-4000001-0123abcd.lock",  # another output's
        ".out.tmp-notes",
        ".out.tmp-4000004-0123abcd.bak",
        ".out.tmp-4000005-ABCDEF01",  # not our pattern
        ".out.tmp-abcd_123",
    ]  # an older fused_lora's name: cannot tell whether it is live
    for name in kept:
        (tmp / name).mkdir() if not name.endswith(".lock") else (tmp / name).write_bytes(b"")
    holder = os.open(tmp / f"{live}.lock", os.O_RDONLY)  # a running merge holds its lock
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code = main(argv(tmp, "--force"))
        out, err = capsys.readouterr()
        assert code == 0, err
        assert f"removed stale temporary folder {tmp / dead}" in out
        assert f"removed {tmp / dead_aside}.old" in out
        assert f"left {tmp / live} alone: merge pid 4000003 is still writing it" in out
        assert f"left {tmp / '.out.tmp-abcd_123'} alone" in out
        assert sorted(hidden(tmp)) == sorted([live, f"{live}.lock"] + [n for n in kept if n.startswith(".out.")])
        assert all((tmp / name).exists() for name in kept)
        assert (tmp / live / SHARD1).read_bytes() == b"half a shard"
        assert sorted(os.listdir(tmp / "out")) == [
            "config.json",
            SHARD1,
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]
    finally:
        os.close(holder)


def test_sweep_puts_back_an_output_a_killed_merge_had_moved_aside(sharded, capsys):
    """Killed between the two renames of --force's swap: --out is missing and the previous one sits in STEM.old."""
    tmp = sharded
    stem = ".out.tmp-4000001-0123abcd"
    make_leftover(tmp, stem, aside=True)
    code = main(argv(tmp))  # no --force: the restored --out must now stop the merge
    out, err = capsys.readouterr()
    assert code == 2 and "already exists" in err, err
    assert f"restored {tmp / 'out'} from {tmp / stem}.old" in out, out
    assert os.listdir(tmp / "out") == ["keep"] and hidden(tmp) == []


def test_sweep_never_touches_an_input_that_matches_the_pattern(sharded, capsys):
    tmp = sharded
    stem = ".out.tmp-4000001-0123abcd"
    shutil.copytree(tmp / "base", tmp / stem)
    (tmp / f"{stem}.lock").write_bytes(b"")
    inputs = snapshot(tmp / stem)
    code = main(["--base", str(tmp / stem), "--adapter", str(tmp / "ad"), "--out", str(tmp / "out")])
    _out, err = capsys.readouterr()
    assert code == 0, err
    assert snapshot(tmp / stem) == inputs and (tmp / f"{stem}.lock").exists()


# ---- I/O failures, injected where the output is written (in-process) --------------------------------------

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name attached


def _in_workspace(path) -> bool:
    return os.path.basename(os.path.dirname(os.fspath(path))).startswith(".out.tmp-")


class FailingFile:
    """A real file whose write number `fail_at` (1-based) raises `error`."""

    def __init__(self, f, fail_at, error):
        self._f, self._fail_at, self._error, self._calls = f, fail_at, error, 0

    def write(self, data):
        self._calls += 1
        if self._calls >= self._fail_at:
            raise self._error
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def inject(monkeypatch, kind):
    """Make one kind of output write fail; returns (what the one line must name, the cause it must give)."""
    real_open, real_rename, real_fsync = builtins.open, os.rename, os.fsync
    real_mkdir, real_os_open = os.mkdir, os.open

    def failing_open(target, fail_at, error):
        def fake(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and os.path.basename(os.fspath(file)) == target and _in_workspace(file):
                return FailingFile(f, fail_at, error)
            return f

        monkeypatch.setattr(builtins, "open", fake)

    if kind == "shard_data":  # write 1 is the header, write 2 the first tensor's bytes
        failing_open(SHARD1, 2, ENOSPC)
        return SHARD1, "No space left on device (ENOSPC)"
    if kind == "index_json":
        failing_open("model.safetensors.index.json", 1, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
        return "model.safetensors.index.json", "Disk quota exceeded (EDQUOT)"
    if kind == "config_copy":
        failing_open("config.json", 1, ENOSPC)
        return "config.json", "No space left on device (ENOSPC)"
    if kind == "open_read_only":

        def fake(file, mode="r", *args, **kwargs):
            if "w" in mode and _in_workspace(file) and os.path.basename(os.fspath(file)) == "tokenizer.json":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake)
        return "tokenizer.json", "Read-only file system (EROFS)"
    if kind == "fsync":  # where delayed allocation or NFS report a full disk

        def fake_fsync(fd):
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "model-00002-of-00002.safetensors":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fake_fsync)
        return "model-00002-of-00002.safetensors", "Input/output error (EIO)"
    if kind == "create_workspace":  # the folder of --out is read-only

        def refuse(path):
            if os.path.basename(os.fspath(path)).startswith(".out."):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

        def fake_mkdir(path, *args, **kwargs):
            refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def fake_os_open(path, *args, **kwargs):
            refuse(path)
            return real_os_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "open", fake_os_open)
        return ".out.tmp-", "Read-only file system (EROFS)"
    if kind in ("rename", "rename_over_existing", "move_aside"):

        def fake_rename(src, dst, *args, **kwargs):
            src_name = os.path.basename(os.fspath(src))
            if kind == "move_aside":
                hit = os.path.basename(os.fspath(src)) == "out"
            else:  # the finished folder into place (not the restore of a moved-aside --out)
                hit = src_name.startswith(".out.tmp-") and not src_name.endswith(".old")
            if hit:
                raise OSError(
                    errno.EPERM if kind == "rename_over_existing" else errno.EROFS,
                    os.strerror(errno.EPERM if kind == "rename_over_existing" else errno.EROFS),
                    os.fspath(src),
                    os.fspath(dst),
                )
            return real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "rename", fake_rename)
        if kind == "rename_over_existing":
            return "out", "Operation not permitted (EPERM)"
        return "out", "Read-only file system (EROFS)"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "shard_data",
        "index_json",
        "config_copy",
        "open_read_only",
        "fsync",
        "create_workspace",
        "rename",
        "rename_over_existing",
        "move_aside",
    ],
)
def test_io_failure_exit_3_names_path_and_cause_nothing_left(sharded, capsys, monkeypatch, kind):
    tmp = sharded
    existing = kind in ("rename_over_existing", "move_aside")
    if existing:
        os.makedirs(tmp / "out")
        (tmp / "out" / "keep").write_text("previous result")
    inputs = snapshot(tmp / "base", tmp / "ad")
    names, cause = inject(monkeypatch, kind)
    code = main(argv(tmp, "--force", "--quiet"))
    monkeypatch.undo()
    _out, err = capsys.readouterr()
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("fused-lora merge: error: cannot ") and cause in line, line
    assert f"{tmp}{os.sep}" in line and names in line, line  # the full path of what could not be written
    assert line.endswith(f"{tmp / 'out'} unchanged"), line
    assert hidden(tmp) == [], "hidden folder or lock file left behind"
    if existing:
        assert os.listdir(tmp / "out") == ["keep"] and (tmp / "out" / "keep").read_text() == "previous result"
    else:
        assert not (tmp / "out").exists()
    assert snapshot(tmp / "base", tmp / "ad") == inputs, "inputs modified"


def test_previous_output_survives_when_it_cannot_be_put_back(sharded, capsys, monkeypatch):
    """--force, the final rename fails and so does putting the previous --out back: it must stay whole under its
    hidden name, be named on stderr, and be put back by the next run."""
    tmp = sharded
    os.makedirs(tmp / "out")
    (tmp / "out" / "keep").write_text("previous result")
    real_rename = os.rename

    def fake_rename(src, dst, *args, **kwargs):
        if os.fspath(dst) == str(tmp / "out"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(src), os.fspath(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", fake_rename)
    code = main(argv(tmp, "--force", "--quiet"))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    aside = [n for n in hidden(tmp) if n.endswith(".old")]
    assert len(aside) == 1 and f"could not remove {tmp / aside[0]} (holds the previous {tmp / 'out'}" in err, err
    assert (tmp / aside[0] / "keep").read_text() == "previous result"
    assert sorted(hidden(tmp)) == sorted([aside[0], aside[0][: -len(".old")] + ".lock"])
    code = main(argv(tmp))
    out, err = capsys.readouterr()
    assert code == 2 and "already exists" in err and f"restored {tmp / 'out'}" in out, (out, err)
    assert os.listdir(tmp / "out") == ["keep"] and hidden(tmp) == []


def _can_mount_tmpfs(where) -> str:
    """'' if a private tmpfs can be mounted (user + mount namespace: nothing outlives the child), else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64k tmpfs "$0"',
            str(where),
        ],
        capture_output=True,
        text=True,
    )
    return "" if probe.returncode == 0 else f"cannot mount a tmpfs here: {probe.stderr.strip()}"


def test_real_disk_full_on_a_tiny_tmpfs(tmp_path):
    """A real ENOSPC: --out on a 64 KiB tmpfs, the shard needs 80 KiB."""
    mount = tmp_path / "small"
    mount.mkdir()
    why = _can_mount_tmpfs(mount)
    if why:
        pytest.skip(why)
    torch.manual_seed(3)
    write_base(tmp_path / "base", {"model.layers.0.q_proj.weight": torch.randn(160, 128)})
    write_adapter(tmp_path / "ad", lora_pair("model.layers.0.q_proj", 160, 128, 4))
    inputs = snapshot(tmp_path / "base", tmp_path / "ad")
    driver = (
        "import json, os, sys\nfrom fused_lora.merge_cli.cli import main\n"
        "code = main(sys.argv[2:])\n"
        "print(json.dumps({'code': code, 'left': sorted(os.listdir(sys.argv[1]))}))\n"
    )
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"',
            str(mount),
            sys.executable,
            "-c",
            driver,
            str(mount),
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(mount / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines()
    assert result["code"] == 3, proc.stderr
    assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0], proc.stderr
    assert str(mount) in lines[0] and "model.safetensors" in lines[0], lines[0]
    assert result["left"] == [], result  # nothing on the full file system: no hidden folder, no lock file
    assert snapshot(tmp_path / "base", tmp_path / "ad") == inputs


# ---- the signal machinery itself ----------------------------------------------------------------------------


def _wait_pending():
    for _ in range(200):
        if signals.pending() is not None:
            return
        time.sleep(0.005)


def test_signals_wait_outside_interruptible_regions_and_count_once():
    """Cleanup and the final rename run outside interruptible regions: a signal there waits, it never cuts them
    short; the next interruptible region raises it; a second signal while stopping is not raised again."""
    before = signal.getsignal(signal.SIGTERM)
    with signals.handled():
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_pending()
        assert signals.pending() == signal.SIGTERM  # arrived, not raised
        with pytest.raises(signals.Stopped) as info:
            with signals.interruptible():
                pass
        assert info.value.exit_status == 143 and info.value.name == "SIGTERM"
        with signals.interruptible():
            os.kill(os.getpid(), signal.SIGHUP)  # while stopping already: ignored
            time.sleep(0.05)
        assert signals.pending() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_ignored_signal_stays_ignored():
    """nohup ignores SIGHUP; a merge started under it must not die of a hangup."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.handled():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_help_documents_exit_codes_and_cleanup(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "0       merged",
        "2       bad input",
        "3       I/O error",
        "143 SIGTERM",
        "130 SIGINT",
        "129 SIGHUP",
        ".OUT.tmp-PID-XXXXXXXX",
        "removed by the next merge",
    ):
        assert needle in text, needle
