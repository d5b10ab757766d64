"""Tests of persia.store.checkpoint: round trips, generations, every refused corruption, kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from persia.errors import CheckpointError, PersiaError
from persia.store import checkpoint as ckpt
from persia.store.checkpoint import (
    FORMAT_VERSION,
    current_generation,
    list_generations,
    read_current,
    read_generation,
    write_generation,
)

from ._ckpt_writer import KIND as KILL_KIND
from ._ckpt_writer import expected_arrays

WRITER = Path(__file__).with_name("_ckpt_writer.py")


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "emb": rng.standard_normal((50, 16), dtype=np.float32),
        "keys": rng.integers(0, 2**64 - 1, size=50, dtype=np.uint64, endpoint=True),
        "rows": rng.integers(-(2**31), 2**31 - 1, size=(5, 3), dtype=np.int32),
        "acc": rng.standard_normal(33),  # float64
        "empty": np.zeros(0, dtype=np.float32),
        "empty2d": np.zeros((0, 16), dtype=np.float32),
        "flags": rng.random(10) < 0.5,
        "scalar": np.array(3.5, dtype=np.float32),
        "names": np.array(["a", "bc", "é"]),
        "step.count": np.arange(7, dtype=np.int64),
        "big-ints": np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name
        # bit-exact: compare the bytes (NaN-safe, -0.0-safe)
        assert np.ascontiguousarray(arr).tobytes() == got[name].tobytes(), name


# --------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    arrays["nan"] = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], dtype=np.float32)
    meta = {"dims": [16, 32], "optimizer": {"name": "adagrad", "lr": 0.01}, "rows": 50, "x": None}
    gen = write_generation(tmp_path / "ck", arrays, meta, kind="shard")
    assert gen == tmp_path / "ck" / "gen-000001"
    assert current_generation(tmp_path / "ck") == gen
    got, got_meta = read_current(tmp_path / "ck", kind="shard")
    _assert_same(got, arrays)
    assert got_meta == meta


def test_files_are_numpy_npy_and_manifest_as_documented(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    gen = write_generation(tmp_path, arrays, {"a": 1}, kind="shard")
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["kind"] == "shard"
    assert manifest["generation"] == 1
    assert abs(manifest["created_unix_s"] - time.time()) < 600
    assert manifest["meta"] == {"a": 1}
    assert sorted(manifest["arrays"]) == sorted(arrays)
    for name, arr in arrays.items():
        entry = manifest["arrays"][name]
        path = gen / entry["file"]
        assert entry["file"] == f"{name}.npy"
        assert entry["dtype"] == arr.dtype.str and entry["shape"] == list(arr.shape)
        raw = path.read_bytes()
        assert entry["bytes"] == len(raw)
        assert entry["crc32"] == zlib.crc32(raw)
        # byte for byte what np.save writes, and np.load reads it without pickle
        np.save(tmp_path / "ref.npy", arr)
        assert raw == (tmp_path / "ref.npy").read_bytes(), name
        loaded = np.load(path, allow_pickle=False)
        assert loaded.tobytes() == arr.tobytes() and loaded.dtype == arr.dtype
    assert (tmp_path / "CURRENT").read_text() == "gen-000001\n"


def test_non_contiguous_and_fortran_arrays_come_back_c_contiguous(tmp_path: Path) -> None:
    base = np.arange(200, dtype=np.float32).reshape(10, 20)
    arrays = {"strided": base[::2, 1::3], "fortran": np.asfortranarray(base), "t": base.T}
    write_generation(tmp_path, arrays, {}, kind="k")
    got, _ = read_current(tmp_path, kind="k")
    for name, arr in arrays.items():
        np.testing.assert_array_equal(got[name], arr)
        assert got[name].flags.c_contiguous


def test_large_array_uses_background_checksum_and_round_trips(tmp_path: Path) -> None:
    # above _BACKGROUND_CRC_BYTES, several chunks: the threaded checksum path
    arr = np.random.default_rng(1).random(ckpt._BACKGROUND_CRC_BYTES // 4 + 12345, dtype=np.float32)
    gen = write_generation(tmp_path, {"big": arr}, {}, kind="k")
    entry = json.loads((gen / "manifest.json").read_text())["arrays"]["big"]
    assert entry["crc32"] == zlib.crc32((gen / "big.npy").read_bytes())
    got, _ = read_current(tmp_path, kind="k")
    assert got["big"].tobytes() == arr.tobytes()


def test_no_arrays_only_meta(tmp_path: Path) -> None:
    write_generation(tmp_path, {}, {"epoch": 3}, kind="k")
    assert read_current(tmp_path, kind="k") == ({}, {"epoch": 3})


# --------------------------------------------------------------------------------------------------
# generations, the pointer, keep


def _write_seq(directory: Path, seq: int, keep: int = 2) -> Path:
    arrays = {"v": np.full(10, seq, dtype=np.int64)}
    return write_generation(directory, arrays, {"seq": seq}, kind="k", keep=keep)


def test_generations_switch_pointer_and_keep_old_ones(tmp_path: Path) -> None:
    for seq in range(1, 6):
        gen = _write_seq(tmp_path, seq, keep=2)
        assert gen.name == f"gen-{seq:06d}"
        arrays, meta = read_current(tmp_path, kind="k")
        assert meta == {"seq": seq} and (arrays["v"] == seq).all()
        assert [p.name for p in list_generations(tmp_path)] == [
            f"gen-{s:06d}" for s in range(max(1, seq - 2), seq + 1)
        ]
    # the kept old generations are loadable on their own
    for path in list_generations(tmp_path):
        arrays, meta = read_generation(path, kind="k")
        assert (arrays["v"] == meta["seq"]).all() and path.name == f"gen-{meta['seq']:06d}"
    # nothing but generations, the pointer and the lock remain
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "CURRENT",
        "gen-000003",
        "gen-000004",
        "gen-000005",
    ]


def test_keep_zero_leaves_only_current_and_numbers_keep_growing(tmp_path: Path) -> None:
    for seq in range(1, 4):
        _write_seq(tmp_path, seq, keep=0)
        assert [p.name for p in list_generations(tmp_path)] == [f"gen-{seq:06d}"]
    assert read_current(tmp_path, kind="k")[1] == {"seq": 3}
    # a larger keep later keeps only what exists
    _write_seq(tmp_path, 4, keep=5)
    assert [p.name for p in list_generations(tmp_path)] == ["gen-000003", "gen-000004"]


def test_list_generations_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert list_generations(tmp_path / "nope") == []


def test_leftovers_of_crashed_writers_are_cleaned_on_next_write(tmp_path: Path) -> None:
    _write_seq(tmp_path, 1)
    junk = tmp_path / ".tmp-gen-000002-999999"
    junk.mkdir()
    (junk / "v.npy").write_bytes(b"half a file")
    (tmp_path / ".tmp-old-gen-000001-999999").mkdir()
    (tmp_path / "CURRENT.tmp").write_text("gen-000002\n")
    # the leftovers do not disturb reading
    assert read_current(tmp_path, kind="k")[1] == {"seq": 1}
    assert [p.name for p in list_generations(tmp_path)] == ["gen-000001"]
    _write_seq(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "CURRENT",
        "gen-000001",
        "gen-000002",
    ]
    assert read_current(tmp_path, kind="k")[1] == {"seq": 2}


def test_failure_while_writing_arrays_keeps_previous_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_seq(tmp_path, 1)
    real = ckpt._write_array
    calls = []

    def failing(path: Path, arr: np.ndarray) -> dict:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, arr)

    monkeypatch.setattr(ckpt, "_write_array", failing)
    with pytest.raises(OSError, match="No space"):
        write_generation(tmp_path, {"a": np.zeros(3), "b": np.ones(3)}, {"seq": 2}, kind="k")
    assert read_current(tmp_path, kind="k")[1] == {"seq": 1}
    assert [p.name for p in list_generations(tmp_path)] == ["gen-000001"]
    # an error (unlike a crash) removes the partial folder at once
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(ckpt, "_write_array", real)
    _write_seq(tmp_path, 3)
    assert read_current(tmp_path, kind="k")[1] == {"seq": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_crash_before_pointer_switch_leaves_previous_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_seq(tmp_path, 1)

    def crash(root: Path, name: str) -> None:
        raise OSError("simulated crash before the pointer switch")

    monkeypatch.setattr(ckpt, "_switch_pointer", crash)
    with pytest.raises(OSError, match="simulated"):
        _write_seq(tmp_path, 2)
    monkeypatch.undo()
    # the complete but never-current generation 2 is there; CURRENT still names 1
    assert read_current(tmp_path, kind="k")[1] == {"seq": 1}
    assert [p.name for p in list_generations(tmp_path)] == ["gen-000001", "gen-000002"]
    assert read_generation(tmp_path / "gen-000002", kind="k")[1] == {"seq": 2}
    # the next write takes a number beyond it
    assert _write_seq(tmp_path, 3).name == "gen-000003"
    assert read_current(tmp_path, kind="k")[1] == {"seq": 3}


def test_reader_follows_pointer_when_its_generation_is_removed_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_seq(tmp_path, 1)
    real = ckpt.read_generation
    seen = []

    def racing(path: Path, *, kind: str):
        seen.append(Path(path).name)
        if len(seen) == 1:  # a concurrent writer replaces the generation being read
            _write_seq(tmp_path, 2, keep=0)
        return real(path, kind=kind)

    monkeypatch.setattr(ckpt, "read_generation", racing)
    assert ckpt.read_current(tmp_path, kind="k")[1] == {"seq": 2}
    assert seen == ["gen-000001", "gen-000002"]


def test_concurrent_writers_are_serialised(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(5):
                _write_seq(tmp_path, offset + i, keep=100)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    gens = list_generations(tmp_path)
    assert [p.name for p in gens] == [f"gen-{n:06d}" for n in range(1, 11)]
    seqs = sorted(read_generation(p, kind="k")[1]["seq"] for p in gens)
    assert seqs == [100, 101, 102, 103, 104, 200, 201, 202, 203, 204]


# --------------------------------------------------------------------------------------------------
# refused input at write time


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", ".hidden", "a b", "é", "tab\t", "x" * 201, 3, None]
)
def test_unsafe_array_names_are_refused(tmp_path: Path, name: object) -> None:
    with pytest.raises(CheckpointError, match="safe file name"):
        write_generation(tmp_path, {name: np.zeros(2)}, {}, kind="k")  # type: ignore[dict-item]
    assert list_generations(tmp_path) == []


def test_names_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="differ only in case"):
        write_generation(tmp_path, {"Emb": np.zeros(2), "emb": np.zeros(2)}, {}, kind="k")


@pytest.mark.parametrize(
    "arr",
    [
        np.array([{"a": 1}, None], dtype=object),
        np.zeros(3, dtype=[("a", np.int32), ("b", np.float32)]),
        [1, 2, 3],
    ],
    ids=["object", "structured", "list"],
)
def test_object_structured_and_non_arrays_are_refused(tmp_path: Path, arr: object) -> None:
    with pytest.raises(CheckpointError, match="'bad'"):
        write_generation(tmp_path, {"bad": arr}, {}, kind="k")  # type: ignore[dict-item]


@pytest.mark.parametrize("value", [np.int64(3), {1, 2}, float("nan"), object(), b"bytes"], ids=repr)
def test_meta_must_be_json_and_the_key_is_named(tmp_path: Path, value: object) -> None:
    with pytest.raises(CheckpointError, match=r"meta\['lr'\] is not JSON-serialisable"):
        write_generation(tmp_path, {}, {"ok": 1, "lr": value}, kind="k")
    assert not (tmp_path / "CURRENT").exists()


def test_meta_keys_kind_and_keep_are_validated(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="meta keys must be str"):
        write_generation(tmp_path, {}, {1: "x"}, kind="k")  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="kind must be a non-empty str"):
        write_generation(tmp_path, {}, {}, kind="")
    with pytest.raises(CheckpointError, match="keep must be an int >= 0, got -1"):
        write_generation(tmp_path, {}, {}, kind="k", keep=-1)
    assert issubclass(CheckpointError, PersiaError)


# --------------------------------------------------------------------------------------------------
# refused checkpoints at read time


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """A directory whose current generation is 2 (generation 1 kept); returns generation 2."""
    rng = np.random.default_rng(3)
    write_generation(tmp_path, {"emb": np.zeros((4, 4), np.float32)}, {"seq": 1}, kind="shard")
    arrays = {"emb": rng.standard_normal((100, 16)).astype(np.float32), "n": np.arange(5)}
    return write_generation(tmp_path, arrays, {"seq": 2}, kind="shard")


def _edit_manifest(gen: Path, edit) -> None:
    manifest = json.loads((gen / "manifest.json").read_text())
    edit(manifest)
    (gen / "manifest.json").write_text(json.dumps(manifest))


def _refused(directory: Path, pattern: str, kind: str = "shard") -> None:
    with pytest.raises(CheckpointError, match=pattern):
        read_current(directory, kind=kind)


def test_intact_fixture_loads(written: Path) -> None:
    assert read_current(written.parent, kind="shard")[1] == {"seq": 2}


def test_truncated_array_file(written: Path) -> None:
    path = written / "emb.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    _refused(written.parent, rf"emb\.npy is truncated: the manifest says {len(data)} bytes, found")


def test_appended_array_file(written: Path) -> None:
    with open(written / "emb.npy", "ab") as f:
        f.write(b"\0")
    _refused(written.parent, r"emb\.npy is too long")


@pytest.mark.parametrize("where", [0, 9, 20, 128, 1000, -1], ids=lambda w: f"byte{w}")
def test_flipped_byte_anywhere_is_refused(written: Path, where: int) -> None:
    path = written / "emb.npy"
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(written.parent, "emb.npy")


def test_flipped_data_byte_reports_crc(written: Path) -> None:
    path = written / "emb.npy"
    data = bytearray(path.read_bytes())
    data[500] ^= 0x80
    path.write_bytes(bytes(data))
    _refused(
        written.parent, r"emb\.npy: crc32 mismatch \(the manifest says \d+, the file gives \d+"
    )


def test_missing_array_file(written: Path) -> None:
    (written / "n.npy").unlink()
    _refused(written.parent, r"n\.npy is missing \(listed in the manifest\)")


def test_missing_manifest(written: Path) -> None:
    (written / "manifest.json").unlink()
    _refused(written.parent, r"manifest\.json is missing: .* is not a complete checkpoint")


def test_manifest_not_json(written: Path) -> None:
    (written / "manifest.json").write_text('{"format_version": 1, "kind": ')
    _refused(written.parent, r"manifest\.json is not valid JSON")


def test_manifest_not_an_object(written: Path) -> None:
    (written / "manifest.json").write_text("[1, 2]")
    _refused(written.parent, "expected a JSON object, found list")


def test_edited_shape_in_manifest(written: Path) -> None:
    _edit_manifest(written, lambda m: m["arrays"]["emb"].update(shape=[16, 100]))
    _refused(
        written.parent,
        r"the manifest says dtype <f4 shape \[16, 100\], the file holds .*\[100, 16\]",
    )


def test_edited_dtype_in_manifest(written: Path) -> None:
    _edit_manifest(written, lambda m: m["arrays"]["emb"].update(dtype="<i4"))
    _refused(written.parent, r"manifest says dtype <i4 .* the file holds dtype <f4")


def test_edited_crc_in_manifest(written: Path) -> None:
    _edit_manifest(written, lambda m: m["arrays"]["n"].update(crc32=m["arrays"]["n"]["crc32"] ^ 1))
    _refused(written.parent, r"n\.npy: crc32 mismatch")


@pytest.mark.parametrize(
    "entry",
    [
        {"file": "../gen-000001/emb.npy"},
        {"file": "/etc/passwd"},
        {"shape": [-1, 16]},
        {"shape": "100x16"},
        {"bytes": "many"},
        {"crc32": None},
        {"dtype": "not-a-dtype"},
    ],
    ids=repr,
)
def test_malformed_manifest_entries(written: Path, entry: dict) -> None:
    _edit_manifest(written, lambda m: m["arrays"]["emb"].update(entry))
    _refused(written.parent, "emb")


def test_wrong_kind(written: Path) -> None:
    _refused(
        written.parent, "expected a checkpoint of kind 'dense', found kind 'shard'", kind="dense"
    )


def test_newer_format_version(written: Path) -> None:
    _edit_manifest(written, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    _refused(
        written.parent, rf"format_version {FORMAT_VERSION + 1} is newer than this persia reads"
    )


@pytest.mark.parametrize("version", [0, "1", None, True, 1.0])
def test_unknown_format_version(written: Path, version: object) -> None:
    _edit_manifest(written, lambda m: m.update(format_version=version))
    _refused(written.parent, "format_version")


@pytest.mark.parametrize("field", ["kind", "meta", "arrays"])
def test_missing_manifest_fields(written: Path, field: str) -> None:
    _edit_manifest(written, lambda m: m.pop(field))
    _refused(written.parent, f"expected field '{field}'")


def test_manifest_of_another_generation(written: Path) -> None:
    _edit_manifest(written, lambda m: m.update(generation=1))
    _refused(written.parent, "manifest says generation 1, but the folder is gen-000002")


def test_missing_current(written: Path) -> None:
    (written.parent / "CURRENT").unlink()
    _refused(written.parent, r"CURRENT is missing: .* holds no completed checkpoint generation")


@pytest.mark.parametrize(
    "content", [b"", b"gen-7\n", b"../gen-000001\n", b"\xff\xfe", b"gen-000002x"]
)
def test_garbage_current(written: Path, content: bytes) -> None:
    (written.parent / "CURRENT").write_bytes(content)
    _refused(written.parent, r"CURRENT is malformed: expected a generation name like 'gen-000007'")


def test_current_names_missing_generation(written: Path) -> None:
    (written.parent / "CURRENT").write_text("gen-000009\n")
    _refused(written.parent, r"gen-000009 does not exist")


def test_missing_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope", r"checkpoint directory .*nope does not exist")


def test_corrupt_current_does_not_hide_intact_previous_generation(written: Path) -> None:
    (written / "emb.npy").write_bytes(b"garbage")
    _refused(written.parent, "emb.npy")
    # the previous generation is still there to fall back to, explicitly
    assert read_generation(written.parent / "gen-000001", kind="shard")[1] == {"seq": 1}


# --------------------------------------------------------------------------------------------------
# a crash at every file-system operation, deterministically


class _Crash(BaseException):
    """Raised in place of a file-system call: the writer stops there, as if killed."""


class _CrashingOs:
    """Stands in for the checkpoint module's ``os``/``shutil``: the ``crash_at``-th mutating call
    raises, and so does every later one (so no cleanup can run, as after a real kill)."""

    MUTATING = {"open", "write", "fsync", "rename", "replace", "rmtree"}

    def __init__(self, real: object, counter: list[int], crash_at: int) -> None:
        self._real, self._counter, self._crash_at = real, counter, crash_at

    def __getattr__(self, name: str):
        attr = getattr(self._real, name)
        if name not in self.MUTATING:
            return attr

        def call(*args, **kwargs):
            self._counter[0] += 1
            if self._counter[0] >= self._crash_at:
                raise _Crash(f"crash at call {self._counter[0]}: {name}")
            return attr(*args, **kwargs)

        return call


@pytest.mark.parametrize("keep", [0, 1])
def test_crash_at_every_file_system_call_leaves_a_whole_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    import shutil

    directory = tmp_path / "ck"
    rows = 64
    seq = 0
    for seq in (1, 2):
        write_generation(
            directory, expected_arrays(seq, rows), {"seq": seq, "rows": rows}, kind="c"
        )
    crash_at = 1
    while True:
        counter = [0]
        monkeypatch.setattr(ckpt, "os", _CrashingOs(os, counter, crash_at))
        monkeypatch.setattr(ckpt, "shutil", _CrashingOs(shutil, counter, crash_at))
        new = seq + 1
        try:
            write_generation(
                directory,
                expected_arrays(new, rows),
                {"seq": new, "rows": rows},
                kind="c",
                keep=keep,
            )
            finished = True
        except _Crash:
            finished = False
        monkeypatch.undo()
        arrays, meta = read_current(directory, kind="c")
        got = _check_generation(arrays, meta)
        assert got in (seq, new), (crash_at, got)
        for path in list_generations(directory):  # every folder under a real name is complete
            _check_generation(*read_generation(path, kind="c"))
        if finished:
            assert got == new
            break
        # the next, uncrashed write cleans up and succeeds
        seq = got + 1
        write_generation(
            directory, expected_arrays(seq, rows), {"seq": seq, "rows": rows}, kind="c", keep=keep
        )
        assert read_current(directory, kind="c")[1]["seq"] == seq
        assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
        crash_at += 1
    assert crash_at > 10  # the write made that many file-system calls, each one crashed once


# --------------------------------------------------------------------------------------------------
# the kill test: a writer subprocess killed with SIGKILL at random points


def _check_generation(arrays: dict[str, np.ndarray], meta: dict) -> int:
    seq, rows = int(meta["seq"]), int(meta["rows"])
    _assert_same(arrays, expected_arrays(seq, rows))
    return seq


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_writer_killed_at_random_points_leaves_a_whole_generation(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    directory = tmp_path / "ckpt"
    rows = 100_000  # 3.2 MB of float32 + 0.8 MB of uint64 per generation
    max_committed = 0  # highest sequence number the writer reported as returned
    last_loaded = 0
    kills = 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(ckpt.__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
    )
    deadline = time.monotonic() + 12.0
    while kills < 15 and (kills < 10 or time.monotonic() < deadline):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory), str(rows)],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            assert ready == b"ready\n", ready
            # the first kill comes early (maybe before any generation completed); then varied
            time.sleep(rng.uniform(0.0, 0.005) if kills == 0 else rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            rest = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        committed = [
            int(line.split()[1]) for line in rest.splitlines() if line.startswith("committed")
        ]
        max_committed = max([max_committed, *committed])

        try:
            arrays, meta = read_current(directory, kind=KILL_KIND)
        except CheckpointError:
            # only acceptable before any generation ever completed
            assert max_committed == 0 and last_loaded == 0
            assert list_generations(directory) == []
            continue
        seq = _check_generation(arrays, meta)
        # never older than what the writer reported done or what was loaded before; at most the
        # one generation the killed writer completed without reporting it
        assert max(max_committed, last_loaded) <= seq <= max(max_committed, last_loaded) + 1
        last_loaded = seq
        # every folder under a real name is a complete generation
        for path in list_generations(directory):
            _check_generation(*read_generation(path, kind=KILL_KIND))
    assert kills >= 10
    assert last_loaded >= 3, "the writer completed too few generations for the test to mean much"
