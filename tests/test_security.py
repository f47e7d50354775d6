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

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_close, make_case, reference_scores, reference_self
from proponents import SimilarityInfluence, TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.errors import CheckpointLoadError, IndexMismatchError
from proponents.store import StoreRebuildWarning, _checksum


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
