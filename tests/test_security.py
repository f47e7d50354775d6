"""Hostile files and names: nothing runs, nothing is dereferenced, nothing is written outside.

Covered elsewhere, not repeated here:

* the loader refuses pickles that would run code, custom classes and whole pickled
  models: test_checkpoints.py::test_pickle_that_would_run_code_is_refused,
  ::test_pickled_custom_class_is_refused, ::test_whole_pickled_model_is_refused;
  TracInCP end to end:
  test_tracincp_errors.py::test_checkpoint_with_pickled_code_is_refused_not_run;
* a store manifest cannot point at a file outside its directory, and keys cannot
  name one: test_store.py::test_manifest_cannot_point_outside, ::test_invalid_keys_are_refused;
* model_id and inputs_id with ``../`` stay inside activation_dir:
  test_similarity.py::test_model_id_and_inputs_id_stay_inside_activation_dir.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_close, make_case, reference_scores, reference_self
from proponents import SimilarityInfluence, TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.errors import CheckpointLoadError, IndexMismatchError, StoreError
from proponents.report import InfluenceReport
from proponents.store import ArrayStore, StoreRebuildWarning, _checksum, _header_bytes


class RunsCode:
    """Unpickles to ``os.system('touch <marker>')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("cls", [TracInCPFast, TracInCPFastRandProj])
def test_last_layer_methods_refuse_a_checkpoint_that_would_run_code(tmp_path, cls):
    case = make_case("mlp", tmp_path / "ck")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    state = torch.load(case.checkpoints[1], weights_only=True)
    torch.save({**state, "callback": RunsCode(marker)}, evil)
    paths = [case.checkpoints[0], evil, case.checkpoints[2]]
    with pytest.raises(CheckpointLoadError, match=r"evil\.pt.*refuses to unpickle"):
        obj = cls(case.model, "fc2", case.dataset, paths, loss_fn=case.loss_fn("sum"))
        obj.influence(case.test_inputs, case.test_labels)  # TracInCPFast loads lazily
    assert not marker.exists()


def _object_npy(payload: object) -> tuple[bytes, int]:
    """An ``.npy`` file of dtype object whose header and size look consistent.

    Returns the bytes and the row count that makes ``header + rows * 8`` its length.
    """
    buffer = io.BytesIO()
    np.save(buffer, np.array([payload, 1], dtype=object), allow_pickle=True)
    raw = buffer.getvalue()
    body = raw[10 + int.from_bytes(raw[8:10], "little") :]
    body += b"\0" * (-len(body) % 8)
    rows = len(body) // 8
    text = f"{{'descr': '|O', 'fortran_order': False, 'shape': ({rows},), }}"
    length = 64 * ((10 + len(text) + 1 + 63) // 64) - 10
    header = text + " " * (length - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + header.encode() + body, rows


def _forge(folder: Path, manifest_name: str, array: str, marker: Path) -> str:
    """Replace ``array`` of an entry by an object array and re-sign its manifest."""
    path = folder / manifest_name
    manifest = json.loads(path.read_text())
    info = manifest["arrays"][array]
    data, rows = _object_npy(RunsCode(marker))
    (folder / info["file"]).write_bytes(data)
    info["dtype"], info["shape"] = "|O", [rows]
    manifest["checksum"] = _checksum(manifest)
    path.write_text(json.dumps(manifest))
    return info["file"]


def test_index_file_holding_python_objects_is_refused_not_read(tmp_path):
    case = make_case("mlp", tmp_path / "ck")
    loss = case.loss_fn("sum")
    rp = TracInCPFastRandProj(case.model, "fc2", case.dataset, case.checkpoints, loss_fn=loss)
    rp.save(tmp_path / "index")
    marker = tmp_path / "PWNED"
    _forge(tmp_path / "index", "tracin-index.json", "embeddings", marker)
    with pytest.raises(IndexMismatchError, match="Python objects"):
        TracInCPFastRandProj.load(tmp_path / "index", case.model, case.checkpoints, loss)
    assert not marker.exists()


def test_activation_store_holding_python_objects_is_rebuilt_not_read(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    data = TensorDataset(torch.randn(10, 4), torch.zeros(10))
    test = torch.randn(3, 4)
    sim = SimilarityInfluence(model, "0", data, tmp_path / "acts", batch_size=4)
    want = sim.influence(test, top_k=3)["0"]
    marker = tmp_path / "PWNED"
    _forge(tmp_path / "acts" / "src", "0.json", "activations", marker)
    with pytest.warns(StoreRebuildWarning, match="Python objects"):
        got = sim.influence(test, top_k=3)["0"]
    assert torch.equal(got[0], want[0])
    assert not marker.exists()


def test_safetensors_checkpoints_work_end_to_end(tmp_path):
    case = make_case("cnn", tmp_path / "pt")
    folder = tmp_path / "st"
    folder.mkdir()
    for i, (path, lr) in enumerate(zip(case.checkpoints, case.lrs)):
        state = torch.load(path, weights_only=True)["model_state_dict"]
        save_file(state, str(folder / f"step-{i}.safetensors"), metadata={"learning_rate": str(lr)})
    (folder / "README.txt").write_text("ignored")
    loss = case.loss_fn("sum")
    tracin = TracInCP(
        case.model,
        case.dataset,
        folder,
        loss_fn=loss,
        batch_size=5,
        sample_wise_grads_per_batch=True,
    )
    assert_close(tracin.influence(case.test_inputs, case.test_labels), reference_scores(case))
    assert_close(tracin.self_influence(), reference_self(case))
    fast = TracInCPFast(case.model, "fc", case.dataset, folder, loss_fn=loss, batch_size=5)
    exact = fast.influence(case.test_inputs, case.test_labels)
    assert_close(exact, reference_scores(case, ["fc"]))
    rp = TracInCPFastRandProj(case.model, "fc", case.dataset, folder, loss_fn=loss, batch_size=5)
    assert_close(rp.influence(case.test_inputs, case.test_labels, k=None), exact, rtol=1e-5)


def _files_under(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, files in os.walk(root) for f in files}


class Odd(nn.Module):
    """A model whose layer names are absolute paths, traversals and other oddities."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.add_module(name, nn.Linear(4, 4))

    def forward(self, x):
        for name in self.names:
            x = torch.tanh(self._modules[name](x))
        return x


def test_nothing_is_written_outside_the_chosen_directories(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside).replace(".", "_")
    names = [target + "/layer", "/" + target.strip("/") + "~x", "%2F%2Fup", "~root", "a\\b"]
    torch.manual_seed(0)
    model = Odd(names)
    data = TensorDataset(torch.randn(8, 4), torch.zeros(8))
    test = torch.randn(2, 4)
    root = tmp_path / "acts"
    before = _files_under(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model_id in ("", "/" + target.strip("/") + "/id", "../../../id", "~"):
            sim = SimilarityInfluence(model, names, data, root, model_id=model_id, batch_size=3)
            for inputs_id in (None, "../../../../escape", "/" + target.strip("/") + "/in"):
                result = sim.influence(test, top_k=2, inputs_id=inputs_id)
                assert list(result) == names
                reloaded = sim.influence(test, top_k=2, inputs_id=inputs_id)  # read back
                assert all(torch.equal(result[n][0], reloaded[n][0]) for n in names)
    new = _files_under(tmp_path) - before
    assert new and all(root in f.parents for f in new), sorted(map(str, new))
    assert _files_under(outside) == set()
    for f in new:  # every name is one plain component, inside the store's directories
        assert not f.name.startswith(".") or f.name == ".lock", f

    case = make_case("mlp", tmp_path / "ck")
    rp = TracInCPFastRandProj(
        case.model, "fc2", case.dataset, case.checkpoints, loss_fn=case.loss_fn("sum")
    )
    before = _files_under(tmp_path)
    rp.save(tmp_path / "index")
    new = _files_under(tmp_path) - before
    assert new and all((tmp_path / "index") in f.parents for f in new)


# ------------------------------------------------------------------ crafted store files


def _one_entry(folder: Path) -> tuple[ArrayStore, dict, Path]:
    store = ArrayStore(folder)
    with store.lock(), store.writer("e", {"m": 1}) as writer:
        writer.put("a", np.arange(12, dtype=np.float32).reshape(3, 4))
        writer.commit()
    return store, json.loads((folder / "e.json").read_text()), folder / "e.json"


def _resign(manifest: dict, path: Path) -> None:
    manifest["checksum"] = _checksum(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("shape", [(3, 2**62 + 1, 4), (-1, -12)])
def test_a_header_whose_shape_wraps_round_or_is_negative_is_refused(tmp_path, shape):
    # (3, 2**62 + 1, 4) float32 has 12 elements modulo 2**64, so an int64 size check
    # passed a 48-byte file; (-1, -12) multiplies out to 12 as well.
    store, manifest, path = _one_entry(tmp_path / "s")
    info = manifest["arrays"]["a"]
    header = _header_bytes(np.dtype(np.float32), shape, 128)
    data = np.arange(12, dtype=np.float32).tobytes()
    (tmp_path / "s" / info["file"]).write_bytes(header + data)
    info["shape"], info["crc32"] = list(shape), zlib.crc32(data)
    _resign(manifest, path)
    entry, why = store.load("e", {"m": 1})
    assert entry is None
    assert info["file"] in why and "damaged" in why


def test_a_file_name_with_a_nul_byte_is_damage_not_a_crash(tmp_path):
    store, manifest, path = _one_entry(tmp_path / "s")
    manifest["arrays"]["a"]["file"] = "e~0~a\0.npy"
    _resign(manifest, path)
    entry, why = store.load("e", {"m": 1})  # was: ValueError: embedded null byte
    assert entry is None and "invalid file name" in why


def _load_in_thread(store: ArrayStore) -> list:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(store.load("e", {"m": 1})))
    thread.daemon = True
    thread.start()
    thread.join(10)
    return result


@pytest.mark.parametrize("which", ["manifest", "array"])
def test_a_fifo_named_like_a_store_file_is_refused_without_waiting(tmp_path, which):
    store, manifest, path = _one_entry(tmp_path / "s")
    target = path if which == "manifest" else tmp_path / "s" / manifest["arrays"]["a"]["file"]
    target.unlink()
    os.mkfifo(target)
    try:
        result = _load_in_thread(store)
    finally:  # free a reader blocked in open() (before the fix) so the thread ends
        with contextlib.suppress(OSError):
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    assert result, "loading the store waited on a FIFO"
    entry, why = result[0]
    assert entry is None and target.name in why and "not a regular file" in why


def test_an_oversized_manifest_is_not_read_whole(tmp_path):
    # A link to /dev/zero was read without end; a regular file is read up to a bound.
    store, _, path = _one_entry(tmp_path / "s")
    with open(path, "r+b") as fh:
        fh.truncate(256 * 2**20)  # sparse: costs no disk
    tracemalloc.start()
    try:
        entry, why = store.load("e", {"m": 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert entry is None and path.name in why
    assert peak < 100 * 2**20


def test_a_link_planted_as_the_lock_file_creates_nothing_outside(tmp_path):
    outside = tmp_path / "outside" / "created-by-the-lock"
    outside.parent.mkdir()
    folder = tmp_path / "s"
    folder.mkdir()
    os.symlink(outside, folder / ".lock")
    with pytest.raises(StoreError, match=r"\.lock.*symbolic link"), ArrayStore(folder).lock():
        pass
    assert not outside.exists()


def test_a_link_planted_as_the_reports_temporary_file_writes_nothing_outside(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    # the name the temporary file used to have: the process id made it predictable
    os.symlink(outside, out / f".report.html.{os.getpid()}.tmp")
    InfluenceReport(title="t", fragment="<p>x</p>").save(out / "report.html")
    assert outside.read_text() == "keep me"
    assert "<p>x</p>" in (out / "report.html").read_text()
    assert not (out / "report.html").is_symlink()


# ------------------------------------------------- crafted files for the native readers

_CRAFTED_NEIGHBORS = r"""
import json, resource, struct, sys, warnings, zlib
from pathlib import Path
import torch
from proponents.neighbors import {cls}

folder = Path(sys.argv[1])
torch.manual_seed(0)
data = torch.randn(20, 4)
backend = {cls}({args})
backend.setup(data)
backend.save(folder)
index = folder / backend._index_filename
raw = bytearray(index.read_bytes())
{craft}
index.write_bytes(bytes(raw))
meta = json.loads((folder / "neighbors.json").read_text())
meta["index_crc32"] = zlib.crc32(bytes(raw))  # re-signed: the checksum is no defence
(folder / "neighbors.json").write_text(json.dumps(meta))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fresh = {cls}({args})
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    used = fresh.load(folder, data)
indices, _ = fresh.get_nearest_neighbors(torch.ones(1, 4), 3)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"used": used, "warnings": [str(w.message) for w in seen],
                  "grown_kib": grown, "indices": indices.tolist()}}))
"""


def _run_crafted(tmp_path: Path, cls: str, args: str, craft: str) -> dict:
    script = tmp_path / "crafted.py"
    script.write_text(_CRAFTED_NEIGHBORS.format(cls=cls, args=args, craft=craft))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "nn")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_crafted_faiss_file_cannot_claim_memory_beyond_its_size(tmp_path):
    # The flat index's vector count sits at byte 37: claim 2**28 floats (1 GiB), which
    # faiss allocated and zero-filled before finding the file short.
    craft = 'raw[37:45] = struct.pack("<Q", 2**28)'
    got = _run_crafted(tmp_path, "FaissNearestNeighbors", '"Flat"', craft)
    assert not got["used"] and any("rebuilding" in w for w in got["warnings"])
    assert got["grown_kib"] < 256 * 1024, got
    assert len(got["indices"][0]) == 3


@pytest.mark.parametrize(
    "craft",
    [
        # every split node's children far outside the file: a segmentation fault
        "import numpy as np\nnodes = np.frombuffer(raw, '<i4').reshape(-1, 8).copy()\n"
        "nodes[nodes[:, 0] > 7, 1:3] = 10**9\nraw = bytearray(nodes.tobytes())",
        # negative counts of descendants: std::length_error, the process aborted
        "import numpy as np\nnodes = np.frombuffer(raw, '<i4').reshape(-1, 8).copy()\n"
        "nodes[20:, 0] = -5\nnodes[-1, 0] = 20\nraw = bytearray(nodes.tobytes())",
    ],
    ids=["children-outside", "negative-counts"],
)
def test_a_crafted_annoy_file_is_rebuilt_not_searched(tmp_path, craft):
    got = _run_crafted(tmp_path, "AnnoyNearestNeighbors", "num_trees=3", craft)
    assert not got["used"]
    assert any("not a forest Annoy can search" in w for w in got["warnings"]), got
    assert len(got["indices"][0]) == 3
