"""The safety helpers every write, replace, lock and read of the library goes through."""

import json
import multiprocessing
import os
import stat
import threading

import pytest

from utils.file_utils import (
    UnsafePathError,
    atomic_write,
    check_model_name,
    file_lock,
    path_problem,
    read_regular_file,
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
