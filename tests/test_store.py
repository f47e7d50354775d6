"""The array store: atomic entries, validation, names that stay inside the directory."""

from __future__ import annotations

import builtins
import errno
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import proponents.store as store_module
from proponents.errors import StoreError
from proponents.fingerprints import dataset_probe, model_fingerprint
from proponents.store import FORMAT_VERSION, ArrayStore, safe_name


def _write(store: ArrayStore, key: str, meta: dict, blocks, extra=None) -> None:
    with store.lock(), store.writer(key, meta) as writer:
        for block in blocks:
            writer.append("data", block)
        if extra is not None:
            writer.put("extra", extra)
        writer.commit()


def _files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f != ".lock")


# ------------------------------------------------------------------------------ names


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_safe_name_is_one_harmless_component(name):
    out = safe_name(name)
    assert re.fullmatch(r"[A-Za-z0-9_.%\-]+", out)
    assert not out.startswith(".")
    assert out not in (".", "..")
    assert len(out) <= 100
    assert safe_name(name) == out


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_safe_name_keeps_distinct_names_apart(a, b):
    if a != b:  # also on case-insensitive file systems
        assert safe_name(a).lower() != safe_name(b).lower()


def test_safe_name_examples():
    assert safe_name("conv2") == "conv2"
    assert safe_name("features.0") == "features.0"
    for bad in ("../x", "..", ".", "a/b", "/abs", "C:\\x", ""):
        out = safe_name(bad)
        assert "/" not in out and "\\" not in out and not out.startswith(".")
    assert safe_name("Conv").lower() != safe_name("conv").lower()


# ---------------------------------------------------------------------- entries


def test_roundtrip_streamed_and_whole_arrays(tmp_path):
    store = ArrayStore(tmp_path / "s")
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 3, 2)).astype(np.float32) for n in (4, 1, 6)]
    _write(store, "layer", {"model": "m1", "n": 11}, blocks, extra=np.arange(5.0))
    entry, why = store.load("layer", {"model": "m1", "n": 11})
    assert why is None and entry is not None
    with entry:
        whole = np.concatenate(blocks)
        assert entry.shape("data") == (11, 3, 2)
        np.testing.assert_array_equal(entry.read("data"), whole)
        np.testing.assert_array_equal(entry.memmap("data", 3, 8), whole[3:8])
        np.testing.assert_array_equal(entry.read("extra"), np.arange(5.0))
        # the files are ordinary .npy files
        fname = entry.manifest["arrays"]["data"]["file"]
        np.testing.assert_array_equal(np.load(store.directory / fname), whole)
        # the memory map is copy-on-write: writing to it never touches the file
        view = entry.memmap("data", 0, 2)
        view[:] = 7
    with store.load("layer", {"model": "m1", "n": 11})[0] as again:
        np.testing.assert_array_equal(again.read("data"), whole)


def test_missing_entry_is_not_an_error(tmp_path):
    assert ArrayStore(tmp_path).load("nothing", {}) == (None, None)


def test_meta_mismatch_names_the_field(tmp_path):
    store = ArrayStore(tmp_path)
    _write(store, "k", {"model": "aaa", "layer": "fc"}, [np.zeros((2, 2), np.float32)])
    entry, why = store.load("k", {"model": "bbb", "layer": "fc"})
    assert entry is None and "model" in why and "layer" not in why
    entry, why = store.load("k", {"model": "bbb", "layer": "fc"}, ignore=("model",))
    assert why is None
    entry.close()


def test_abort_leaves_nothing(tmp_path):
    store = ArrayStore(tmp_path)
    with pytest.raises(RuntimeError), store.writer("k", {}) as writer:
        writer.append("data", np.zeros((3, 2), np.float32))
        raise RuntimeError("crash while building")
    assert _files(tmp_path) == []
    assert store.load("k", {}) == (None, None)


def test_a_discarded_array_leaves_no_file_and_no_trace(tmp_path):
    store = ArrayStore(tmp_path)
    with store.writer("k", {}) as writer:
        writer.append("data", np.ones((3, 2), np.float32))
        writer.append("side", np.zeros((3, 4), np.float32))
        writer.put("whole", np.arange(3.0))
        writer.discard("side")  # streamed, still open
        writer.discard("whole")  # already finished
        writer.discard("never-written")  # nothing to do
        writer.commit()
    entry, why = store.load("k", {})
    assert why is None
    with entry:
        assert entry.arrays == ["data"]
        np.testing.assert_array_equal(entry.read("data"), np.ones((3, 2)))
    assert len([f for f in _files(tmp_path) if f.endswith(".npy")]) == 1


def test_an_open_entry_is_reused_only_while_nothing_changed(tmp_path):
    store = ArrayStore(tmp_path)
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    _write(store, "k", {"v": 1}, [rows])
    first, _ = store.load("k", {"v": 1})
    assert store.load("k", {"v": 1}, reuse=first) == (first, None)
    # a small array is mapped once: later row ranges are views of the same map
    assert np.shares_memory(first.memmap("data", 0, 3), first.memmap("data", 2, 6))
    # meta is still compared
    entry, why = store.load("k", {"v": 2}, reuse=first)
    assert entry is None and "v" in why
    # another key, or another store's entry, is never handed back
    _write(store, "other", {"v": 1}, [rows])
    other, _ = store.load("other", {"v": 1}, reuse=first)
    assert other is not first
    other.close()
    # a rebuilt entry (new files) is opened afresh
    _write(store, "k", {"v": 1}, [rows * 2])
    again, why = store.load("k", {"v": 1}, reuse=first)
    assert why is None and again is not first
    np.testing.assert_array_equal(again.read("data"), rows * 2)
    again.close()
    first.close()
    # a closed entry is not reused either
    fresh, _ = store.load("k", {"v": 1}, reuse=first)
    assert fresh is not first
    fresh.close()


def test_a_large_array_is_mapped_per_call(tmp_path, monkeypatch):
    store = ArrayStore(tmp_path)
    _write(store, "k", {}, [np.ones((6, 2), np.float32)])
    monkeypatch.setattr(store_module, "KEEP_MAPPED_BYTES", 8)  # 48 bytes is "large" now
    with store.load("k", {})[0] as entry:
        assert not np.shares_memory(entry.memmap("data", 0, 3), entry.memmap("data", 2, 6))


def test_uncommitted_writer_is_invisible(tmp_path):
    store = ArrayStore(tmp_path)
    _write(store, "k", {"v": 1}, [np.ones((2, 2), np.float32)])
    writer = store.writer("k", {"v": 2})
    writer.append("data", np.zeros((5, 2), np.float32))
    entry, why = store.load("k", {"v": 1})  # the old entry is still served
    assert why is None
    with entry:
        np.testing.assert_array_equal(entry.read("data"), np.ones((2, 2)))
    writer.abort()


def test_replacing_removes_old_files(tmp_path):
    store = ArrayStore(tmp_path)
    _write(store, "k", {"v": 1}, [np.ones((2, 2), np.float32)])
    _write(store, "k", {"v": 2}, [np.zeros((3, 2), np.float32)])
    files = _files(tmp_path)
    assert len(files) == 2, files  # manifest + one array
    assert store.load("k", {"v": 1})[1] is not None
    entry, why = store.load("k", {"v": 2})
    assert why is None
    entry.close()


def test_open_entry_survives_replacement(tmp_path):
    store = ArrayStore(tmp_path)
    _write(store, "k", {"v": 1}, [np.ones((4, 2), np.float32)])
    entry, _ = store.load("k", {"v": 1})
    _write(store, "k", {"v": 2}, [np.zeros((3, 2), np.float32)])
    with entry:  # its files were unlinked, but it keeps them open
        np.testing.assert_array_equal(entry.read("data"), np.ones((4, 2)))


def test_leftovers_of_a_crashed_build_are_removed(tmp_path):
    store = ArrayStore(tmp_path)
    writer = store.writer("k", {})
    writer.append("data", np.zeros((3, 2), np.float32))  # never committed nor aborted
    (tmp_path / "k~deadbeef~data.npy").write_bytes(b"orphan")
    _write(store, "k", {}, [np.ones((2, 2), np.float32)])
    assert len(_files(tmp_path)) == 2


class _Tripwire:
    """Raises ``error`` at the ``at``-th step of a store write, counting every write to a
    file the store opened for writing, and each rename both before and after it happens
    (so a failure right after a rename took effect is tried too)."""

    def __init__(self, at: int, error) -> None:
        self.at, self.error, self.steps, self.fired = at, error, 0, False

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.fired = True
            raise self.error()

    def install(self, patch: pytest.MonkeyPatch) -> None:
        trip, real_replace = self, os.replace

        class Wired:
            def __init__(self, fh) -> None:
                self._fh = fh

            def write(self, data):
                trip.step()
                return self._fh.write(data)

            def __getattr__(self, name):
                return getattr(self._fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._fh.close()

        def opener(path, mode="r", *args, **kwargs):
            fh = builtins.open(path, mode, *args, **kwargs)
            return Wired(fh) if "w" in mode or "x" in mode else fh

        def replace(src, dst):
            trip.step()
            real_replace(src, dst)
            trip.step()

        patch.setattr(store_module, "open", opener, raising=False)
        patch.setattr(os, "replace", replace)


WRITE_ERRORS = {
    "disk-full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "interrupt": KeyboardInterrupt,
}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("error", list(WRITE_ERRORS))
def test_a_write_failing_at_any_step_leaves_no_file(tmp_path, monkeypatch, error, existing):
    # Every step is tried: the first write of a streamed array, its rows, the header of
    # a whole array and of the streamed one, each rename, the manifest and its replace.
    for at in itertools.count(1):
        directory = tmp_path / str(at)
        store = ArrayStore(directory)
        store.ensure_writable()
        if existing:
            _write(store, "k", {"v": 1}, [np.ones((2, 2), np.float32)])
        before = _files(directory)
        trip = _Tripwire(at, WRITE_ERRORS[error])
        with monkeypatch.context() as patch:
            trip.install(patch)
            try:
                blocks = [np.zeros((3, 2), np.float32)] * 2
                _write(store, "k", {"v": 2}, blocks, extra=np.arange(4.0))
            except (OSError, StoreError, KeyboardInterrupt):
                assert trip.fired
        if not trip.fired:
            break
        entry, why = store.load("k", {"v": 2})
        if entry is None:  # not committed: the old entry as it was, and no other file
            assert _files(directory) == before, at
            if existing:
                assert store.load("k", {"v": 1})[1] is None
        else:  # failed after its manifest was in place: the new entry, and no other file
            entry.close()
            assert len(_files(directory)) == 3, (at, _files(directory))
    assert at > 10


def test_an_interrupted_write_probe_leaves_no_file(tmp_path, monkeypatch):
    store = ArrayStore(tmp_path / "s")
    real_close = os.close

    def close(fd):
        real_close(fd)
        raise KeyboardInterrupt  # as a Ctrl-C between creating the probe and removing it

    with monkeypatch.context() as patch:
        patch.setattr(os, "close", close)
        with pytest.raises(KeyboardInterrupt):
            store.ensure_writable()
    assert os.listdir(tmp_path / "s") == []


def test_the_next_build_removes_stale_probes_and_orphans_but_no_user_file(tmp_path):
    token = "0123456789abcdef"
    stale = [  # what a killed process can leave: probes (old and new style), orphans
        ".tmp~probeab1_x9zq",
        f".tmp~probe{token}",
        f"k~{token}~data.npy",
        f".tmp~k~{token}~data.npy",
        f".tmp~k~{token}.json",
    ]
    users = ["notes.txt", ".tmp~probe-notes.txt", "k~notes.txt", "k~beef.json", ".tmp~k~mine"]
    for name in stale + users:
        (tmp_path / name).write_bytes(b"x")
    store = ArrayStore(tmp_path)
    _write(store, "k", {}, [np.ones((2, 2), np.float32)])
    files = set(_files(tmp_path))
    assert users and set(users) <= files
    ours = files - set(users)
    assert len(ours) == 2 and "k.json" in ours, ours  # the manifest and its one array


def _manifest(tmp_path, key="k"):
    return tmp_path / f"{key}.json"


def _data_file(tmp_path, key="k", name="data"):
    (match,) = [
        f for f in os.listdir(tmp_path) if f.startswith(key + "~") and f.endswith(name + ".npy")
    ]
    return tmp_path / match


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncate", "truncated"),
        ("empty", "header"),
        ("header", "header"),
        ("missing", "missing"),
        ("garbage_manifest", "not valid JSON"),
        ("edited_manifest", "checksum"),
        ("old_version", "format version"),
        ("swapped_rows", "checksum differs"),
        ("one_bit", "checksum differs"),
    ],
)
def test_damage_is_detected(tmp_path, damage, words):
    store = ArrayStore(tmp_path)
    _write(store, "k", {"v": 1}, [np.arange(24, dtype=np.float32).reshape(6, 4)])
    data, manifest = _data_file(tmp_path), _manifest(tmp_path)
    if damage == "truncate":
        with open(data, "r+b") as fh:
            fh.truncate(os.path.getsize(data) - 5)
    elif damage == "empty":
        data.write_bytes(b"")
    elif damage == "header":
        raw = bytearray(data.read_bytes())
        raw[:6] = b"NOTNPY"
        data.write_bytes(bytes(raw))
    elif damage == "missing":
        data.unlink()
    elif damage in ("swapped_rows", "one_bit"):  # the header, shape and size still fit
        raw = bytearray(data.read_bytes())
        start = len(raw) - 6 * 16
        if damage == "one_bit":
            raw[-3] ^= 0x01
        else:
            rows = [raw[start + 16 * i : start + 16 * (i + 1)] for i in range(6)]
            raw[start:] = b"".join([rows[1], rows[0], *rows[2:]])
        data.write_bytes(bytes(raw))
    elif damage == "garbage_manifest":
        manifest.write_bytes(b"\x00\xff{ not json")
    elif damage == "edited_manifest":
        content = json.loads(manifest.read_text())
        content["arrays"]["data"]["shape"] = [5, 4]
        manifest.write_text(json.dumps(content))
    elif damage == "old_version":
        content = json.loads(manifest.read_text())
        content["format_version"] = FORMAT_VERSION + 1
        from proponents.store import _checksum

        content["checksum"] = _checksum(content)
        manifest.write_text(json.dumps(content))
    entry, why = store.load("k", {"v": 1})
    assert entry is None
    assert words in why, why


def test_array_contents_are_checksummed_and_old_entries_without_one_still_load(tmp_path):
    """Each array's manifest record carries the CRC-32 of its data bytes (streamed over
    appended blocks, equal to zlib's over the whole array), which opening an entry
    checks (before: an edit that kept header, shape and size was served). An entry
    written before checksums were recorded has none and still opens."""
    import zlib

    from proponents.store import _checksum

    store = ArrayStore(tmp_path)
    blocks = [np.random.default_rng(0).standard_normal((n, 3)) for n in (4, 1, 7)]
    _write(store, "k", {}, blocks, extra=np.arange(5, dtype=np.int64))
    content = json.loads(_manifest(tmp_path).read_text())
    whole = np.concatenate(blocks)
    assert content["arrays"]["data"]["crc32"] == zlib.crc32(whole.tobytes())
    assert content["arrays"]["extra"]["crc32"] == zlib.crc32(np.arange(5).tobytes())
    for info in content["arrays"].values():
        del info["crc32"]
    content["checksum"] = _checksum(content)
    _manifest(tmp_path).write_text(json.dumps(content))
    entry, why = store.load("k", {})
    assert why is None and entry is not None
    with entry:
        np.testing.assert_array_equal(entry.read("data"), whole)


def test_manifest_cannot_point_outside(tmp_path):
    store = ArrayStore(tmp_path / "s")
    _write(store, "k", {}, [np.ones((2, 2), np.float32)])
    from proponents.store import _checksum

    path = store.directory / "k.json"
    content = json.loads(path.read_text())
    content["arrays"]["data"]["file"] = "../elsewhere.npy"
    content["checksum"] = _checksum(content)
    path.write_text(json.dumps(content))
    entry, why = store.load("k", {})
    assert entry is None and "invalid file name" in why


def test_invalid_keys_are_refused(tmp_path):
    store = ArrayStore(tmp_path)
    for key in ("../x", "a/b", ".hidden", "", "a~b"):
        with pytest.raises(StoreError):
            store.writer(key, {})


def test_unwritable_directory_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    store = ArrayStore(blocker / "sub")
    with pytest.raises(StoreError, match="a_file"):
        store.ensure_writable()


def test_rows_must_keep_their_shape(tmp_path):
    store = ArrayStore(tmp_path)
    with store.writer("k", {}) as writer:
        writer.append("data", np.zeros((2, 3), np.float32))
        with pytest.raises(StoreError, match="cannot follow"):
            writer.append("data", np.zeros((2, 4), np.float32))


def test_meta_must_be_json(tmp_path):
    with pytest.raises(StoreError, match="JSON"):
        ArrayStore(tmp_path).writer("k", {"x": object()})


# ------------------------------------------------------------------- fingerprints


def test_model_fingerprint_tracks_weights_buffers_and_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    base = model_fingerprint(model)
    assert model_fingerprint(model) == base
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    changed = model_fingerprint(model)
    assert changed != base
    model[1].running_mean.add_(1.0)
    assert model_fingerprint(model) != changed
    assert model_fingerprint(model.double()) != model_fingerprint(model.float())
    # the old-style p.data edit, which bypasses version counters, is seen too
    before = model_fingerprint(model)
    model[0].bias.data.mul_(2)
    assert model_fingerprint(model) != before


def test_dataset_probe_sees_content_changes():
    x = torch.randn(50, 3)
    y = torch.zeros(50)
    a = dataset_probe(TensorDataset(x, y))
    assert a == dataset_probe(TensorDataset(x.clone(), y))
    assert a != dataset_probe(TensorDataset(x.flip(0), y))
    assert a != dataset_probe(TensorDataset(x[:49], y[:49]))
    assert dataset_probe(iter([1, 2])) is None


def test_files_of_the_user_where_the_store_writes_are_not_taken_for_its_own(tmp_path):
    """activation_dir="." with the default model_id puts the store in ./src: a project's own
    src/encoder.json (JSON without the store's format field) is refused with a StoreError
    naming it, never overwritten (before: called a damaged manifest and replaced), and a
    file named like an array of the key but without a token of the store's (encoder~abc~
    notes.npy) survives the cleanup of a build (before: deleted)."""
    from proponents import SimilarityInfluence

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    config = project / "src" / "encoder.json"
    config.write_text('{"my": "config"}')
    notes = project / "src" / "encoder~abc~notes.npy"
    notes.write_bytes(b"user data")

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 3)

        def forward(self, x):
            return self.encoder(x)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(5, 4), torch.zeros(5))
    sim = SimilarityInfluence(Encoder(), "encoder", data, project)
    with pytest.raises(StoreError, match=r"encoder\.json.*not a manifest of this store.*move"):
        sim.influence(torch.randn(2, 4), top_k=2)
    assert config.read_text() == '{"my": "config"}'
    config.rename(project / "my-config.json")
    result = sim.influence(torch.randn(2, 4), top_k=2)
    assert result["encoder"][0].shape == (2, 2)
    assert notes.read_bytes() == b"user data"


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "my-tool.config", "lr": 0.1}',  # JSON of another format
        b"[1, 2, 3]",  # JSON that is not an object
        b'{"a": 1}\n{"a": 2}\n',  # JSON Lines
        b"# settings\nlr: 0.1\n",  # YAML
    ],
    ids=["other-format", "array", "json-lines", "yaml"],
)
def test_a_users_file_at_a_manifest_path_is_refused_and_kept(tmp_path, content):
    """A file this store did not write, found where entry k's manifest goes, is refused
    with an error naming it, and left as it was (before: JSON with another format value,
    or text that is not JSON, was called a damaged manifest and replaced)."""
    store = ArrayStore(tmp_path)
    _manifest(tmp_path).write_bytes(content)
    with pytest.raises(StoreError, match=r"k\.json.*not a manifest of this store.*move"):
        store.load("k", {"v": 1})
    assert _manifest(tmp_path).read_bytes() == content


@pytest.mark.parametrize("cut", [0, 1, 5, 20, 60, -40, -2])
def test_a_cut_off_manifest_of_ours_is_damaged_at_any_length(tmp_path, cut):
    """A manifest of this store cut short anywhere (its text starts alike in every entry:
    sorted keys, "arrays" first) is a damaged entry to rebuild, not a user's file."""
    store = ArrayStore(tmp_path)
    _write(store, "k", {"v": 1}, [np.zeros((3, 2), np.float32)])
    whole = _manifest(tmp_path).read_bytes()
    _manifest(tmp_path).write_bytes(whole[:cut])
    entry, why = store.load("k", {"v": 1})
    assert entry is None and "not valid JSON (damaged)" in why, why
    _write(store, "k", {"v": 1}, [np.ones((3, 2), np.float32)])
    entry, why = store.load("k", {"v": 1})
    assert entry is not None, why
    entry.close()


def test_a_reason_shows_where_two_long_values_differ(tmp_path):
    """Two dataset probes share a long start ('tensors2:' and the same first digest): the
    reason shows each from just before their first difference (before: both cut to the
    same 57 characters, so the message did not say what changed)."""
    store = ArrayStore(tmp_path)
    common = "tensors2:" + "9f8d" * 20 + ":"
    was, now = common + "e551d2564970" * 4, common + "c3bc45b9dddd" * 4
    _write(store, "k", {"probe": was}, [np.zeros((2, 2), np.float32)])
    entry, why = store.load("k", {"probe": now})
    assert entry is None
    shown = re.search(r"probe was (.*), now (.*)$", why)
    assert shown is not None, why
    assert "e551d256" in shown.group(1) and "c3bc45b9" in shown.group(2)
    assert "9f8d" * 20 not in why  # the common start is left out
