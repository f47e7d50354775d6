"""TracInCPFast and TracInCPFastRandProj: TracIn on the final linear layer.

Both are exact restrictions of :class:`~proponents.TracInCP` to the parameters of
``final_fc_layer`` (weight *and* bias). The loss gradient is taken at that layer's
output, so layers after it (a softmax, a nonlinearity) are accounted for, and the
per-example gradient ``g a^T`` is never formed for inner products: one forward pass
and one backward pass to the layer's output per batch.

:class:`TracInCPFastRandProj` embeds every training example once, at construction:
per checkpoint, ``sqrt(lr_c)`` times the (optionally randomly projected) final-layer
gradient, concatenated over checkpoints, so that an influence score is one inner
product and proponents are a nearest-neighbour query.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from proponents.checkpoints import (
    CheckpointWatch,
    checkpoint_kind,
    checkpoint_label,
    load_flexible_state_dict,
    loaded_fingerprint,
)
from proponents.checks import check_flag, check_int, check_path
from proponents.data import (
    ListDataset,
    dataset_length,
    labels_inside_hint,
    loader_batches,
    model_device,
    test_batches,
)
from proponents.distributed import (
    TEST_INPUTS,
    even_rows,
    finite_first_order,
    resolve_distributed,
    shard_range,
    sharded_local_rows,
    test_inputs_digest,
)
from proponents.errors import (
    ArgumentTypeError,
    CheckpointChangedError,
    IndexMismatchError,
    IndexNotFoundError,
    InvalidArgumentError,
    article,
    count,
    first_names,
)
from proponents.fingerprints import (
    architecture,
    attribute_lines,
    dataset_probe,
    loader_probe,
    loss_fingerprint,
    losses_differ,
    probes_differ,
)
from proponents.gradients.engine import GradientEngine
from proponents.gradients.loss import resolve_loss
from proponents.gradients.representations import DenseGrads, Grads, as_dense, widened
from proponents.gradients.selection import canonical_module_name, named_modules, resolve_layers
from proponents.influence.base import KMostInfluentialResults, TracInCPBase
from proponents.module_settings import ATTRIBUTE_TEXTS
from proponents.neighbors import ExactNearestNeighbors, NearestNeighbors
from proponents.neighbors.base import IndexedNearestNeighbors, rescored
from proponents.neighbors.exact import DEFAULT_BLOCK_SIZE, block_scores
from proponents.neighbors.foreign import (
    ForeignNearestNeighbors,
    NearestNeighborsLike,
    as_nearest_neighbors,
)
from proponents.neighbors.ownership import claim, holds
from proponents.progress import Progress
from proponents.projection import GradientProjection
from proponents.scoring import NonFiniteTracker, TracInRunner, k_most
from proponents.store import ArrayStore, DiskMatrix, register_mapped, release_rows
from proponents.user_warnings import warn

INDEX_KEY = "tracin-index"
INDEX_FORMAT = 1
_INDEX_DTYPES = (torch.float32, torch.float16)
#: Bound on |seed|: checkpoint c's projection generator gets seed * 1_000_003 + c.
_SEED_LIMIT = 2**43
#: Largest finite float16 value.
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)
#: Rows of the embedding matrix handled at a time when it is scanned block by block.
_SCAN_ROWS = 8192


def _index_differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What a saved index was built for that differs from this load, by argument name."""
    out = []
    if saved.get("index_format") != expected["index_format"]:
        out.append(
            f"it was written in index format {saved.get('index_format')!r}, and this version "
            f"of proponents reads format {expected['index_format']!r}"
        )
    was, now = list(saved.get("checkpoints") or []), expected["checkpoints"]
    if len(was) != len(now):
        out.append(f"checkpoints: the index was built from {len(was)}, {len(now)} were given")
    else:
        changed = [i + 1 for i, (a, b) in enumerate(zip(was, now)) if a != b]
        kinds = expected["checkpoint_kinds"]
        then = saved.get("checkpoint_kinds") or kinds
        other_kind = [i for i in changed if then[i - 1] != kinds[i - 1]]
        if other_kind:
            shown = ", ".join(f"{i} ({then[i - 1]} then, {kinds[i - 1]} now)" for i in other_kind)
            out.append(
                f"checkpoints: checkpoint(s) {shown} are not given as the index was built "
                "from them, and a file's fingerprint (its bytes) cannot be compared with a "
                "loaded object's (its tensors): pass each checkpoint as a path or as a "
                "loaded object, as when the index was built"
            )
        changed = [i for i in changed if i not in other_kind]
        if changed:
            names = expected.get("checkpoint_names") or []
            shown = ", ".join(
                f"{i} ({names[i - 1]})" if i <= len(names) else str(i) for i in changed
            )
            out.append(
                f"checkpoints: the contents of checkpoint(s) {shown} of {len(now)} differ "
                "from those the index was built from"
            )
    if saved.get("dataset_length") != expected["dataset_length"]:
        out.append(
            f"train_dataset: the index holds {saved.get('dataset_length')} examples, the "
            f"dataset given has {expected['dataset_length']}"
        )
    else:
        was_probe, now_probe = saved.get("dataset_probe"), expected.get("dataset_probe")
        if probes_differ(was_probe, now_probe):
            out.append(
                "train_dataset: it has as many examples as the index, but the examples "
                "sampled from it (the first, the last and three in between), or for a "
                "TensorDataset any of its values, differ from those the index was embedded "
                "from (another dataset, order, transform or dtype)"
            )
    was_arch, now_arch = saved.get("architecture"), expected["architecture"]
    if was_arch is not None and was_arch != now_arch:
        out.append("model: " + _architecture_difference(was_arch, now_arch))
    else:
        was_attrs, now_attrs = saved.get("module_attributes"), expected["module_attributes"]
        settings = [] if was_attrs is None else _changed_settings(was_attrs, now_attrs)
        if settings:
            out.append(
                "model: its modules' settings differ from those of the model the index was "
                f"built with ({'; '.join(settings[:3])}); the embeddings are gradients of that "
                "model"
            )
    if saved.get("final_fc_layer") != expected["final_fc_layer"]:
        out.append(
            f"final_fc_layer: the index was built for {saved.get('final_fc_layer')!r}, "
            f"not {expected['final_fc_layer']!r}"
        )
    was_proj, now_proj = saved.get("projections"), expected.get("projections")
    # one width per checkpoint: with another number of checkpoints, that is the difference
    if (
        was_proj is not None
        and now_proj is not None
        and len(was_proj) == len(now_proj)
        and was_proj != now_proj
    ):
        out.append(
            "final_fc_layer: the index holds embeddings of widths "
            f"{[d for _, d in was_proj]} per checkpoint, and this model's layer gives "
            f"{[d for _, d in now_proj]} (another layer size or bias, or, for a layer of "
            "over 2**25 gradient entries, an index saved before projections were bounded by "
            "projection_dim: build it again)"
        )
    was_reduction = saved.get("loss_reduction")
    if (
        was_reduction == "sum"
        and expected["loss_reduction"] == "mean"
        and expected.get("loss_reduction_by_signature")
    ):
        # An index written before reductions were read from signatures took such a loss
        # (F.cross_entropy) as a sum; its embeddings are each example's own loss
        # gradients all the same (the strategy check saw the mean), so they still match.
        was_reduction = "mean"
    if was_reduction != expected["loss_reduction"]:
        out.append(
            f"loss_fn: the index was built with a loss reducing by "
            f"{saved.get('loss_reduction')!r}, this one reduces by "
            f"{expected['loss_reduction']!r} (the scores scale with it)"
        )
    else:
        was_loss, now_loss = saved.get("loss"), expected.get("loss")
        if was_loss is not None and now_loss is not None and losses_differ(was_loss, now_loss):
            same_class = was_loss.get("class") == now_loss.get("class")
            if not same_class:
                how = f", this one is {now_loss.get('class')}"
            elif was_loss.get("digest") != now_loss.get("digest"):
                how = (
                    " with other settings or weights (reduction, ignore_index, "
                    "label_smoothing, class weights, ...)"
                )
            else:  # two functions of one name (lambdas, say) that compute differently
                how = ", a function of the same name whose code, defaults or captured values differ"
            out.append(
                f"loss_fn: the index was built with {was_loss.get('class')}{how}; its "
                "embeddings are gradients of that loss"
            )
    return out


def _architecture_difference(was: list[str], now: list[str]) -> str:
    """The first module that differs between a saved index's model and this one."""
    for i, (a, b) in enumerate(zip(was, now)):
        if a != b:
            return (
                f"its modules differ from those of the model the index was built with, first "
                f"at module {i + 1}: {b!r} now, {a!r} then (the embeddings are gradients of "
                "that model)"
            )
    return (
        f"it has {len(now)} modules, the model the index was built with had {len(was)} "
        f"(first unmatched: {(now[len(was)] if len(now) > len(was) else was[len(now)])!r})"
    )


def _changed_settings(was: list[str], now: list[str]) -> list[str]:
    """``"module.attribute=value now, value then"`` for each module setting (a
    ``"module.attribute=value"`` line of :func:`~proponents.fingerprints.attribute_lines`)
    that both models have, with another value. A setting only one of them has is not
    compared: it may be state a forward updates (left out once seen changing, so an
    index saved after calls lacks it), not a setting."""
    then = dict(line.split("=", 1) for line in was)
    return [
        f"{key}={value} now, {then[key]} then"
        for key, value in (line.split("=", 1) for line in now)
        if key in then and then[key] != value
    ]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The manifest fields load() reads as values, and what each must be.
_INDEX_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "final_fc_layer": ("a layer name", lambda v: isinstance(v, str)),
    "dataset_length": ("a count", lambda v: _is_int(v) and v >= 0),
    "seed": ("an integer", _is_int),
    "projection_dim": ("None or a positive integer", lambda v: v is None or (_is_int(v) and v > 0)),
    "checkpoints": ("a list", lambda v: isinstance(v, list)),
    "nearest_neighbors": ("a dict of backend settings", lambda v: isinstance(v, dict)),
    "learning_rates": (
        "None or a list of numbers",
        lambda v: v is None or (isinstance(v, list) and all(_is_real(x) for x in v)),
    ),
    "architecture": (
        "None or a list of strings",
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ),
    "module_attributes": (
        "None or a list of strings",
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ),
}
#: Fields an index may lack (written before they were recorded).
_OPTIONAL_INDEX_FIELDS = ("learning_rates", "architecture", "module_attributes")


def _malformed_index_field(saved: dict[str, Any]) -> str | None:
    """Why the saved manifest's fields cannot be read as values, or ``None``."""
    for field, (kind, valid) in _INDEX_FIELDS.items():
        if field not in saved:
            if field in _OPTIONAL_INDEX_FIELDS:
                continue
            return f"its manifest has no field {field!r}"
        if not valid(saved[field]):
            return f"its manifest field {field!r} is {saved[field]!r}, not {kind}"
    return None


def _check_index_storage(memory_budget: Any, index_dtype: Any, name: str) -> int | None:
    """Check the index storage settings; ``memory_budget`` as an ``int`` (NumPy integers
    too) or ``None``."""
    if memory_budget is not None:
        memory_budget = check_int(memory_budget, f"{name}: memory_budget (bytes)", or_none=True)
        if memory_budget < 0:
            raise InvalidArgumentError(
                f"{name}: memory_budget={memory_budget} must be >= 0 bytes (or None for no limit)"
            )
    if not isinstance(index_dtype, torch.dtype):
        raise ArgumentTypeError(
            f"{name}: index_dtype must be torch.float32 or torch.float16, got {index_dtype!r}"
        )
    if index_dtype not in _INDEX_DTYPES:
        raise InvalidArgumentError(
            f"{name}: index_dtype must be torch.float32 or torch.float16, got {index_dtype}"
        )
    return memory_budget


def _mapped_tensor(array: np.ndarray) -> Tensor:
    """A tensor over a read-only memory map (torch warns about non-writable arrays)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _row_blocks(embeddings: Tensor) -> Any:
    """``(start, block)`` over the rows; pages of a memory map are dropped after each."""
    n = int(embeddings.shape[0])
    for start in range(0, n, _SCAN_ROWS):
        stop = min(n, start + _SCAN_ROWS)
        yield start, embeddings[start:stop]
        release_rows(embeddings, start, stop)


def resolve_final_layer(model: nn.Module, final_fc_layer: Any, owner: str) -> str:
    """Name of ``final_fc_layer`` (a module of ``model`` or its dotted name); must be Linear."""
    # aliases too: any name of the layer is accepted; "" is the model itself, for a model
    # that is one Linear layer (a logistic regression)
    modules = {"": model, **named_modules(model)}
    linear = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    if isinstance(final_fc_layer, str):
        if final_fc_layer not in modules:
            raise InvalidArgumentError(
                f"{owner}: final_fc_layer {final_fc_layer!r} is not a module of the model; "
                f"its Linear layers are: {', '.join(linear) or 'none'}"
            )
        name = final_fc_layer
    elif isinstance(final_fc_layer, nn.Module):
        found = [n for n, m in modules.items() if m is final_fc_layer]
        if not found:
            raise InvalidArgumentError(
                f"{owner}: final_fc_layer is not a submodule of the model; pass one of its "
                f"Linear layers: {', '.join(linear) or 'none'}"
            )
        name = found[0]
    else:
        raise ArgumentTypeError(
            f"{owner}: final_fc_layer must be an nn.Linear module of the model or its name, "
            f"got {type(final_fc_layer).__name__}"
        )
    if not isinstance(modules[name], nn.Linear):
        raise InvalidArgumentError(
            f"{owner}: final_fc_layer {name!r} is {article(type(modules[name]).__name__)}, but it "
            f"must be an nn.Linear; the model's Linear layers are: {', '.join(linear) or 'none'}"
        )
    return canonical_module_name(model, modules[name])


class TracInCPFast(TracInCPBase):
    """Exact TracIn restricted to the final linear layer (weight and bias).

    Equal to ``TracInCP(..., layers=[final_fc_layer])``, computed from the layer's
    inputs and the loss gradient at its output: ``<g a^T, g' a'^T> = (g . g')(a . a')``.

    Args:
        model: the model to explain (restored after every call).
        final_fc_layer: the ``nn.Linear`` layer, as a module of ``model`` or its
            (dotted) name.
        train_dataset: Dataset, list of examples or DataLoader of
            ``(*model_inputs, label)`` batches.
        checkpoints: directory, list of paths, or iterator of paths/loaded objects.
        checkpoints_load_func: ``f(model, checkpoint) -> learning_rate``.
        loss_fn: a loss that reduces over the batch with ``"sum"`` or ``"mean"``
            (without a ``reduction`` attribute, as its signature says: a ``reduction=``
            bound by ``functools.partial`` or defaulted; a loss that says nothing is
            scored by each example's own loss). Required.
        batch_size: batch size when ``train_dataset`` is a Dataset.
        vectorize: accepted for compatibility; has no effect (gradients are always
            computed in closed form, batched).
        distributed: (keyword-only) shard the training set over torch.distributed ranks:
            ``None`` when a process group is initialised, ``True`` always, ``False`` never.
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: nn.Module | str,
        train_dataset: Dataset | DataLoader | list | tuple,
        checkpoints: Any,
        checkpoints_load_func: Callable[..., Any] = load_flexible_state_dict,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int = 1,
        vectorize: bool = False,
        *,
        distributed: bool | None = None,
    ) -> None:
        super().__init__(
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn,
            batch_size,
            distributed=distributed,
        )
        name = self.get_name()
        vectorize = check_flag(vectorize, "vectorize", name)
        if loss_fn is None:
            raise InvalidArgumentError(
                f"{name} needs loss_fn: a loss that reduces with 'sum' or 'mean', e.g. "
                "nn.CrossEntropyLoss(reduction='sum')"
            )
        self.final_fc_layer_name = resolve_final_layer(model, final_fc_layer, name)
        self.final_fc_layer = cast(nn.Linear, model.get_submodule(self.final_fc_layer_name))
        self.vectorize = vectorize
        self._loss = resolve_loss(loss_fn, None, name)
        self._selected = (
            resolve_layers(model, [self.final_fc_layer_name], name)
            if self.final_fc_layer_name
            else list(dict(model.named_parameters()))  # the model is the layer
        )
        self._engine = GradientEngine(model, self._selected, self._loss, name)

    def _runner(self) -> TracInRunner:
        return TracInRunner(
            self.model, self._engine, self.checkpoints, self.checkpoints_load_func, self.get_name()
        )


class TracInCPFastRandProj(TracInCPFast):
    """Interactive last-layer TracIn: training set embedded once, queries by inner product.

    Construction runs every training batch through every checkpoint once and keeps an
    embedding per training example; :meth:`influence` then differentiates only the test
    batch and answers from the embeddings (nearest-neighbour search for proponents and
    opponents). Use :class:`TracInCPFast` for self-influence.

    The embedding of checkpoint ``c`` is ``sqrt(lr_c) * P_c(vec(G))`` with ``G`` the
    final layer's per-example gradient (``O x (I + 1)`` with a bias) and ``P_c`` a seeded
    random projection (see :mod:`proponents.projection` for the dimension rule); with
    ``projection_dim=None`` there is no projection and scores equal TracInCPFast's.

    Args:
        model, final_fc_layer, train_dataset, checkpoints, checkpoints_load_func,
            loss_fn, batch_size, vectorize: as for :class:`TracInCPFast`.
        nearest_neighbors: the search structure; default :class:`ExactNearestNeighbors`
            (exact answers). :class:`AnnoyNearestNeighbors` and
            :class:`FaissNearestNeighbors` are optional extras. Any other instance with
            ``setup(data)`` and ``get_nearest_neighbors(query, k)`` (e.g. a subclass of
            Captum's ``NearestNeighbors``) is accepted too: it is wrapped in
            :class:`~proponents.neighbors.ForeignNearestNeighbors` (kept as
            ``self.nearest_neighbors``, the object itself as its ``backend``), which
            uses its choice of neighbours and reports their exact scores. Such a backend
            is not saved with the index: pass a new instance to :meth:`load` again.
        projection_dim: per-checkpoint embedding dimension, or ``None`` for exact
            embeddings. Never larger than the gradient's own dimension.
        seed: seed of the projection (a local generator; global RNG untouched).
        show_progress: (keyword-only) progress bar while embedding the training set.
        distributed: (keyword-only) as for :class:`TracInCPFast`. When sharded, each rank
            embeds and indexes only its own range of the training set (``embeddings`` holds
            that range) and queries merge the per-rank top ``k``.
        memory_budget: (keyword-only) bytes the training embeddings may take in memory, or
            ``None`` (no limit). When ``N * embedding_dim * itemsize`` exceeds it (and the
            training set has a length), the embeddings are written checkpoint by
            checkpoint into an unlinked scratch ``.npy`` in the temporary directory and
            ``embeddings`` is a read-only tensor over its memory map. The default exact
            search and ``k=None`` scores then read it block by block, so resident memory
            stays well below the matrix size. Backends that copy the data (Faiss, Annoy)
            still hold their own copy.
        index_dtype: (keyword-only) ``torch.float32`` (default: full precision, i.e. the
            final layer's own dtype) or ``torch.float16`` (half the memory or disk). Scores
            are always computed in at least float32 (float16 blocks are converted before
            each product).
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: nn.Module | str,
        train_dataset: Dataset | DataLoader | list | tuple,
        checkpoints: Any,
        checkpoints_load_func: Callable[..., Any] = load_flexible_state_dict,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int = 1,
        vectorize: bool = False,
        nearest_neighbors: NearestNeighborsLike | None = None,
        projection_dim: int | None = None,
        seed: int = 0,
        *,
        show_progress: bool = False,
        distributed: bool | None = None,
        memory_budget: int | None = None,
        index_dtype: torch.dtype = torch.float32,
        _embeddings: Tensor | None = None,
    ) -> None:
        super().__init__(
            model,
            final_fc_layer,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn,
            batch_size,
            vectorize,
            distributed=distributed,
        )
        name = self.get_name()
        layer = self.final_fc_layer
        if parametrize.is_parametrized(layer) or not isinstance(
            layer._parameters.get("weight"), nn.Parameter
        ):
            raise InvalidArgumentError(
                f"{name}: final_fc_layer {self.final_fc_layer_name!r} computes its weight "
                "through a parametrization or a forward hook (weight_norm, spectral_norm), "
                "whose gradient is not the factored gradient of a Linear weight that the "
                "embeddings project. Use TracInCPFast (exact for it), or remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations, or "
                "torch.nn.utils.remove_weight_norm / remove_spectral_norm)"
            )
        if projection_dim is not None:
            projection_dim = check_int(projection_dim, f"{name}: projection_dim", or_none=True)
            if projection_dim <= 0:
                raise InvalidArgumentError(
                    f"{name}: projection_dim={projection_dim} must be positive (or None for no "
                    "projection)"
                )
        seed = check_int(seed, f"{name}: seed")
        if not -_SEED_LIMIT < seed < _SEED_LIMIT:
            raise InvalidArgumentError(
                f"{name}: seed={seed} is out of range; it must lie strictly between -2**43 and "
                "2**43 (checkpoint c's projection is drawn from a generator seeded with "
                "seed * 1000003 + c, which must fit in 64 bits)"
            )
        show_progress = check_flag(show_progress, "show_progress", name)
        memory_budget = _check_index_storage(memory_budget, index_dtype, name)
        self.memory_budget = memory_budget
        self.index_dtype = index_dtype
        self.nearest_neighbors: NearestNeighbors = (
            ExactNearestNeighbors()
            if nearest_neighbors is None
            else as_nearest_neighbors(nearest_neighbors, name)
        )
        self.projection_dim = projection_dim
        self.seed = seed
        # Identifies this index to its backend (see proponents.neighbors.ownership): a
        # backend object handed to another index too is set up again before it is used.
        self._search_owner = object()
        # What the embeddings are computed from, recorded before any checkpoint is read:
        # queries and save() refuse checkpoints that changed since.
        self._watch = CheckpointWatch(self.checkpoints)
        # and a sample of the training examples, written with the index so that load()
        # can refuse a dataset of the same length but other content
        self._dataset_probe = None if _embeddings is not None else _examples_probe(train_dataset)
        # The learning rate the load function gave for each checkpoint when the training
        # set was embedded (None: not known, an index saved before they were recorded).
        # Test examples must be embedded with the same ones, or their scores mix two
        # scalings of the training side.
        self._learning_rates: list[float] | None = None
        layer = self.final_fc_layer
        in_dim = layer.in_features + (1 if layer.bias is not None else 0)
        device = model_device(model)
        dtype = layer.weight.dtype
        # Embeddings of a 16-bit layer are formed in float32 (see _embed), so are its
        # projections.
        work_dtype = torch.promote_types(dtype, torch.float32)
        self._projections = [
            GradientProjection.create(
                layer.out_features, in_dim, projection_dim, seed * 1_000_003 + c, work_dtype, device
            )
            for c in range(len(self.checkpoints))
        ]
        if _embeddings is not None:  # restoring a saved index: load() sets up the search
            self.embeddings = _embeddings
            self._offset, self._n_indexed = 0, int(_embeddings.shape[0])
            return
        if self._dist is None:
            n_rows = dataset_length(self.train_dataloader)
            if n_rows is not None:  # settings the backend cannot build fail before the work
                self.nearest_neighbors.check_fits(n_rows, self.embedding_dim)
            self.embeddings = self._embed(
                self.train_dataloader, True, show_progress, "training set"
            )
            self._offset, self._n_indexed = 0, int(self.embeddings.shape[0])
        else:
            local, sizes = sharded_local_rows(
                self._dist,
                name,
                self.train_dataloader,
                lambda shard: self._embed(shard, True, show_progress, "training set"),
            )
            if local is None:
                local = torch.zeros(0, self.embedding_dim, dtype=dtype, device=device)
            self.embeddings = local
            self._offset, self._n_indexed = sum(sizes[: self._dist.rank]), sum(sizes)
        if self.embeddings.shape[0]:
            self._set_up_search(show_progress=show_progress)

    def _set_up_search(self, saved: Path | None = None, show_progress: bool = False) -> None:
        """Set the backend up with this index's embeddings (from its files in ``saved``
        when given: :meth:`NearestNeighbors.load`, which rebuilds when they do not fit),
        and claim it for this index. ``show_progress``: a bar over the rows indexed (a
        built-in backend reports them as it goes; any other at the end)."""
        backend = self.nearest_neighbors
        n = int(self.embeddings.shape[0])
        shown = backend.backend if isinstance(backend, ForeignNearestNeighbors) else backend
        what = f"{self.get_name()}: indexing the embeddings ({type(shown).__name__})"
        with Progress(show_progress, what, n, unit="row") as bar:
            reporting = (
                backend.reporting(bar.update)
                if isinstance(backend, IndexedNearestNeighbors)
                else contextlib.nullcontext()
            )
            with reporting:
                if saved is None:
                    backend.setup(self.embeddings)
                else:
                    backend.load(saved, self.embeddings)
            bar.update(n - bar.count)
        claim(backend, self._search_owner)

    def _own_search(self) -> None:
        """Set the backend up again, with a warning, if another index set it up since.

        One backend object holds one search structure; handed to two indexes, it holds
        the one set up last, and searching it for the other would answer from the wrong
        embeddings.
        """
        if not len(self.embeddings) or holds(self.nearest_neighbors, self._search_owner):
            return
        backend = self.nearest_neighbors
        shown = backend.backend if isinstance(backend, ForeignNearestNeighbors) else backend
        warn(
            f"{self.get_name()}: its nearest_neighbors object ({type(shown).__name__}) was set "
            "up for another index after this one, so it no longer holds this index's "
            f"embeddings; setting it up again with this index's "
            f"{count(int(self.embeddings.shape[0]), 'row')}. Give each index its own "
            "backend instance to avoid these rebuilds"
        )
        self._set_up_search()

    @property
    def embedding_dim(self) -> int:
        """Dimension of one example's embedding (summed over checkpoints)."""
        return sum(p.dim for p in self._projections)

    def _in_layer_layout(self, reps: list[Grads]) -> Grads:
        """The final layer's per-example gradients as one representation, laid out as the
        ``(out_features, in_features [+ 1 for the bias])`` matrix the projections expect,
        whichever strategy computed them.

        The engine serves the layer by its hooks (one factored representation in this
        layout) or, when a check moves it there (examples that interact inside a batch,
        say), by ``torch.func`` (one flat gradient per parameter). A check can run at any
        batch of two or more examples, also a test batch long after the training set was
        embedded, so both must give the same coordinates: the weight's and the bias's
        gradients are interleaved row by row, as in the factored form.
        """
        if len(reps) == 1:
            return reps[0]
        layer = self.final_fc_layer
        generic = self._engine.generic
        assert generic is not None and layer.bias is not None and len(reps) == 2
        by_param = {
            id(self.model.get_parameter(n)): as_dense(r) for n, r in zip(generic.names, reps)
        }
        size = reps[0].size
        weight = by_param[id(layer.weight)].reshape(size, layer.out_features, -1)
        bias = by_param[id(layer.bias)].reshape(size, layer.out_features, 1)
        return DenseGrads(torch.cat([weight, bias], dim=2).reshape(size, -1))

    def _embed(self, data: Any, is_loader: bool, show_progress: bool, what: str) -> Tensor:
        """``(n, embedding_dim)`` embeddings of the examples in ``data``."""
        name = self.get_name()
        n_ckpt = len(self.checkpoints)
        n_batches = loader_batches(data) if is_loader else 1
        total = None if n_batches is None else n_batches * n_ckpt
        blocks: list[Tensor] = []
        runner = self._runner()
        training = what == "training set"
        store_dtype = self._storage_dtype() if training else None
        n_rows = self._training_rows(data) if training else None
        disk = self._scratch_matrix(n_rows) if training else None
        # With a known length, each checkpoint's block of columns goes straight into the
        # final matrix (on disk, or allocated at the first batch), so the matrix is held
        # once rather than as parts plus their concatenation.
        matrix: Tensor | None = None
        column = 0
        try:
            with (
                self._guarded(),
                Progress(show_progress, f"{name}: embedding {what}", total) as bar,
            ):
                learning_rates = []
                for c, lr in runner.each_checkpoint(bar, f"embedding {what}"):
                    if lr < 0:
                        raise InvalidArgumentError(
                            f"{name}: checkpoint {c + 1} has a negative learning rate ({lr}); "
                            "embeddings need sqrt(lr)"
                        )
                    if not training:
                        self._check_learning_rate(c, lr)
                    learning_rates.append(float(lr))
                    parts = []
                    row = 0
                    # a large test batch is differentiated in pieces, as the other TracIn
                    # classes do (its activations are not all held at once); the bar counts
                    # each batch once
                    chunk = None if training else self._test_chunk()
                    pieces = runner._batches(
                        data, is_loader, "batch", chunk=chunk, batch_done=bar.update
                    )
                    for batch in pieces:
                        # A 16-bit layer's gradient entries g_o a_i are formed in float32:
                        # in its own dtype they overflow long before sqrt(lr) times them
                        # does (as TracInCPFast forms its products).
                        rep = widened(self._in_layer_layout(self._engine.compute(batch)))
                        part = self._projections[c](rep) * math.sqrt(lr)
                        if store_dtype is not None:
                            if store_dtype == torch.float16:
                                _refuse_float16_overflow(part, row, name)
                            part = part.to(store_dtype)
                        if disk is not None:  # this checkpoint's columns of these rows
                            disk.write(row, column, part.detach().cpu().numpy())
                        elif n_rows is not None:
                            if matrix is None:
                                matrix = part.new_empty(n_rows, self.embedding_dim)
                            matrix[row : row + part.shape[0], column : column + part.shape[1]] = (
                                part
                            )
                        else:
                            parts.append(part)
                        row += int(part.shape[0])
                    if n_rows is not None and row != n_rows:
                        raise InvalidArgumentError(
                            f"{name}: the training data yielded {count(row, 'example')} but "
                            f"its length is {n_rows}; its __len__ must match what it yields"
                        )
                    if parts:
                        blocks.append(torch.cat(parts))
                    del parts
                    column += self._projections[c].dim
        except BaseException:
            if disk is not None:
                disk.discard()
            raise
        if disk is not None:
            embeddings = _mapped_tensor(disk.open())
        elif matrix is not None:
            embeddings = matrix
        elif blocks:
            embeddings = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        else:  # no rows at all
            embeddings = torch.zeros(0, self.embedding_dim, dtype=store_dtype)
        if training:
            self._learning_rates = learning_rates
        # one warning naming the examples whose embedding is not finite: training rows
        # (of this rank's shard when sharded; the warning shows dataset positions) or test
        # examples, as TracInCPFast names them
        tracker = NonFiniteTracker(name)
        tracker.add(self._finite_rows(embeddings), 0, test=not training)
        tracker.warn()
        return embeddings

    def _check_learning_rate(self, c: int, lr: float) -> None:
        """Refuse a test-side learning rate other than the training set's for checkpoint ``c``."""
        if self._learning_rates is None or c >= len(self._learning_rates):
            return
        then = self._learning_rates[c]
        if float(lr) != then:
            raise CheckpointChangedError(
                f"{self.get_name()}: checkpoints_load_func gives learning rate {float(lr)!r} "
                f"for checkpoint {c + 1} now, but the training set's embeddings were made "
                f"with {then!r}; the scores would mix the two. Pass the load function (and "
                "checkpoints) the embeddings were made with, or embed the training set again "
                "with TracInCPFastRandProj(...)"
            )

    def _training_rows(self, data: Any) -> int | None:
        """Examples of the training set (of this rank's shard when sharded), if known."""
        if self._dist is None:
            return dataset_length(data)
        span = shard_range(self.train_dataloader, self._dist.rank, self._dist.world_size)
        return None if span is None else span[1] - span[0]  # None: items are whole batches

    def _storage_dtype(self) -> torch.dtype:
        """float16 when asked for, else the final layer's own dtype (full precision), a
        bfloat16 layer's embeddings as float32 (the same values; NumPy, which holds
        them on disk and in saved indexes, has no bfloat16)."""
        if self.index_dtype == torch.float16:
            return torch.float16
        dtype = self.final_fc_layer.weight.dtype
        return torch.float32 if dtype == torch.bfloat16 else dtype

    def _scratch_matrix(self, n: int | None) -> DiskMatrix | None:
        """The on-disk matrix for the training embeddings, when they exceed the budget."""
        if self.memory_budget is None or n is None:
            return None
        dtype = torch.empty(0, dtype=self._storage_dtype()).numpy().dtype
        if n * self.embedding_dim * dtype.itemsize <= self.memory_budget:
            return None
        return DiskMatrix((n, self.embedding_dim), dtype)

    @staticmethod
    def _finite_rows(embeddings: Tensor) -> Tensor:
        """Whether each row is finite, computed block by block."""
        # Written into one preallocated vector: keeping a small result per block alive
        # between the blocks' large temporaries fragments the heap (tens of MiB at 1M rows).
        out = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        for start, block in _row_blocks(embeddings):
            out[start : start + block.shape[0]] = torch.isfinite(block).all(dim=1)
        return out

    def _all_scores(self, query: Tensor) -> Tensor:
        """``query @ embeddings.T`` (at least float32), block by block as exact search does.

        The same blocks as :class:`ExactNearestNeighbors` (of its block size when it is
        the backend), so ``k=None`` scores and exact top-``k`` results are the same bits,
        and identical embedding rows get identical scores wherever they sit.
        """
        backend = self.nearest_neighbors
        size = (
            backend.block_size if isinstance(backend, ExactNearestNeighbors) else DEFAULT_BLOCK_SIZE
        )
        return block_scores(query, self.embeddings, size)

    def _nonfinite_rows(self) -> int:
        """Number of training examples whose embedding is not finite (computed once)."""
        if getattr(self, "_n_nonfinite", None) is None:
            self._n_nonfinite = int((~self._finite_rows(self.embeddings)).sum())
        return self._n_nonfinite

    def influence(  # type: ignore[override]
        self,
        inputs: Any = None,
        targets: Any = None,
        k: int | None = 5,
        proponents: bool = True,
        unpack_inputs: bool = True,
        *,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor | KMostInfluentialResults:
        """Scores or proponents/opponents of a test batch, answered from the embeddings.

        Args:
            inputs: the test batch (see :meth:`TracInCPBase.influence`) or a DataLoader
                of ``(*model_inputs, label)`` batches.
            targets: labels of the test batch (required unless ``inputs`` is a DataLoader).
            k: proponents/opponents per test example (default 5); ``None`` returns the
                ``(n_test, n_train)`` score matrix.
            proponents: highest (``True``) or lowest (``False``) scores.
            unpack_inputs: whether a tuple ``inputs`` holds several model arguments.
            show_progress: (keyword-only) progress bar over checkpoints.
            aggregate: (keyword-only) score the whole test batch at once, as
                :meth:`TracInCPFast.influence` does: its embeddings are summed into one
                query (a score is linear in the query), so ``k=None`` gives ``(1,
                n_train)`` scores and ``k`` the training examples most influential on
                the batch as a whole.

        Raises:
            NotImplementedError: when ``inputs`` is None (self-influence: use TracInCPFast).
            CheckpointChangedError: when a checkpoint file or directory no longer holds the
                content the training set was embedded with (a touched or copied file with
                the same bytes passes).
        """
        name = self.get_name()
        proponents = check_flag(proponents, "proponents", name)
        unpack_inputs = check_flag(unpack_inputs, "unpack_inputs", name)
        show_progress = check_flag(show_progress, "show_progress", name)
        aggregate = check_flag(aggregate, "aggregate", name)
        if inputs is None:
            raise NotImplementedError(
                f"{name} does not compute self-influence (its embeddings would only cost "
                "memory); use TracInCPFast(...).self_influence() or .influence() instead"
            )
        n_train = self._n_indexed
        if k is not None:
            k = check_int(k, f"{name}: k", or_none=True)
            if not 1 <= k <= n_train:
                raise InvalidArgumentError(
                    f"{name}: k={k} is out of range; it must be between 1 and the number of "
                    f"training examples ({n_train})"
                )
        test, is_loader = test_batches(inputs, targets, unpack_inputs)
        if targets is None and not is_loader:
            raise InvalidArgumentError(
                f"{name}: targets are required; pass the labels of the test batch"
                f"{labels_inside_hint(inputs)}"
            )

        def query_side() -> Tensor:
            self._watch.verify(name, "the embedding of the training set")
            if not is_loader and all(batch.size == 0 for batch in test):
                # a batch of no examples: no model run, an empty query of the embeddings' kind
                query = torch.zeros(
                    0,
                    self.embedding_dim,
                    dtype=self.final_fc_layer.weight.dtype,
                    device=model_device(self.model),
                )
            else:
                query = self._embed(
                    test, is_loader, show_progress, "test batches" if is_loader else "test batch"
                )
            # the batch's summed influence is the influence of its summed embedding (no
            # examples: a zero query, as TracInCPFast's zero scores)
            return query.sum(dim=0, keepdim=True) if aggregate else query

        if self._dist is not None:
            # The test side runs inside the status exchange, on every rank (also one
            # without training rows): a rank whose checkpoint or test batch fails raises
            # its error, and the others name it instead of waiting for its candidates.
            def local() -> Tensor | tuple[Tensor, Tensor] | None:
                query = query_side()
                return self._search(query, k, proponents) if len(self.embeddings) else None

            out = self._dist.score_columns(
                name,
                local,
                k,
                None,
                finite_first_order(proponents),
                model_device(self.model),
                call={TEST_INPUTS: test_inputs_digest((inputs, targets), is_loader)},
            )
            return out if isinstance(out, Tensor) else KMostInfluentialResults(*out)
        query = query_side()
        if k is None:
            return self._all_scores(query)
        return KMostInfluentialResults(*self._search(query, k, proponents))

    def _search(
        self, query: Tensor, k: int | None, proponents: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Scores of this process's embeddings (``k=None``), or its top ``k`` (global indices)."""
        n_train = int(self.embeddings.shape[0])
        if k is None:
            return self._all_scores(query)
        k = min(k, n_train)
        self._own_search()
        backend = self.nearest_neighbors
        q = query if proponents else -query
        if isinstance(backend, IndexedNearestNeighbors) and (
            type(backend).get_nearest_neighbors is IndexedNearestNeighbors.get_nearest_neighbors
        ):
            # A built-in backend passes over the examples with non-finite embeddings, which
            # rank last, so k neighbours are asked for however many such examples there are.
            extra = 0
            indices, scores = backend.search_finite(q, k)
        else:
            # Another backend may return those examples first: ask for enough extra
            # neighbours to rank them last, as TracInCPFast does.
            extra = self._nonfinite_rows()
            indices, scores = backend.search(q, min(n_train, k + extra), n_train)
            if not isinstance(backend, ForeignNearestNeighbors):  # that one rescores itself
                # a NearestNeighbors subclass of the user's: only its choice of rows is
                # used, the scores are the exact inner products (an approximate index's
                # distances would otherwise be reported as influence)
                indices, scores = rescored(self.embeddings, q, indices)
        if not proponents:
            scores = -scores
        if extra:
            order = torch.sort((~torch.isfinite(scores)).to(torch.int8), dim=1, stable=True)
            keep = order.indices[:, :k]
            indices, scores = indices.gather(1, keep), scores.gather(1, keep)
        # A non-finite score left among the k (a product of finite embeddings that
        # overflows, or fewer than k finite embeddings): rank that row as TracInCPFast does,
        # from all its scores, non-finite ones last.
        rows = (~torch.isfinite(scores)).any(dim=1).nonzero().flatten()
        if rows.numel():
            full = self._all_scores(query[rows.to(query.device)])
            exact_idx, exact_scores = k_most(full, k, proponents)
            indices, scores = indices.clone(), scores.clone()
            indices[rows] = exact_idx.to(indices.device)
            scores[rows] = exact_scores.to(scores.device, scores.dtype)
        return indices + self._offset, scores

    def self_influence(self, inputs_dataset: Any = None, show_progress: bool = False) -> Tensor:
        """Not available here: use :meth:`TracInCPFast.self_influence`.

        The embeddings are kept for queries against test examples; self-influence needs
        no embeddings, and :class:`TracInCPFast` with the same arguments computes it
        exactly (``(n,)`` values).

        Args:
            inputs_dataset: accepted for the signature of :class:`TracInCPBase`; unused.
            show_progress: accepted for the signature of :class:`TracInCPBase`; unused.

        Raises:
            NotImplementedError: always, naming :meth:`TracInCPFast.self_influence`.
        """
        raise NotImplementedError(
            f"{self.get_name()} does not compute self-influence; use "
            "TracInCPFast(...).self_influence(), which needs no embeddings"
        )

    # -- persistence -------------------------------------------------------------------
    def _index_meta(self) -> dict[str, Any]:
        return {
            "index_format": INDEX_FORMAT,
            "final_fc_layer": self.final_fc_layer_name,
            "checkpoints": list(self._watch.fingerprints),
            "checkpoint_kinds": [checkpoint_kind(c) for c in self._watch.checkpoints],
            "dataset_length": self._n_indexed,
            "dataset_probe": self._dataset_probe,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "projections": [[p.kind, p.dim] for p in self._projections],
            "loss_reduction": self._loss.reduction,
            "loss": loss_fingerprint(self._loss.fn),
            "strategy": sorted(set(self._engine.strategies.values())),
            "nearest_neighbors": self.nearest_neighbors.config(),
            "architecture": architecture(self.model),
            "module_attributes": attribute_lines(self.model),
            "attribute_texts": ATTRIBUTE_TEXTS,
            "learning_rates": self._learning_rates,
        }

    def save(self, path: str | Path) -> Path:
        """Write the embeddings and everything needed to answer queries to ``path``.

        The directory holds the embeddings as ``.npy`` (no pickle), a JSON manifest with
        the projection seed and shapes, the checkpoints' content fingerprints, the dataset
        length and a hash of five of its examples, the nearest-neighbour settings, and the
        backend's own index files when it can persist them (with their checksum). Every
        file is replaced atomically, under a lock of the directory, so that saves to one
        path from several processes or threads follow each other instead of mixing. The
        backend's files are written first: a save that fails leaves the embeddings saved
        before in place, and a search structure that does not fit the embeddings beside it
        is rebuilt by :meth:`load`, with a warning, never searched.

        When sharded over ranks, every rank must call this with the same ``path``: the
        shards are gathered and rank 0 writes the whole index (without the backend's
        files; :meth:`load` rebuilds the search structure of each shard).

        Args:
            path: the directory to write (``str`` or ``os.PathLike``); created when
                missing. An index already there is replaced.

        Returns:
            The directory written.

        Raises:
            ArgumentTypeError: when ``path`` is not a ``str`` or ``os.PathLike``.
            InvalidArgumentError: when ``path`` is empty, is a file, or holds a file named
                ``neighbors`` (where the search structure's directory goes); nothing is
                written.
            CheckpointChangedError: when a checkpoint (file, directory or loaded object) no
                longer holds the content the training set was embedded with; nothing is
                written.
            DistributedError: when sharded and another rank failed while gathering or
                writing.
            StoreError: when a file cannot be written (a full disk, a directory without
                write permission); the files of the failed write are removed.
        """
        name = self.get_name()
        check_path(path, "path", f"{name}.save")
        if self._dist is not None:
            dist = self._dist

            def mine() -> Tensor | None:
                # inside the status exchange: a rank whose checkpoints changed, or whose
                # path cannot hold an index, raises its error there, and the others name
                # it instead of waiting for its rows
                _check_index_directory(path, f"{name}.save")
                self._watch.verify(name, "the embedding of the training set", objects=True)
                return self.embeddings if len(self.embeddings) else None

            full = dist.rows(name, mine, torch.device("cpu"))
            dist.run(name, lambda: self._write(path, full) if dist.rank == 0 else None)
            return Path(path)
        _check_index_directory(path, f"{name}.save")
        self._watch.verify(name, "the embedding of the training set", objects=True)
        self._own_search()  # the backend's files must describe this index
        self._write(path, self.embeddings, self.nearest_neighbors)
        return Path(path)

    def _write(
        self, path: str | Path, embeddings: Tensor, backend: NearestNeighbors | None = None
    ) -> None:
        """Write the embeddings entry (and ``backend``'s own files, first) under the
        directory's lock, so that concurrent saves to one path follow each other.

        The backend's files go first: if they cannot be written, the embeddings saved
        before are left as they were. If the embeddings then fail, the backend's files
        describe other data than the embeddings beside them, which :meth:`load` sees (by
        their fingerprint) and rebuilds from, with a warning.
        """
        store = ArrayStore(path)
        # float16 and float64 embeddings are saved as they are, anything else as float32;
        # row blocks, so that a memory-mapped matrix is copied without becoming resident.
        dtype = (
            embeddings.dtype
            if embeddings.dtype in (torch.float16, torch.float64)
            else torch.float32
        )
        with store.lock(), store.writer(INDEX_KEY, self._index_meta()) as writer:
            if backend is not None:
                backend.save(Path(path) / "neighbors")
            if embeddings.shape[0] == 0:
                writer.put("embeddings", np.zeros(tuple(embeddings.shape), np.float32))
            for _, block in _row_blocks(embeddings):
                writer.append("embeddings", block.detach().to("cpu", dtype).numpy())
            writer.commit()

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        checkpoints: Any,
        loss_fn: Callable[..., Tensor] | None = None,
        *,
        train_dataset: Dataset | DataLoader | list | tuple | None = None,
        final_fc_layer: nn.Module | str | None = None,
        checkpoints_load_func: Callable[..., Any] = load_flexible_state_dict,
        batch_size: int = 1,
        nearest_neighbors: NearestNeighborsLike | None = None,
        distributed: bool | None = None,
        memory_budget: int | None = None,
        index_dtype: torch.dtype | None = None,
    ) -> TracInCPFastRandProj:
        """Restore an index written by :meth:`save` without re-embedding the training set.

        Args:
            path: the directory given to :meth:`save`.
            model: the model (same architecture and layer).
            checkpoints: the same checkpoints (their content is compared).
            loss_fn: the loss used at construction (same reduction); required.
            train_dataset: the training data; when given, its length and a sample of its
                examples (first, last, three in between) are compared with those embedded.
                When omitted, the restored object can answer queries but not re-embed.
            final_fc_layer: default: the layer saved in the index.
            checkpoints_load_func: as for the constructor.
            batch_size: as for the constructor.
            nearest_neighbors: default: a built-in backend re-created from the saved
                settings (its saved index is reused when it still fits). A backend that
                is not built in (a user-defined class, or one written for Captum) cannot
                be re-created by name: pass a new instance here; it is set up from the
                saved embeddings.
            distributed: as for the constructor; when sharded, each rank keeps only its
                range of the saved embeddings (in memory) and builds its search structure
                over it.
            memory_budget: as for the constructor. When the embeddings exceed it, the saved
                file is memory-mapped (read-only) instead of read; if ``index_dtype`` differs
                from the saved type, they are converted into a scratch file instead.
            index_dtype: the storage type of the restored embeddings; default: the saved
                one (float16 stays float16, otherwise the model's final-layer dtype).

        Raises:
            IndexMismatchError: when the checkpoints, the dataset (length or sampled
                examples), layer or loss differ from those the index was built with (the
                message names what differs).
            IndexNotFoundError: (a ``FileNotFoundError``) when ``path`` holds no index or
                is a file rather than a directory.
        """
        owner = f"{cls.__name__}.load"
        check_path(path, "path", owner)
        if loss_fn is None:
            raise InvalidArgumentError(
                f"{owner} needs loss_fn: the loss the index was built with (its class, "
                "reduction and settings are compared with the saved ones), e.g. "
                "loss_fn=nn.CrossEntropyLoss(reduction='sum')"
            )
        size = check_int(batch_size, f"{owner}: batch_size")
        if size < 1:
            raise InvalidArgumentError(
                f"{owner}: batch_size={size} must be a positive int (the batch size of later "
                "test passes, and of the training set's when train_dataset is given)"
            )
        memory_budget = _check_index_storage(
            memory_budget, torch.float32 if index_dtype is None else index_dtype, owner
        )
        dist = resolve_distributed(distributed, owner)
        found: dict[str, Any] = {}

        def read_saved() -> dict[str, Any]:
            """Read the index's manifest (on each rank: its files may be its own copy)."""
            if Path(path).exists() and not Path(path).is_dir():
                raise IndexNotFoundError(
                    f"{owner}: path {str(path)!r} is a file, not a directory; give "
                    "the directory that TracInCPFastRandProj.save wrote the index to"
                )
            store = ArrayStore(path)
            manifest, reason = store._read_manifest(INDEX_KEY)
            if manifest is None:
                if reason is None:
                    raise IndexNotFoundError(
                        f"path {str(path)!r} holds no saved TracInCPFastRandProj index"
                    )
                raise IndexMismatchError(f"the index in {str(path)!r} cannot be used: {reason}")
            saved = manifest["meta"]
            problem = _malformed_index_field(saved)
            if problem is not None:
                raise IndexMismatchError(
                    f"the index in {str(path)!r} cannot be used: {problem} (damaged or edited). "
                    "Build a new one with TracInCPFastRandProj(...) and save it"
                )
            layer = final_fc_layer if final_fc_layer is not None else saved["final_fc_layer"]
            dataset = train_dataset
            if dataset is None:
                dataset = _PlaceholderDataset(int(saved["dataset_length"]))
            if nearest_neighbors is not None:
                backend = as_nearest_neighbors(nearest_neighbors, owner)
            else:
                try:
                    backend = NearestNeighbors.from_config(saved["nearest_neighbors"])
                except InvalidArgumentError as exc:
                    raise InvalidArgumentError(
                        f"{owner}: the index in {str(path)!r} cannot re-create its "
                        f"nearest-neighbour backend: {exc}"
                    ) from None
            found.update(store=store, saved=saved, layer=layer, dataset=dataset, backend=backend)
            return {"the saved index": manifest.get("checksum")}

        if dist is None:
            read_saved()
        else:  # a rank that cannot read it is named on every rank
            dist.agree_on(owner, read_saved)
        store, saved, layer = found["store"], found["saved"], found["layer"]
        given_dataset, backend = train_dataset, found["backend"]
        obj = cls(
            model,
            layer,
            found["dataset"],
            checkpoints,
            checkpoints_load_func,
            loss_fn,
            batch_size,
            nearest_neighbors=backend,
            projection_dim=saved["projection_dim"],
            seed=int(saved["seed"]),
            distributed=distributed,
            memory_budget=memory_budget,
            _embeddings=torch.empty(int(saved["dataset_length"]), 0),
        )

        def open_saved() -> dict[str, Any]:
            """Check the index against these inputs and restore its embeddings."""
            n = dataset_length(obj.train_dataloader)
            probe = None if given_dataset is None else _examples_probe(given_dataset)
            expected = {
                "index_format": INDEX_FORMAT,
                "final_fc_layer": obj.final_fc_layer_name,
                "checkpoints": list(obj._watch.fingerprints),
                "checkpoint_kinds": [checkpoint_kind(c) for c in obj._watch.checkpoints],
                # for messages only, never compared: the files may have moved
                "checkpoint_names": [
                    checkpoint_label(c, i) for i, c in enumerate(obj._watch.checkpoints)
                ],
                "dataset_length": n if n is not None else saved["dataset_length"],
                "dataset_probe": probe,
                "projections": [[p.kind, p.dim] for p in obj._projections],
                "loss_reduction": obj._loss.reduction,
                "loss_reduction_by_signature": obj._loss.by_signature,
                "loss": loss_fingerprint(obj._loss.fn),
                "architecture": architecture(obj.model),
                # an index saved before the texts counted more kinds of settings holds
                # them as they were written then
                "module_attributes": attribute_lines(
                    obj.model, legacy=saved.get("attribute_texts") is None
                ),
                "attribute_texts": ATTRIBUTE_TEXTS,
            }
            _match_files_to_loaded_objects(saved, expected, obj._watch.checkpoints)
            differences = _index_differences(saved, expected)
            if differences:
                raise IndexMismatchError(
                    f"the index in {str(path)!r} was built for other inputs: "
                    + "; ".join(differences)
                    + ". Pass the checkpoints, train_dataset, final_fc_layer and loss_fn it was "
                    "built with, or build a new index with TracInCPFastRandProj(...)"
                )
            entry, reason = store.load(
                INDEX_KEY,
                expected,
                ignore=(
                    "projection_dim",
                    "seed",
                    "projections",
                    "strategy",
                    "loss",  # compared above; indexes written before it was recorded lack it
                    "loss_reduction",  # compared above (a reduction once assumed is accepted)
                    "loss_reduction_by_signature",
                    "checkpoint_kinds",  # the same
                    "checkpoint_names",
                    "nearest_neighbors",
                    "dataset_probe",
                    "architecture",  # compared above; indexes written before they were
                    "module_attributes",  # recorded lack these four
                    "attribute_texts",
                    "learning_rates",
                ),
                required=("embeddings",),
            )
            if entry is None:
                raise IndexMismatchError(
                    f"the index in {str(path)!r} does not match: {reason}. Build a new one with "
                    "TracInCPFastRandProj(...) for these checkpoints and data"
                )
            obj._dataset_probe = saved.get("dataset_probe")  # what the embeddings were made of
            obj._learning_rates = saved.get("learning_rates")  # what queries must use too
            with entry:
                emb = obj._restore(entry, index_dtype)
            if obj._dist is not None:
                # Each rank keeps an even share of the saved rows (any contiguous ranges in
                # rank order give the same answers; the training DataLoader's batches cannot
                # say where a range starts when its items are whole batches).
                start, stop = even_rows(int(emb.shape[0]), obj._dist.rank, obj._dist.world_size)
                obj.embeddings, obj._offset = emb[start:stop].clone(), start
                if stop > start:
                    obj._set_up_search()
                return {}
            obj.embeddings = emb
            saved_backend = (saved.get("nearest_neighbors") or {}).get("backend")
            if saved_backend != backend.config().get("backend"):
                obj._set_up_search()  # another backend than saved: nothing to read
            else:
                obj._set_up_search(Path(path) / "neighbors")  # saved, or a rebuild
            return {}

        if obj._dist is None:
            open_saved()
        else:  # a rank whose copy is damaged or cannot be read is named on every rank
            obj._dist.agree_on(owner, open_saved)
        return obj

    def _restore(self, entry: Any, index_dtype: torch.dtype | None) -> Tensor:
        """The saved embeddings: mapped, copied to a scratch file, or read, per the budget."""
        file_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float64): torch.float64}.get(
            np.dtype(entry.dtype("embeddings")), torch.float32
        )
        if index_dtype is None:  # float16 stays float16; anything else is full precision
            index_dtype = torch.float16 if file_dtype == torch.float16 else torch.float32
        self.index_dtype = index_dtype
        index_dtype = self._storage_dtype()
        shape = entry.shape("embeddings")
        itemsize = torch.empty(0, dtype=index_dtype).element_size()
        device = model_device(self.model)
        over = (
            self.memory_budget is not None
            and self._dist is None
            and device.type == "cpu"
            and shape[0] * shape[1] * itemsize > self.memory_budget
        )
        narrowed = index_dtype == torch.float16 and file_dtype != torch.float16
        name = f"{self.get_name()}.load"

        def cast(block: Tensor, start: int) -> Tensor:
            # saved wider and restored as float16: values past its range would become
            # infinite (ranked last as if not finite), as construction refuses them
            if narrowed:
                _refuse_float16_overflow(block, start, name)
            return block.to(index_dtype)

        if not over:
            return cast(torch.from_numpy(entry.read("embeddings")), 0).to(device)
        if file_dtype == index_dtype:  # map the saved file itself, read-only
            array = entry.memmap("embeddings")  # copy-on-write: the file is never changed
            register_mapped(array)
            return _mapped_tensor(array)
        disk = DiskMatrix(shape, torch.empty(0, dtype=index_dtype).numpy().dtype)
        try:
            for start in range(0, shape[0], _SCAN_ROWS):
                block = entry.memmap("embeddings", start, start + _SCAN_ROWS)
                disk.write(start, 0, cast(torch.from_numpy(np.array(block)), start).numpy())
        except BaseException:
            disk.discard()
            raise
        return _mapped_tensor(disk.open())


def _check_index_directory(path: str | Path, owner: str) -> None:
    """Refuse, before anything is written, a path that cannot become an index directory."""
    if str(path) == "":
        raise InvalidArgumentError(
            f"{owner}: path is empty; give the directory to write the index to (it is "
            "created if missing)"
        )
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InvalidArgumentError(
            f"{owner}: path {str(path)!r} is a file, not a directory; give a directory for "
            "the index (it is created if missing)"
        )
    neighbors = target / "neighbors"
    if neighbors.exists() and not neighbors.is_dir():
        raise InvalidArgumentError(
            f"{owner}: {str(neighbors)!r} is a file; the index keeps its search structure "
            "in a directory of that name. Remove the file or save to another directory"
        )


def _refuse_float16_overflow(part: Tensor, first_row: int, name: str) -> None:
    """Raise when finite embeddings of these rows exceed float16's range.

    Stored, they would become infinite and be ranked last as if their gradients were
    not finite; the error comes at the first such batch, before the rest is embedded.
    """
    over = torch.isfinite(part) & (part.abs() > _FLOAT16_MAX)
    if not bool(over.any()):
        return
    rows = (over.any(dim=1).nonzero().flatten() + first_row).tolist()
    shown = first_names([str(r) for r in rows], 10)
    largest = float(part[over].abs().max())
    raise InvalidArgumentError(
        f"{name}: index_dtype=torch.float16 cannot hold the embeddings of training examples "
        f"[{shown}]: a value of magnitude {largest:.3g} exceeds float16's largest, "
        f"{_FLOAT16_MAX:.0f}. Use index_dtype=torch.float32 (the default; with memory_budget= "
        "it is kept on disk when it does not fit in memory)"
    )


def _match_files_to_loaded_objects(
    saved: dict[str, Any], expected: dict[str, Any], checkpoints: Sequence[Any]
) -> None:
    """Compare a file given for a checkpoint the index was built from as a loaded object
    by what the file loads as: ``expected`` then holds that object's fingerprint and kind
    at its position (the reverse, an object for a file, cannot be checked)."""
    then = saved.get("checkpoint_kinds") or []
    fingerprints = list(saved.get("checkpoints") or [])
    if len(then) != len(checkpoints) or len(fingerprints) != len(checkpoints):
        return
    for i, ckpt in enumerate(checkpoints):
        if then[i] != "object" or expected["checkpoint_kinds"][i] != "file":
            continue
        expected["checkpoints"][i] = loaded_fingerprint(ckpt)
        expected["checkpoint_kinds"][i] = "object"


def _examples_probe(data: Dataset | DataLoader | list | tuple) -> str | None:
    """:func:`dataset_probe` of the examples behind ``data`` (a DataLoader's dataset).

    The wrapper does not count: an index embedded from a Dataset loads with a DataLoader
    over it, and the reverse; a list of examples probes as the Dataset it is read as.
    """
    if isinstance(data, (list, tuple)):
        data = ListDataset(data)
    if isinstance(data, DataLoader):
        return loader_probe(data)  # the examples in the order the loader reads them
    return dataset_probe(data, include_type=False)


class _PlaceholderDataset(Dataset):
    """Stands for a training set of known length that is not available at load time."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        raise InvalidArgumentError(
            "this TracInCPFastRandProj was loaded without train_dataset; pass train_dataset "
            "to TracInCPFastRandProj.load to use the training data again"
        )
