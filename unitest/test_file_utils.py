"""The safety helpers every write, replace, lock and read of the library goes through."""

import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from utils.file_utils import (
    PARTIAL_MARKER,
    UnsafePathError,
    atomic_write,
    check_model_name,
    check_replaceable,
    file_lock,
    path_problem,
    read_regular_file,
    recover_replacements,
    replace_dir,
    write_json_atomic,
)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/tmp/x", "../x", "..\\x", ".hidden", "a b", "x" * 129,
                                  "a\nb", None, 3])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid model name"):
        check_model_name(name)


@pytest.mark.parametrize("name", ["coco", "my_coco-2", "coco.v2", "A1"])
def test_plain_model_names_are_accepted(name):
    assert check_model_name(name) == name


def test_atomic_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", "hello")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o077)
        path = write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]  # no temporary left


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(path, b"bytes in text mode")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _ours(directory):
    return (directory / "config.json").is_file()


def _write(directory):
    (directory / "config.json").write_text("{}")
    (directory / "weights").write_text("new")


def test_replace_dir_refuses_folders_that_are_not_ours(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafePathError, match="not a folder written by this library"):
        replace_dir(precious, _write, is_ours=_ours)
    assert (precious / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "file"
    afile.write_text("data")
    with pytest.raises(UnsafePathError):
        replace_dir(afile, _write, is_ours=_ours)
    assert afile.read_text() == "data"
    link = tmp_path / "link"
    os.symlink(precious, link)
    with pytest.raises(UnsafePathError):
        replace_dir(link, _write, is_ours=lambda d: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "precious"]


def test_replace_dir_replaces_ours_only_with_overwrite(tmp_path):
    target = tmp_path / "model"
    replace_dir(target, _write, is_ours=_ours)
    (target / "weights").write_text("old")
    with pytest.raises(UnsafePathError, match="overwrite"):
        replace_dir(target, _write, is_ours=_ours, overwrite=False)
    assert (target / "weights").read_text() == "old"
    replace_dir(target, _write, is_ours=_ours, overwrite=True)
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or old copy left


def test_replace_dir_accepts_an_empty_folder_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    replace_dir(target, _write, is_ours=_ours)
    assert (target / "weights").read_text() == "new"

    def fail(directory):
        (directory / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_dir(tmp_path / "other", fail, is_ours=_ours)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_read_regular_file_refuses_special_files_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    done = []
    reader = threading.Thread(target=lambda: done.append(path_problem(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    assert done and "FIFO" in done[0]
    with pytest.raises(UnsafePathError, match="FIFO"):
        read_regular_file(fifo)
    zero = tmp_path / "zero.jpg"
    os.symlink("/dev/zero", zero)
    with pytest.raises(UnsafePathError, match="character device"):
        read_regular_file(zero)
    dangling = tmp_path / "gone.jpg"
    os.symlink(tmp_path / "nothing", dangling)
    with pytest.raises(UnsafePathError, match="dangling"):
        read_regular_file(dangling)
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    with pytest.raises(UnsafePathError, match="loop"):
        read_regular_file(loop)
    with pytest.raises(UnsafePathError, match="directory"):
        read_regular_file(tmp_path)


def test_read_regular_file_is_bounded(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1000)
    assert read_regular_file(path, max_bytes=1000) == b"x" * 1000
    with pytest.raises(UnsafePathError, match="exceeds the limit of 999 bytes"):
        read_regular_file(path, max_bytes=999)


def _append_under_lock(path, value):
    for _ in range(20):
        with file_lock(path):
            data = json.loads(path.read_text()) if path.exists() else []
            data.append(value)
            write_json_atomic(path, data)


def test_file_lock_serialises_read_merge_write_across_processes(tmp_path):
    path = tmp_path / "shared.json"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_under_lock, args=(path, i)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    data = json.loads(path.read_text())
    assert sorted(data) == sorted([i for i in range(3) for _ in range(20)])


# ------------------------------------------------------------------------------------------- JSON files


def _depth(value):
    if isinstance(value, dict | list):
        items = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(v) for v in items), default=0)
    return 0


def test_json_depth_is_found_without_parsing():
    """Against the parsed depth, on random JSON whose strings hold brackets, quotes and backslashes."""
    import random

    from utils.file_utils import json_depth_exceeds

    rng = random.Random(0)

    def text():
        return "".join(rng.choice('ab[]{}"\\\né') for _ in range(rng.randint(0, 5)))

    def value(level):
        roll = rng.random()
        if level > 6 or roll < 0.3:
            return rng.choice([text(), 1, None, 2.5])
        if roll < 0.65:
            return [value(level + 1) for _ in range(rng.randint(0, 3))]
        return {text(): value(level + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(3000):
        item = value(0)
        data = json.dumps(item, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        depth = _depth(item)
        for limit in range(max(0, depth - 1), depth + 2):
            assert json_depth_exceeds(data, limit) == (depth > limit), (data, limit)


def test_read_json_bounds_nesting_and_names_the_file(tmp_path):
    from utils.file_utils import MAX_JSON_DEPTH, read_json

    path = tmp_path / "x.json"
    for content, message in (("[" * 100_000 + "]" * 100_000, "nested more than"), ("{not json", "not valid JSON"),
                             (b"\xff\xfe{}", "not UTF-8")):
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        with pytest.raises(ValueError, match=f"{path}.*{message}|{path}: {message}"):
            read_json(path, 1 << 20)
    path.write_text("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert _depth(read_json(path, 1 << 20)) == MAX_JSON_DEPTH
    path.write_bytes(b'\xef\xbb\xbf{"a": "\\"]"}')  # a BOM; an escaped quote before a bracket in a string
    assert read_json(path, 1 << 20, max_depth=1) == {"a": '"]'}
    with pytest.raises(UnsafePathError, match="exceeds the limit"):
        read_json(path, 4)


def test_json_text_keeps_undecodable_file_names_lossless():
    from utils.file_utils import json_text

    name = os.fsdecode(b"/photos/caf\xe9 \xc3\xa9.jpg")  # one undecodable byte, one valid UTF-8 character
    text = json_text({name: "é"})
    assert "\\udce9" in text and "é" in text
    assert os.fsencode(next(iter(json.loads(text.encode("utf-8").decode("utf-8"))))) == b"/photos/caf\xe9 \xc3\xa9.jpg"


def test_check_writable_dir(tmp_path, monkeypatch):
    import collections
    import errno

    from utils.file_utils import check_writable_dir

    (tmp_path / "file").write_text("mine")
    for directory in (tmp_path / "file", tmp_path / "file" / "a" / "b"):
        with pytest.raises(OSError, match=f"cannot write into {directory}: {tmp_path / 'file'} is a regular file"):
            check_writable_dir(directory)
    assert check_writable_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created, the probe removed
    stat_result = collections.namedtuple("Stat", "f_bavail f_frsize")
    monkeypatch.setattr(os, "statvfs", lambda path: stat_result(10, 4096))
    with pytest.raises(OSError, match="no space left on the device") as info:
        check_writable_dir(tmp_path)
    assert info.value.errno == errno.ENOSPC


# ------------------------------------------------------------------------------- kill -9 during a replacement
# A writer killed (SIGKILL) at any point of `replace_dir` leaves a state that the next run touching the folder
# finishes or rolls back; stale temporaries of dead writers are removed; live writers and foreign folders are
# never touched. The child processes below pause at a chosen point (a patched function signals, then sleeps)
# and are killed there: the states are those of a real kill, reached deterministically.

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r'''
import os, sys, time
from pathlib import Path
import utils.file_utils as fu

target, pause_at, signal_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def pause():
    signal_file.write_text("paused")
    time.sleep(600)

def write(staging):
    (staging / "config.json").write_text("new")
    (staging / "weights").write_bytes(b"n" * 1000)
    if pause_at == "write":
        pause()

if pause_at in ("between_renames", "deleting_old"):
    real_rename, real_unlink = os.rename, os.unlink
    def rename(a, b):
        real_rename(a, b)
        if pause_at == "between_renames" and ".old." in str(b):  # the target renamed aside
            pause()
    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if pause_at == "deleting_old" and (".old." in str(path) or kwargs.get("dir_fd") is not None):
            pause()
    fu.os.rename, fu.os.unlink = rename, unlink
fu.replace_dir(target, write, is_ours=lambda p: (p / "config.json").is_file())
'''


def _start_paused_writer(target, pause_at, tmp_path):
    """A child process replacing ``target``, paused at ``pause_at``; returns it once it is there."""
    signal_file = tmp_path / f"paused-{pause_at}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target), pause_at, str(signal_file)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not signal_file.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the writer did not reach its pause"
        time.sleep(0.02)
    return child


def _kill(child):
    child.send_signal(signal.SIGKILL)
    child.wait(30)


def _old_model(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "weights").write_bytes(b"o" * 1000)
    return target


def test_a_writer_killed_between_the_two_renames_is_finished_by_the_next_run(tmp_path):
    target = _old_model(tmp_path)
    child = _start_paused_writer(target, "between_renames", tmp_path)
    assert not target.exists()  # the window of the kill: the old copy aside, the new one not yet in place
    assert recover_replacements(tmp_path, "m") == {"published": [], "restored": [], "removed": []}  # alive
    assert len(list(tmp_path.glob(".m.*"))) == 2
    _kill(child)
    done = recover_replacements(tmp_path, "m")
    assert done["published"] == [str(target)]
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]  # no marker in a published folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m")) == []


def test_a_writer_killed_while_writing_leaks_nothing_and_keeps_the_old_copy(tmp_path):
    target = _old_model(tmp_path)
    _kill(_start_paused_writer(target, "write", tmp_path))
    assert len(list(tmp_path.glob(".m.*.tmp"))) == 1  # the staged copy of the dead writer
    replace_dir(target, _write, is_ours=_ours)  # the next save removes it
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m")] == []


def test_a_writer_killed_while_deleting_the_old_copy_leaves_it_to_the_next_run(tmp_path):
    target = _old_model(tmp_path)
    _kill(_start_paused_writer(target, "deleting_old", tmp_path))
    assert (target / "config.json").read_text() == "new"
    assert len(list(tmp_path.glob(".m.old.*"))) == 1  # half deleted
    check_replaceable(target, _ours)  # any run touching the folder (here: the check before a save)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m")] == []
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]


def _mark(directory, target, state):
    directory.mkdir()
    (directory / "config.json").write_text(state)
    (directory / PARTIAL_MARKER).write_text(json.dumps({"library": "image_captioning", "target": target,
                                                        "state": state, "pid": 1}))
    return directory


def test_recovery_rolls_back_when_no_complete_copy_exists(tmp_path):
    _mark(tmp_path / ".m.12-ab.tmp", "m", "writing")
    _mark(tmp_path / ".m.old.12-cd", "m", "old")
    done = recover_replacements(tmp_path)
    assert done["restored"] == [str(tmp_path / "m")]
    assert (tmp_path / "m" / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json"]


def test_recovery_never_touches_foreign_folders_or_a_live_writer(tmp_path):
    foreign = [tmp_path / ".m.12-ab.tmp", tmp_path / ".m.old.12-cd", tmp_path / ".m.13-ef.tmp",
               tmp_path / ".m.14-gh.tmp", tmp_path / "m.old.12-cd", tmp_path / ".m.old.15-ij"]
    foreign[0].mkdir()  # our name, no marker
    (foreign[0] / "data").write_text("someone's")
    foreign[1].mkdir()
    _mark(foreign[2], "other", "complete")  # a marker for another target
    foreign[3].mkdir()
    (foreign[3] / PARTIAL_MARKER).write_text(json.dumps({"library": "elsewhere", "target": "m", "state": "writing"}))
    _mark(foreign[4], "m", "old")  # our marker, not our name
    os.symlink(tmp_path / "m.old.12-cd", foreign[5])  # a link named like ours
    stray_file = tmp_path / ".map.json.12345.tmp"  # another tool's temporary, not atomic_open's pattern
    stray_file.write_text("x")
    recover_replacements(tmp_path)
    assert all(os.path.lexists(p) for p in [*foreign, stray_file])
    assert (foreign[0] / "data").read_text() == "someone's"
    assert not (tmp_path / "m").exists()


def test_recovery_skips_a_folder_whose_writer_holds_its_lock(tmp_path):
    staged = _mark(tmp_path / ".m.12-ab.tmp", "m", "complete")
    fd = os.open(staged, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its (live) writer does
        assert recover_replacements(tmp_path)["published"] == []
        assert staged.is_dir()
    finally:
        os.close(fd)
    assert recover_replacements(tmp_path)["published"] == [str(tmp_path / "m")]


def test_stale_atomic_write_temporaries_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "map.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".map.json.~w{dead}-abc123.tmp"
    stale.write_text("half")
    live = tmp_path / f".map.json.~w{os.getppid()}-def456.tmp"  # a live process's (its pid exists)
    live.write_text("being written")
    write_json_atomic(path, {"a": 1})
    assert not stale.exists() and live.exists()


def test_file_lock_leaves_no_lock_file_and_still_excludes(tmp_path):
    path = tmp_path / "shared.json"
    with file_lock(path):
        assert (tmp_path / "shared.json.lock").exists()
        with pytest.raises(TimeoutError):
            with file_lock(path, timeout=0.1):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a holder killed with the lock: the kernel released it; the next locker takes it and cleans up
    (tmp_path / "shared.json.lock").write_text("")
    with file_lock(path, timeout=1):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_file_lock_leaves_a_users_file_named_like_its_lock_alone(tmp_path):
    """A lock file is always empty: a user's ``map.json.lock`` holding notes was locked, then deleted on release
    (found by `merge_into_map`); a FIFO there is neither opened for good nor waited on. Both are refused."""
    from utils.file_utils import UnsafePathError

    path = tmp_path / "map.json"
    notes = tmp_path / "map.json.lock"
    notes.write_text("my notes about locks")
    with pytest.raises(UnsafePathError, match="a file of 20 bytes, not an .empty. lock file"):
        with file_lock(path, timeout=1):
            pass
    assert notes.read_text() == "my notes about locks"
    notes.unlink()
    os.mkfifo(notes)
    start = time.monotonic()
    with pytest.raises(UnsafePathError, match="FIFO"):
        with file_lock(path, timeout=1):
            pass
    assert stat.S_ISFIFO(os.lstat(notes).st_mode) and time.monotonic() - start < 1


def test_a_model_replaced_by_a_killed_save_still_loads_by_name(tiny_model_dir, tmp_path, monkeypatch):
    from models.cli_models import resolve_model_dir
    from models.image_captioning.clip_cap import ClipCap

    store = tmp_path / "home"
    monkeypatch.setenv("IMAGE_CAPTIONING_HOME", str(store))
    staged = store / ".m.12-ab.tmp"  # the new copy, complete; the previous one renamed aside: then kill -9
    shutil.copytree(tiny_model_dir, staged)
    (staged / PARTIAL_MARKER).write_text(json.dumps({"library": "image_captioning", "target": "m",
                                                     "state": "complete", "pid": 1}))
    shutil.copytree(tiny_model_dir, store / ".m.old.12-cd")
    (store / ".m.old.12-cd" / PARTIAL_MARKER).write_text(json.dumps({"library": "image_captioning", "target": "m",
                                                                    "state": "old", "pid": 1}))
    assert resolve_model_dir("m", download=False) == str(store / "m")
    assert ClipCap.load("m").generate  # loads
    assert sorted(p.name for p in store.iterdir()) == ["m"]
