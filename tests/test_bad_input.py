"""Every public argument, given a wrong type, shape, range or value, gets a typed error.

One table row per (callable, argument, kind of mistake). Each call must raise an error
from :mod:`proponents.errors` (so also a ``ValueError``, ``TypeError``,
``FileNotFoundError`` or ``RuntimeError``) whose message names the argument. A second
test reads the signatures of the public classes and fails when an argument has no row
here and no stated reason to be exempt, so a new argument cannot go untested.

Deeper checks of single arguments live beside their features and are not repeated
here: test_tracincp_errors.py (flag/loss contradictions, checkpoint files),
test_checkpoints.py (the loader), test_neighbors.py (the search backends' settings,
data and queries), test_similarity.py (metrics returning the wrong shape).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Case, make_case
from proponents import (
    AnnoyNearestNeighbors,
    ExactNearestNeighbors,
    FaissNearestNeighbors,
    SimilarityInfluence,
    TracInCP,
    TracInCPFast,
    TracInCPFastRandProj,
    load_flexible_state_dict,
)
from proponents.errors import ProponentsError

N = 13  # training examples of the "mlp" case


@dataclass
class Objects:
    """Working objects that the table's calls start from."""

    case: Case
    tmp: Path
    tracin: TracInCP
    fast: TracInCPFast
    randproj: TracInCPFastRandProj
    index: Path
    similarity: SimilarityInfluence
    neighbors: ExactNearestNeighbors

    @property
    def x(self) -> tuple[torch.Tensor, ...]:
        return self.case.test_inputs

    @property
    def y(self) -> torch.Tensor:
        return self.case.test_labels

    def loss(self, reduction: str = "sum") -> nn.Module:
        return self.case.loss_fn(reduction)

    def tracincp(self, **changes: Any) -> TracInCP:
        kwargs = dict(
            model=self.case.model,
            train_dataset=self.case.dataset,
            checkpoints=self.case.checkpoints,
            loss_fn=self.loss(),
            batch_size=4,
            sample_wise_grads_per_batch=True,
        )
        return TracInCP(**{**kwargs, **changes})

    def fast_kwargs(self, **changes: Any) -> dict[str, Any]:
        kwargs = dict(
            model=self.case.model,
            final_fc_layer="fc2",
            train_dataset=self.case.dataset,
            checkpoints=self.case.checkpoints,
            loss_fn=self.loss(),
            batch_size=4,
        )
        return {**kwargs, **changes}

    def load(self, **changes: Any) -> TracInCPFastRandProj:
        kwargs = dict(
            path=self.index,
            model=self.case.model,
            checkpoints=self.case.checkpoints,
            loss_fn=self.loss(),
        )
        return TracInCPFastRandProj.load(**{**kwargs, **changes})

    def sim(self, **changes: Any) -> SimilarityInfluence:
        kwargs = dict(
            module=self.case.model,
            layers="fc1",
            influence_src_dataset=self.case.dataset,
            activation_dir=self.tmp / "acts",
            batch_size=4,
        )
        return SimilarityInfluence(**{**kwargs, **changes})


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Objects:
    tmp = tmp_path_factory.mktemp("bad-input")
    case = make_case("mlp", tmp / "ckpts")
    loss = case.loss_fn("sum")
    randproj = TracInCPFastRandProj(
        case.model, "fc2", case.dataset, case.checkpoints, loss_fn=loss, batch_size=4
    )
    index = tmp / "index"
    randproj.save(index)
    (tmp / "a-file").write_text("not a directory")
    neighbors = ExactNearestNeighbors()
    neighbors.setup(torch.randn(6, 3))
    objects = Objects(
        case=case,
        tmp=tmp,
        tracin=TracInCP(
            case.model,
            case.dataset,
            case.checkpoints,
            loss_fn=loss,
            batch_size=4,
            sample_wise_grads_per_batch=True,
        ),
        fast=TracInCPFast(case.model, "fc2", case.dataset, case.checkpoints, loss_fn=loss),
        randproj=randproj,
        index=index,
        similarity=None,  # type: ignore[arg-type]
        neighbors=neighbors,
    )
    objects.similarity = objects.sim()
    return objects


def _empty() -> TensorDataset:
    return TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))


def _shuffled(o: Objects) -> DataLoader:
    return DataLoader(o.case.dataset, batch_size=4, shuffle=True)


def _returns_text(model: nn.Module, checkpoint: Any) -> str:
    load_flexible_state_dict(model, checkpoint)
    return "fast"


@dataclass
class Row:
    target: str  # "Class.method.argument"
    what: str  # the mistake
    call: Callable[[Objects], Any]
    base: type[Exception]  # the built-in exception the error must also be
    names: tuple[str, ...] = ()  # text the message must contain; default: the argument


def row(target, what, call, base, *names) -> Row:
    return Row(target, what, call, base, names)


T, F, R, S = "TracInCP", "TracInCPFast", "TracInCPFastRandProj", "SimilarityInfluence"
V, Ty = ValueError, TypeError

# fmt: off
ROWS: list[Row] = [
    # ---------------------------------------------------------------- TracInCP()
    row(f"{T}.__init__.model", "type", lambda o: o.tracincp(model="net"), Ty),
    row(f"{T}.__init__.model", "DataParallel", lambda o: o.tracincp(
        model=nn.DataParallel(o.case.model)), Ty, "DataParallel", "model.module"),
    row(f"{T}.__init__.train_dataset", "type", lambda o: o.tracincp(train_dataset={1, 2}), Ty),
    row(f"{T}.__init__.train_dataset", "empty", lambda o: o.tracincp(train_dataset=_empty()), V),
    row(f"{T}.__init__.train_dataset", "shuffling", lambda o: o.tracincp(
        train_dataset=_shuffled(o)), V),
    row(f"{T}.__init__.checkpoints", "type", lambda o: o.tracincp(checkpoints=42), Ty),
    row(f"{T}.__init__.checkpoints", "empty", lambda o: o.tracincp(checkpoints=[]),
        FileNotFoundError),
    row(f"{T}.__init__.checkpoints", "missing", lambda o: o.tracincp(
        checkpoints=[o.tmp / "gone.pt"]), FileNotFoundError, "checkpoint", "gone.pt"),
    row(f"{T}.__init__.checkpoints_load_func", "type", lambda o: o.tracincp(
        checkpoints_load_func="torch.load"), Ty),
    row(f"{T}.__init__.checkpoints_load_func", "returns text", lambda o: o.tracincp(
        checkpoints_load_func=_returns_text).influence(), RuntimeError),
    row(f"{T}.__init__.layers", "type", lambda o: o.tracincp(layers=5), Ty),
    row(f"{T}.__init__.layers", "element type", lambda o: o.tracincp(layers=[1]), Ty),
    row(f"{T}.__init__.layers", "unknown", lambda o: o.tracincp(layers=["fc3"]), V),
    row(f"{T}.__init__.layers", "empty", lambda o: o.tracincp(layers=[]), V),
    row(f"{T}.__init__.layers", "no parameters", lambda o: o.tracincp(layers=["act"]), V),
    row(f"{T}.__init__.loss_fn", "type", lambda o: o.tracincp(loss_fn=3), Ty),
    row(f"{T}.__init__.loss_fn", "bad reduction", lambda o: o.tracincp(
        loss_fn=nn.CrossEntropyLoss(reduction="batchmean")), V),
    row(f"{T}.__init__.batch_size", "zero", lambda o: o.tracincp(batch_size=0), V),
    row(f"{T}.__init__.batch_size", "float", lambda o: o.tracincp(batch_size=2.5), V),
    row(f"{T}.__init__.batch_size", "str", lambda o: o.tracincp(batch_size="4"), V),
    row(f"{T}.__init__.distributed", "str", lambda o: o.tracincp(distributed="yes"), Ty),
    row(f"{T}.__init__.distributed", "no process group", lambda o: o.tracincp(
        distributed=True), V),
    row(f"{T}.__init__.sample_wise_grads_per_batch", "int", lambda o: o.tracincp(
        sample_wise_grads_per_batch=1), Ty),
    row(f"{T}.__init__.sample_wise_grads_per_batch", "contradicts loss", lambda o: o.tracincp(
        sample_wise_grads_per_batch=False), V),
    # ------------------------------------------------------- TracInCP.influence()
    row(f"{T}.influence.inputs", "no batch dimension", lambda o: o.tracin.influence(
        (torch.tensor(1.0),), o.y), V),
    row(f"{T}.influence.inputs", "int", lambda o: o.tracin.influence(3, o.y), V),
    row(f"{T}.influence.inputs", "empty tuple", lambda o: o.tracin.influence((), o.y), V),
    row(f"{T}.influence.inputs", "shuffling DataLoader", lambda o: o.tracin.influence(
        _shuffled(o)), V),
    row(f"{T}.influence.targets", "type", lambda o: o.tracin.influence(o.x, "cats"), Ty),
    row(f"{T}.influence.targets", "scalar", lambda o: o.tracin.influence(
        o.x, torch.tensor(1)), Ty),
    row(f"{T}.influence.targets", "length", lambda o: o.tracin.influence(o.x, o.y[:3]), V),
    row(f"{T}.influence.targets", "missing", lambda o: o.tracin.influence(o.x), V),
    row(f"{T}.influence.targets", "without inputs", lambda o: o.tracin.influence(
        None, o.y), V),
    row(f"{T}.influence.targets", "with a DataLoader", lambda o: o.tracin.influence(
        DataLoader(o.case.dataset), o.y), V),
    row(f"{T}.influence.k", "float", lambda o: o.tracin.influence(o.x, o.y, k=2.0), Ty),
    row(f"{T}.influence.k", "bool", lambda o: o.tracin.influence(o.x, o.y, k=True), Ty),
    row(f"{T}.influence.k", "zero", lambda o: o.tracin.influence(o.x, o.y, k=0), V),
    row(f"{T}.influence.k", "above N", lambda o: o.tracin.influence(o.x, o.y, k=N + 1), V),
    row(f"{T}.influence.proponents", "str", lambda o: o.tracin.influence(
        o.x, o.y, k=2, proponents="no"), Ty),
    row(f"{T}.influence.unpack_inputs", "str", lambda o: o.tracin.influence(
        o.x, o.y, unpack_inputs="no"), Ty),
    row(f"{T}.influence.show_progress", "str", lambda o: o.tracin.influence(
        o.x, o.y, show_progress="no"), Ty),
    row(f"{T}.influence.aggregate", "int", lambda o: o.tracin.influence(
        o.x, o.y, aggregate=1), Ty),
    # --------------------------------------------------- TracInCP.self_influence()
    row(f"{T}.self_influence.inputs_dataset", "int", lambda o: o.tracin.self_influence(3), V),
    row(f"{T}.self_influence.inputs_dataset", "one-element batch", lambda o: o.tracin
        .self_influence((o.x[0],)), V),
    row(f"{T}.self_influence.inputs_dataset", "empty", lambda o: o.tracin.self_influence(
        _empty()), V),
    row(f"{T}.self_influence.inputs_dataset", "shuffling", lambda o: o.tracin.self_influence(
        _shuffled(o)), V),
    row(f"{T}.self_influence.show_progress", "str", lambda o: o.tracin.self_influence(
        show_progress="yes"), Ty),
    # ------------------------------------------------------------- TracInCPFast()
    row(f"{F}.__init__.model", "type", lambda o: TracInCPFast(**o.fast_kwargs(model=None)), Ty),
    row(f"{F}.__init__.model", "DataParallel", lambda o: TracInCPFast(**o.fast_kwargs(
        model=nn.DataParallel(o.case.model))), Ty, "DataParallel", "model.module"),
    row(f"{F}.__init__.final_fc_layer", "type", lambda o: TracInCPFast(
        **o.fast_kwargs(final_fc_layer=3)), Ty),
    row(f"{F}.__init__.final_fc_layer", "unknown", lambda o: TracInCPFast(
        **o.fast_kwargs(final_fc_layer="head")), V),
    row(f"{F}.__init__.final_fc_layer", "not Linear", lambda o: TracInCPFast(
        **o.fast_kwargs(final_fc_layer="act")), V),
    row(f"{F}.__init__.final_fc_layer", "foreign module", lambda o: TracInCPFast(
        **o.fast_kwargs(final_fc_layer=nn.Linear(8, 3))), V),
    row(f"{F}.__init__.train_dataset", "type", lambda o: TracInCPFast(
        **o.fast_kwargs(train_dataset=torch.zeros(3))), Ty),
    row(f"{F}.__init__.checkpoints", "type", lambda o: TracInCPFast(
        **o.fast_kwargs(checkpoints=3.5)), Ty),
    row(f"{F}.__init__.checkpoints_load_func", "type", lambda o: TracInCPFast(
        **o.fast_kwargs(checkpoints_load_func=None)), Ty),
    row(f"{F}.__init__.loss_fn", "missing", lambda o: TracInCPFast(
        **o.fast_kwargs(loss_fn=None)), V),
    row(f"{F}.__init__.loss_fn", "per-example", lambda o: TracInCPFast(
        **o.fast_kwargs(loss_fn=o.loss("none"))), V),
    row(f"{F}.__init__.batch_size", "negative", lambda o: TracInCPFast(
        **o.fast_kwargs(batch_size=-1)), V),
    row(f"{F}.__init__.vectorize", "str", lambda o: TracInCPFast(
        **o.fast_kwargs(vectorize="yes")), Ty),
    row(f"{F}.influence.k", "above N", lambda o: o.fast.influence(o.x, o.y, k=N + 1), V),
    row(f"{F}.influence.proponents", "None", lambda o: o.fast.influence(
        o.x, o.y, k=1, proponents=None), Ty),
    row(f"{F}.self_influence.inputs_dataset", "str", lambda o: o.fast.self_influence("x"), V),
    # ---------------------------------------------------- TracInCPFastRandProj()
    row(f"{R}.__init__.model", "type", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(model="net")), Ty),
    row(f"{R}.__init__.model", "DataParallel", lambda o: TracInCPFastRandProj(**o.fast_kwargs(
        model=nn.DataParallel(o.case.model))), Ty, "DataParallel", "model.module"),
    row(f"{R}.__init__.final_fc_layer", "not Linear", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(final_fc_layer="act")), V),
    row(f"{R}.__init__.train_dataset", "shuffling", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(train_dataset=_shuffled(o))), V),
    row(f"{R}.__init__.checkpoints", "empty", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(checkpoints=iter([]))), FileNotFoundError),
    row(f"{R}.__init__.checkpoints_load_func", "type", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(checkpoints_load_func=1)), Ty),
    row(f"{R}.__init__.loss_fn", "type", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(loss_fn="ce")), Ty),
    row(f"{R}.__init__.batch_size", "zero", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(batch_size=0)), V),
    row(f"{R}.__init__.vectorize", "None", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(vectorize=None)), Ty),
    row(f"{R}.__init__.nearest_neighbors", "str", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(nearest_neighbors="exact")), Ty),
    row(f"{R}.__init__.nearest_neighbors", "class, not instance", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(nearest_neighbors=ExactNearestNeighbors)), Ty),
    row(f"{R}.__init__.projection_dim", "zero", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(projection_dim=0)), V),
    row(f"{R}.__init__.projection_dim", "float", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(projection_dim=8.0)), Ty),
    row(f"{R}.__init__.seed", "str", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(seed="1")), Ty),
    row(f"{R}.__init__.seed", "float", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(seed=1.5)), Ty),
    row(f"{R}.__init__.distributed", "int", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(distributed=1)), Ty),
    row(f"{R}.__init__.show_progress", "str", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(show_progress="no")), Ty),
    row(f"{R}.__init__.memory_budget", "negative", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(memory_budget=-1)), V),
    row(f"{R}.__init__.memory_budget", "float", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(memory_budget=1e6)), Ty),
    row(f"{R}.__init__.index_dtype", "str", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(index_dtype="float16")), Ty),
    row(f"{R}.__init__.index_dtype", "float64", lambda o: TracInCPFastRandProj(
        **o.fast_kwargs(index_dtype=torch.float64)), V),
    row(f"{R}.influence.inputs", "no batch dimension", lambda o: o.randproj.influence(
        (torch.tensor(2.0),), o.y), V),
    row(f"{R}.influence.inputs", "shuffling DataLoader", lambda o: o.randproj.influence(
        _shuffled(o)), V),
    row(f"{R}.influence.aggregate", "int", lambda o: o.randproj.influence(
        o.x, o.y, aggregate=1), Ty),
    row(f"{R}.influence.targets", "missing", lambda o: o.randproj.influence(o.x), V),
    row(f"{R}.influence.targets", "length", lambda o: o.randproj.influence(o.x, o.y[:1]), V),
    row(f"{R}.influence.k", "zero", lambda o: o.randproj.influence(o.x, o.y, k=0), V),
    row(f"{R}.influence.k", "above N", lambda o: o.randproj.influence(o.x, o.y, k=N + 1), V),
    row(f"{R}.influence.k", "float", lambda o: o.randproj.influence(o.x, o.y, k=2.0), Ty),
    row(f"{R}.influence.proponents", "str", lambda o: o.randproj.influence(
        o.x, o.y, proponents="no"), Ty),
    row(f"{R}.influence.unpack_inputs", "str", lambda o: o.randproj.influence(
        o.x, o.y, unpack_inputs="no"), Ty),
    row(f"{R}.influence.show_progress", "int", lambda o: o.randproj.influence(
        o.x, o.y, show_progress=1), Ty),
    row(f"{R}.save.path", "type", lambda o: o.randproj.save(3), Ty),
    row(f"{R}.save.path", "a file", lambda o: o.randproj.save(o.tmp / "a-file"), V,
        "a-file"),
    row(f"{R}.save.path", "empty", lambda o: o.randproj.save(""), V, "path is empty"),
    row(f"{R}.load.path", "type", lambda o: o.load(path=None), Ty),
    row(f"{R}.load.path", "no index there", lambda o: o.load(path=o.tmp / "nothing"),
        FileNotFoundError),
    row(f"{R}.load.model", "type", lambda o: o.load(model="net"), Ty),
    row(f"{R}.load.model", "DataParallel", lambda o: o.load(
        model=nn.DataParallel(o.case.model)), Ty, "DataParallel", "model.module"),
    row(f"{R}.load.loss_fn", "missing", lambda o: o.load(loss_fn=None), V),
    row(f"{R}.load.batch_size", "zero", lambda o: o.load(batch_size=0), V),
    row(f"{R}.load.distributed", "str", lambda o: o.load(distributed="no"), Ty),
    row(f"{R}.load.memory_budget", "bool", lambda o: o.load(memory_budget=True), Ty),
    row(f"{R}.load.memory_budget", "negative", lambda o: o.load(memory_budget=-5), V),
    row(f"{R}.load.index_dtype", "int dtype", lambda o: o.load(index_dtype=torch.int8), V),
    row(f"{R}.load.index_dtype", "str", lambda o: o.load(index_dtype="half"), Ty),
    row(f"{R}.load.checkpoints", "type", lambda o: o.load(checkpoints=7), Ty),
    row(f"{R}.load.checkpoints", "other checkpoints", lambda o: o.load(
        checkpoints=o.case.checkpoints[:2]), V),
    row(f"{R}.load.loss_fn", "type", lambda o: o.load(loss_fn=3), Ty),
    row(f"{R}.load.loss_fn", "missing", lambda o: o.load(loss_fn=None), V),
    row(f"{R}.load.train_dataset", "type", lambda o: o.load(train_dataset={1}), Ty),
    row(f"{R}.load.final_fc_layer", "type", lambda o: o.load(final_fc_layer=2), Ty),
    row(f"{R}.load.final_fc_layer", "not the saved one", lambda o: o.load(
        final_fc_layer="fc1"), V),
    row(f"{R}.load.checkpoints_load_func", "type", lambda o: o.load(
        checkpoints_load_func="load"), Ty),
    row(f"{R}.load.batch_size", "zero", lambda o: o.load(
        batch_size=0, train_dataset=o.case.dataset), V),
    row(f"{R}.load.nearest_neighbors", "type", lambda o: o.load(nearest_neighbors={}), Ty),
    # ------------------------------------------------------ SimilarityInfluence()
    row(f"{S}.__init__.module", "type", lambda o: o.sim(module=3), Ty),
    row(f"{S}.__init__.module", "DataParallel", lambda o: o.sim(
        module=nn.DataParallel(o.case.model)), Ty, "DataParallel", "module.module"),
    row(f"{S}.__init__.distributed", "str", lambda o: o.sim(distributed="all"), Ty),
    row(f"{S}.__init__.layers", "type", lambda o: o.sim(layers=3), Ty),
    row(f"{S}.__init__.layers", "unknown", lambda o: o.sim(layers="fc9"), V),
    row(f"{S}.__init__.layers", "empty", lambda o: o.sim(layers=[]), V),
    row(f"{S}.__init__.influence_src_dataset", "type", lambda o: o.sim(
        influence_src_dataset={1, 2}), Ty),
    row(f"{S}.__init__.influence_src_dataset", "empty", lambda o: o.sim(
        influence_src_dataset=_empty()), V),
    row(f"{S}.__init__.influence_src_dataset", "shuffling", lambda o: o.sim(
        influence_src_dataset=_shuffled(o)), V),
    row(f"{S}.__init__.activation_dir", "type", lambda o: o.sim(activation_dir=3), Ty),
    row(f"{S}.__init__.activation_dir", "under a file", lambda o: o.sim(
        activation_dir=o.tmp / "a-file" / "acts"), RuntimeError, "a-file"),
    row(f"{S}.__init__.model_id", "type", lambda o: o.sim(model_id=3), Ty),
    row(f"{S}.__init__.similarity_metric", "str", lambda o: o.sim(similarity_metric="cos"), Ty),
    row(f"{S}.__init__.similarity_direction", "unknown", lambda o: o.sim(
        similarity_direction="up"), V),
    row(f"{S}.__init__.batch_size", "zero", lambda o: o.sim(batch_size=0), V),
    row(f"{S}.__init__.batch_size", "float", lambda o: o.sim(batch_size=1.5), V),
    row(f"{S}.__init__.channels_last", "str", lambda o: o.sim(channels_last="auto"), Ty),
    row(f"{S}.__init__.channels_last", "int 1", lambda o: o.sim(channels_last=1), Ty),
    row(f"{S}.__init__.kwargs", "unknown keyword", lambda o: o.sim(colour="red"), Ty,
        "colour"),
    row(f"{S}.__init__.kwargs", "replace_nan type", lambda o: o.sim(replace_nan="x"), Ty,
        "replace_nan"),
    row(f"{S}.influence.inputs", "None", lambda o: o.similarity.influence(None), V),
    row(f"{S}.influence.inputs", "empty tuple", lambda o: o.similarity.influence(()), V),
    row(f"{S}.influence.inputs", "wrong feature shape", lambda o: o.similarity.influence(
        torch.randn(2, 2, 6)), V),
    row(f"{S}.influence.top_k", "zero", lambda o: o.similarity.influence(o.x, top_k=0), V),
    row(f"{S}.influence.top_k", "above N", lambda o: o.similarity.influence(
        o.x, top_k=N + 1), V),
    row(f"{S}.influence.top_k", "str", lambda o: o.similarity.influence(o.x, top_k="1"), Ty),
    row(f"{S}.influence.load_src_from_disk", "str", lambda o: o.similarity.influence(
        o.x, load_src_from_disk="no"), Ty),
    row(f"{S}.influence.load_input_from_disk", "str", lambda o: o.similarity.influence(
        o.x, load_input_from_disk="no"), Ty),
    row(f"{S}.influence.load_input_from_disk", "without inputs_id", lambda o: o.similarity
        .influence(o.x, load_input_from_disk=True), V),
    row(f"{S}.influence.inputs_id", "int", lambda o: o.similarity.influence(
        o.x, inputs_id=3), Ty),
    row(f"{S}.influence.inputs_id", "empty", lambda o: o.similarity.influence(
        o.x, inputs_id=""), Ty),
    row(f"{S}.influence.show_progress", "str", lambda o: o.similarity.influence(
        o.x, show_progress="no"), Ty),
    row(f"{S}.influence.kwargs", "unknown keyword", lambda o: o.similarity.influence(
        o.x, topk=3), Ty, "topk"),
    # ------------------------------------------- load_flexible_state_dict, backends
    row("load_flexible_state_dict.model", "type", lambda o: load_flexible_state_dict(
        "net", {}), Ty),
    row("load_flexible_state_dict.path", "type", lambda o: load_flexible_state_dict(
        o.case.model, 42), Ty, "checkpoint"),
    row("load_flexible_state_dict.device", "type", lambda o: load_flexible_state_dict(
        o.case.model, o.case.checkpoints[0], device=1.5), Ty),
    row("load_flexible_state_dict.device", "unknown", lambda o: load_flexible_state_dict(
        o.case.model, o.case.checkpoints[0], device="gpu0"), V),
    row("ExactNearestNeighbors.save.directory", "type", lambda o: o.neighbors.save(3), Ty),
    row("ExactNearestNeighbors.load.directory", "type", lambda o: o.neighbors.load(
        3, torch.randn(6, 3)), Ty),
    row("ExactNearestNeighbors.load.data", "type", lambda o: o.neighbors.load(
        o.tmp, "data"), Ty),
]
# fmt: on

# Arguments without a row, and why.
EXEMPT = {
    f"{R}.__init__._embeddings": "private: set by load() only",
    f"{S}.influence.additional_forward_args": "any object is a valid extra model argument",
}
# Checked in detail elsewhere; listed so that the completeness test knows.
ELSEWHERE = {
    "ExactNearestNeighbors.__init__.block_size": "test_neighbors.py::test_bad_exact_settings",
    "AnnoyNearestNeighbors.__init__.num_trees": "test_neighbors.py::test_bad_annoy_settings",
    "AnnoyNearestNeighbors.__init__.n_trees": (
        "test_captum_compat.py::test_annoy_refuses_num_trees_and_n_trees_together"
    ),
    "AnnoyNearestNeighbors.__init__.search_k": "test_neighbors.py::test_bad_annoy_settings",
    "AnnoyNearestNeighbors.__init__.seed": "test_neighbors.py::test_bad_annoy_settings",
    "FaissNearestNeighbors.__init__.index_factory": "test_neighbors.py::test_bad_faiss_settings",
    "FaissNearestNeighbors.__init__.nprobe": "test_neighbors.py::test_bad_faiss_settings",
    "ExactNearestNeighbors.setup.data": "test_neighbors.py::test_bad_data",
    "ExactNearestNeighbors.get_nearest_neighbors.query": "test_neighbors.py::test_bad_query",
    "ExactNearestNeighbors.get_nearest_neighbors.k": "test_neighbors.py::test_bad_query",
}

PUBLIC = {
    T: (TracInCP, ("__init__", "influence", "self_influence")),
    F: (TracInCPFast, ("__init__", "influence", "self_influence")),
    R: (TracInCPFastRandProj, ("__init__", "influence", "save", "load")),
    S: (SimilarityInfluence, ("__init__", "influence")),
    "load_flexible_state_dict": (load_flexible_state_dict, (None,)),
    "ExactNearestNeighbors": (
        ExactNearestNeighbors,
        ("__init__", "setup", "get_nearest_neighbors", "save", "load"),
    ),
    "AnnoyNearestNeighbors": (AnnoyNearestNeighbors, ("__init__",)),
    "FaissNearestNeighbors": (FaissNearestNeighbors, ("__init__",)),
}
# Methods that share one implementation: a row for the first stands for the others.
SAME_CODE = {F: T}


def _names_argument(message: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(text)}(?![A-Za-z0-9_])", message) is not None


@pytest.mark.parametrize("case", ROWS, ids=[f"{r.target}[{r.what}]" for r in ROWS])
def test_bad_argument_gets_a_typed_error_naming_it(objects, case):
    with pytest.raises(ProponentsError) as info:
        case.call(objects)
    error = info.value
    assert isinstance(error, case.base), f"{type(error).__mro__} is not a {case.base}"
    message = str(error)
    names = case.names or (case.target.rsplit(".", 1)[1],)
    assert any(_names_argument(message, n) for n in names), (names, message)


def _parameters():
    for owner, (obj, methods) in PUBLIC.items():
        for method in methods:
            func = obj if method is None else getattr(obj, method)
            prefix = owner if method is None else f"{owner}.{method}"
            for name, param in inspect.signature(func).parameters.items():
                if name in ("self", "cls"):
                    continue
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    name = "kwargs"
                yield owner, prefix, name


def test_every_public_argument_has_a_row():
    covered = {r.target for r in ROWS}
    missing = []
    for owner, prefix, name in _parameters():
        target = f"{prefix}.{name}"
        same = target.replace(f"{owner}.", f"{SAME_CODE[owner]}.", 1) if owner in SAME_CODE else ""
        if target in covered or target in EXEMPT or target in ELSEWHERE or same in covered:
            continue
        missing.append(target)
    assert not missing, f"arguments without a bad-input row: {missing}"
