"""SimilarityInfluence: the source examples whose layer activations resemble a test example's.

For each requested layer, the activations of every source example are computed once,
kept in an :class:`~proponents.store.ArrayStore` under ``activation_dir`` and compared
with the activations of the test inputs by a similarity metric; the ``top_k`` most (or
least) similar source examples are returned per test example.

The store is never trusted blindly: every entry records a fingerprint of the model's
module structure, weights and buffers, the layer, the source dataset's length and a probe of its
content, and is rebuilt (with a :class:`~proponents.store.StoreRebuildWarning`) when
any of these changed or the files are damaged.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import math
import os
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    TensorDataset,
    default_collate,
    default_convert,
)

from proponents.checks import check_flag, check_int, check_model
from proponents.data import (
    batch_size_of,
    copy_layout,
    dataset_length,
    in_channels_last,
    is_image,
    loader_batches,
    make_loader,
    map_rows,
    model_device,
    to_device,
    unshared,
)
from proponents.distributed import (
    TEST_INPUTS,
    DistributedContext,
    resolve_distributed,
    sampled_examples,
    shard_loader,
    shard_range,
    test_inputs_digest,
)
from proponents.errors import (
    ArgumentTypeError,
    BatchFormatError,
    InvalidArgumentError,
    StoreError,
    article,
    count,
)
from proponents.fingerprints import (
    callable_fingerprint,
    dataset_probe,
    fingerprints_of,
    hash_object,
    version_counter,
)
from proponents.influence._pullback import MAX_WIDTH_FRACTION, Pullback, may_pull_back
from proponents.influence._similarity_metrics import (
    ActivationsNeeded,
    BlockScorer,
    builtin_kind,
    cosine_similarity,
    euclidean_distance,
    ranked_order,
    row_norms,
)
from proponents.influence.base import DataInfluence
from proponents.model_guard import call_scope, observe_forward_state
from proponents.progress import Progress, progress_iter
from proponents.store import ArrayStore, StoredEntry, StoreRebuildWarning, safe_name
from proponents.user_warnings import warn

#: Source activations are scored and written in blocks of about this many bytes.
BLOCK_BYTES = 32 * 2**20
#: Folders of ``activation_dir`` itself for ``model_id=""``, so no model_id may name them.
_RESERVED_DIRS = ("src", "inputs")
_SRC_KIND = "similarity/source-activations"
#: The array every stored source entry holds; beside it, the activations, or the layer
#: inputs with the activations' shape, or all three (see :func:`_src_entry_problem`).
_SRC_ARRAYS = ("norms",)
#: Name of the stored array of the source examples' inputs to an affine layer
#: ``(N, *input_shape)``, kept where they make repeated searches cheaper (see
#: :mod:`proponents.influence._pullback`).
LAYER_INPUTS = "layer_inputs"
#: Name of the stored per-example shape of the activations (int64), in an entry that
#: keeps the layer inputs instead of them.
ACTIVATION_SHAPE = "activation_shape"
#: An entry may keep the layer inputs without the activations when the layer's adjoint,
#: estimated from below by power iteration, times this headroom, keeps every source block
#: accurate on the input side for any test rows (a query that would not be is scored after
#: storing the activations after all).
GAIN_HEADROOM = 1.5
_INPUT_KIND = "similarity/input-activations"
_DIRECTIONS = ("max", "min")
_INIT_KWARGS = ("replace_nan",)
_INFLUENCE_KWARGS = ("load_input_from_disk", "inputs_id", "show_progress")


class SimilarityInfluence(DataInfluence):
    """Source examples ranked by the similarity of their layer activations to a test input.

    Args:
        module: the model. It is left exactly as it was found: activations are computed
            in eval mode under ``torch.no_grad`` and mode, weights and flags are restored.
        layers: the name of a submodule (dotted paths such as ``"features.3"`` allowed)
            or a list of names; the output tensor of each is compared.
        influence_src_dataset: the examples to search, usually the training set. A
            Dataset or a list of examples is read in order with ``batch_size``; a
            non-shuffling DataLoader is used as given. An item that is a tuple or list
            ``(*model_inputs, label)`` feeds ``module(*item[:-1])`` (a 1-tuple feeds its
            only element); any other item is passed to the model as it is. A tensor is
            read as a DataLoader reads it, one example per row.
        activation_dir: directory for the stored activations, created if needed (not
            empty: give ``"."`` for the current directory). The source activations live
            in ``activation_dir/model_id/src``.
        model_id: a name for this model (or version of it); activations are kept in a
            subdirectory of that name (escaped, so it cannot point outside
            ``activation_dir``; ``"src"`` and ``"inputs"`` are refused: ``model_id=""``
            keeps its own folders of those names there). Distinct models sharing one
            directory never see each other's activations either way: entries are
            checked against the weights.
        similarity_metric: ``f(test, src) -> (n_test, n_src)`` scores, given test
            activations ``(n_test, *features)`` and a block of source activations
            ``(n_src, *features)`` in the layer's own shape, as contiguous tensors. Default
            :func:`cosine_similarity`; :func:`euclidean_distance` is the other built-in.
            The two built-ins run on a faster exact path.
        similarity_direction: ``"max"`` returns the highest scores (most similar for
            cosine), ``"min"`` the lowest (nearest for Euclidean distance).
        batch_size: batch size for reading ``influence_src_dataset`` (a Dataset).
        channels_last: (keyword-only) on CPU, feed 4-D image batches to the model in
            channels-last memory layout, which is often much faster for convolutions.
            ``None`` (default) tries it on the first batch and keeps it only when it gives
            the same activations and is faster; ``False`` never; ``True`` always.
        distributed: (keyword-only) ``None`` splits the source set over the ranks of an
            initialised ``torch.distributed`` process group (when there is one), ``True``
            requires one, ``False`` never splits. Each rank stores the activations of its
            own contiguous range (under ``rank-R-of-W``) and results merge the per-rank
            ``top_k``; every rank must construct the object and call it together.
        **kwargs: ``replace_nan`` (float): similarity given by the built-in cosine to a
            pair involving an all-zero activation vector (default 0.0).

    Raises:
        InvalidArgumentError: unknown layer names (the valid ones are listed), a
            direction other than ``"max"``/``"min"``, a bad batch size.
            An empty ``activation_dir``, or one (or its ``model_id`` folder) that is a
            file. Under ``distributed``, a source DataLoader with ``batch_size=None``.
        ArgumentTypeError: arguments of the wrong type, unknown keyword arguments.
        StoreError: ``activation_dir`` cannot be created or written.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: str | Sequence[str],
        influence_src_dataset: Dataset | DataLoader | list | tuple | Tensor,
        activation_dir: str | os.PathLike[str],
        model_id: str = "",
        similarity_metric: Callable[[Tensor, Tensor], Tensor] = cosine_similarity,
        similarity_direction: str = "max",
        batch_size: int = 1,
        *,
        channels_last: bool | None = None,
        distributed: bool | None = None,
        **kwargs: Any,
    ) -> None:
        check_model(module, "module", "SimilarityInfluence")
        lazy = [
            name
            for name, t in (*module.named_parameters(), *module.named_buffers())
            if isinstance(t, (UninitializedParameter, UninitializedBuffer))
        ]
        if lazy:
            raise InvalidArgumentError(
                f"SimilarityInfluence: module has parameters whose shapes are not known yet "
                f"({', '.join(lazy[:5])}: lazy modules such as nn.LazyLinear); run it once on "
                "a batch of inputs first, so that they are created"
            )
        unknown = sorted(set(kwargs) - set(_INIT_KWARGS))
        if unknown:
            raise ArgumentTypeError(
                f"SimilarityInfluence got unexpected keyword argument(s) {unknown}; the "
                f"accepted extra keywords are {list(_INIT_KWARGS)}"
            )
        self.module = module
        self.layers = _check_layers(module, layers)
        if similarity_direction not in _DIRECTIONS:
            raise InvalidArgumentError(
                f"similarity_direction must be 'max' (highest scores first) or 'min' "
                f"(lowest scores first), got {similarity_direction!r}"
            )
        self.similarity_direction = similarity_direction
        if not callable(similarity_metric):
            raise ArgumentTypeError(
                "similarity_metric must be callable as f(test, src) -> (n_test, n_src), got "
                f"{type(similarity_metric).__name__}"
            )
        self.similarity_metric = similarity_metric
        self._kind = builtin_kind(similarity_metric)
        replace_nan = kwargs.get("replace_nan", 0.0)
        if "replace_nan" in kwargs and self._kind != "cosine":
            raise InvalidArgumentError(
                "replace_nan only applies to the built-in cosine_similarity metric; remove it "
                "or use similarity_metric=cosine_similarity"
            )
        if isinstance(replace_nan, bool) or not isinstance(replace_nan, (int, float)):
            raise ArgumentTypeError(f"replace_nan must be a number, got {replace_nan!r}")
        self.replace_nan = float(replace_nan)
        if not (channels_last is None or isinstance(channels_last, bool)):
            raise ArgumentTypeError(
                f"channels_last must be None (automatic), True or False, got {channels_last!r}"
            )
        self.channels_last = channels_last
        if not isinstance(model_id, str):
            raise ArgumentTypeError(f"model_id must be a str, got {type(model_id).__name__}")
        if model_id.lower() in _RESERVED_DIRS:
            raise InvalidArgumentError(
                f"model_id={model_id!r} names a folder that activation_dir keeps for "
                f"model_id='' (its {model_id.lower()}/ folder), so the two would share "
                "files; choose another model_id"
            )
        self.model_id = model_id
        if not isinstance(activation_dir, (str, os.PathLike)):
            raise ArgumentTypeError(
                f"activation_dir must be a path (str or os.PathLike), got "
                f"{type(activation_dir).__name__}"
            )
        self.activation_dir = os.fspath(activation_dir)
        if self.activation_dir == "":
            raise InvalidArgumentError(
                "activation_dir is empty; give the directory to keep the activations in "
                "(it is created if missing; '.' for the current directory)"
            )
        root = Path(os.path.abspath(self.activation_dir))
        self._model_dir = root / safe_name(model_id) if model_id else root
        self.influence_src_dataset = influence_src_dataset
        self.batch_size = batch_size
        self._dist = resolve_distributed(distributed, "SimilarityInfluence")
        if self._dist is None:
            self._read_inputs(root)
        else:  # a rank that cannot (its activation_dir, its dataset) is named on every rank
            self._dist.agree_on("SimilarityInfluence", lambda: self._read_inputs(root))
        #: Rows ``[start, stop)`` of a TensorDataset's tensors read by slicing (``None``:
        #: through the DataLoader); the tensors themselves are looked up at every call.
        self._fast_rows: tuple[int, int | None] | None = None
        if type(influence_src_dataset) is TensorDataset:  # a subclass may change any method
            # Same batches as the DataLoader would collate, by slicing instead of stacking.
            self._fast_rows = (0, None)
        # Store entries kept open between calls (see _keep_open), closed with the object.
        self._open_entries: dict[str, StoredEntry] = {}
        #: Version counters of the source tensors at the last call (see _probe).
        self._seen_versions: dict[int, tuple[int, int]] = {}
        #: Per layer, the open entry and its blocks' input ratios (see _score_entries).
        self._input_ratios: dict[str, tuple[StoredEntry, dict[int, float]]] = {}
        weakref.finalize(self, _close_entries, self._open_entries)
        # Layout choices are remembered per model (see _LAYOUTS), not per object.
        self._layouts = _LAYOUTS.setdefault(module, {})
        # The model's fingerprint, hashed again only when its weights may have changed
        # (kept per model, like the layout choices).
        self._fingerprint = fingerprints_of(module)
        # ((x1, x2), label) items feed model(x1, x2) unless the forward takes one argument
        self._unpacks_nested_inputs = _takes_several_inputs(module)
        self._n_local: int | None = None
        # under distributed, what a rank's scoring met, held back for the merged warnings
        self._held_anomalies: list[_Anomalies] | None = None
        if self._dist is not None:
            self._shard(self._dist)

    def _read_inputs(self, root: Path) -> dict[str, Any]:
        """Check the activation folders and wrap the source set in its loader (each rank
        does this on its own machine); returns what the ranks must agree on."""
        for folder, what in ((root, "activation_dir"), (self._model_dir, "its model_id folder")):
            if folder.exists() and not folder.is_dir():
                raise InvalidArgumentError(
                    f"{what} {str(folder)!r} is a file, not a directory; give a directory "
                    "for the stored activations (it is created if missing)"
                )
        try:
            ArrayStore(self._model_dir).ensure_writable()
        except StoreError:
            # A store someone else built, on a read-only file system or in a shared cache:
            # its entries can still be read. The first entry that would have to be built
            # or rebuilt raises the StoreError (naming the directory) there.
            if not (self._model_dir / "src").is_dir():
                raise

        self._loader = make_loader(
            self.influence_src_dataset, self.batch_size, "influence_src_dataset", rows_ok=True
        )
        if self._dist is None:
            return {}
        return {
            "dataset length": dataset_length(self._loader),
            "number of batches": loader_batches(self._loader),
            "source examples (five sampled)": sampled_examples(self._loader),
        }

    def _fast_tensors(self) -> tuple[Tensor, ...] | None:
        """The source TensorDataset's tensors as they are now (this rank's rows), or
        ``None`` when the source is read through the DataLoader. Looked up at every call:
        a dataset whose ``tensors`` were replaced is read as it now is."""
        if self._fast_rows is None:
            return None
        start, stop = self._fast_rows
        dataset = cast(TensorDataset, self.influence_src_dataset)
        return tuple(t[start:stop] for t in dataset.tensors)

    def _shard(self, dist: DistributedContext) -> None:
        """Keep only this rank's contiguous range of the source set (own store folder)."""
        self._n_total = self._n_src()
        span = shard_range(self._loader, dist.rank, dist.world_size, "influence_src_dataset")
        if span is None:
            raise InvalidArgumentError(
                "SimilarityInfluence: influence_src_dataset is a DataLoader with "
                "batch_size=None (each item a whole batch), whose items cannot be counted "
                "as examples without reading them, so no rank would know where its range "
                "starts; under distributed, pass a DataLoader that batches (batch_size=...) "
                "or the Dataset itself, or pass distributed=False"
            )
        start, stop = span
        if self._fast_rows is not None:
            self._fast_rows = (start, stop)
        self._loader = shard_loader(
            self._loader, dist.rank, dist.world_size, "influence_src_dataset"
        )
        self._offset, self._n_local = start, stop - start
        self._model_dir = self._model_dir / f"rank-{dist.rank}-of-{dist.world_size}"
        ArrayStore(self._model_dir).ensure_writable()

    # ------------------------------------------------------------------------ public
    def influence(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Any, ...] | None,
        top_k: int = 1,
        additional_forward_args: Any = None,
        load_src_from_disk: bool = True,
        *,
        load_input_from_disk: bool = False,
        inputs_id: str | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """The ``top_k`` source examples most (or least) similar to each test example.

        Args:
            inputs: the test batch: a tensor, or a tuple of tensors when the model takes
                several inputs (called as ``module(*inputs, *additional_forward_args)``);
                any other object (a list of strings, say) is one argument; dimension 0
                indexes examples. May be ``None`` only together with
                ``load_input_from_disk=True`` and an ``inputs_id`` whose activations were
                saved before.
            top_k: how many source examples to return per test example,
                ``1 <= top_k <= len(influence_src_dataset)``.
            additional_forward_args: extra arguments passed to the model after the
                inputs (a tuple is unpacked; any other object is passed as one argument).
            load_src_from_disk: reuse stored source activations when they are valid for
                the current model and dataset. ``False`` recomputes and replaces them.
            load_input_from_disk: (keyword) load the activations saved for ``inputs_id``
                instead of running the model on ``inputs``. They are used only if they
                were computed by the same model weights and, when ``inputs`` is given,
                from the same inputs; otherwise they are recomputed with a warning.
            inputs_id: (keyword) a name for this test batch. Its activations are saved
                under ``activation_dir/model_id/inputs/<inputs_id>`` (replacing earlier
                ones unless ``load_input_from_disk`` reused them).
            show_progress: (keyword) show progress bars.

        Returns:
            ``{layer: (indices, values)}`` in the order of ``layers``: ``indices`` are
            ``(n_test, top_k)`` int64 positions in the source set and ``values`` the
            matching ``(n_test, top_k)`` scores, best first (descending for ``"max"``,
            ascending for ``"min"``; equal scores in index order), on the model's device.
            An empty test batch gives ``(0, top_k)`` tensors.

        Raises:
            InvalidArgumentError: ``top_k`` out of range, a metric returning the wrong
                shape, test and source activations of different sizes, missing inputs.
            ArgumentTypeError: unknown keyword arguments, arguments of the wrong type.
        """
        unknown = sorted(kwargs)
        if unknown:
            raise ArgumentTypeError(
                f"SimilarityInfluence.influence got unexpected keyword argument(s) {unknown}; "
                f"the accepted extra keywords are {list(_INFLUENCE_KWARGS)}"
            )
        top_k = check_int(top_k, "SimilarityInfluence.influence: top_k")
        load_src_from_disk = check_flag(load_src_from_disk, "load_src_from_disk")
        load_input_from_disk = check_flag(load_input_from_disk, "load_input_from_disk")
        show_progress = check_flag(show_progress, "show_progress")
        try:  # the model may have lost a layer (replaced or deleted) since construction
            _check_layers(self.module, self.layers)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(
                f"SimilarityInfluence: the model no longer has every layer it was constructed "
                f"with: {exc}. Construct a new SimilarityInfluence for the changed model"
            ) from None
        n_src = self._n_total if self._dist is not None else self._n_src()
        if top_k < 1 or (n_src is not None and top_k > n_src):
            allowed = (
                "at least 1"
                if n_src is None
                else f"between 1 and the number of source examples ({n_src})"
            )
            raise InvalidArgumentError(f"top_k={top_k} is out of range: it must be {allowed}")
        if inputs_id is not None and (not isinstance(inputs_id, str) or not inputs_id):
            raise ArgumentTypeError(f"inputs_id must be a non-empty str or None, got {inputs_id!r}")
        if load_input_from_disk and inputs_id is None:
            raise InvalidArgumentError(
                "load_input_from_disk=True needs inputs_id: the name the test activations "
                "were saved under"
            )
        if inputs is None and not load_input_from_disk:
            raise InvalidArgumentError(
                "inputs is None: pass the test batch (a tensor or a tuple of tensors), or "
                "load_input_from_disk=True with the inputs_id of saved activations"
            )
        test_items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        numpy_inputs = any(isinstance(item, np.ndarray) for item in test_items)
        largest = self.similarity_direction == "max"
        device = model_device(self.module)
        with call_scope(self.module, device):

            def test_side() -> tuple[str, dict[str, Tensor]]:
                try:
                    observe_forward_state(
                        self.module,
                        lambda: self._state_probe_inputs(inputs, additional_forward_args, device),
                    )
                    fingerprint = self._fingerprint(self.module)
                    return fingerprint, self._test_activations(
                        inputs,
                        additional_forward_args,
                        load_input_from_disk,
                        inputs_id,
                        fingerprint,
                        device,
                    )
                except (TypeError, RuntimeError) as err:
                    if not numpy_inputs:
                        raise
                    # (a model that takes NumPy arrays itself is served as it is)
                    raise ArgumentTypeError(
                        "SimilarityInfluence.influence: inputs hold NumPy arrays, which "
                        f"reach the model as they are, and it failed on them ({err}); pass "
                        "torch tensors (torch.from_numpy(array))"
                    ) from err

            if self._dist is not None:
                # inside a status exchange: a rank whose test side fails raises its error
                # and the others name it, instead of waiting for its candidates
                (fingerprint, test), _ = self._dist.run("SimilarityInfluence", test_side)
                # a rank with no test examples returns below: the others must have none
                # either, or they would wait for its candidates
                rows = {int(t.shape[0]) for t in test.values()}
                given = None if inputs is None else (inputs, additional_forward_args)
                facts = {
                    "the number of test examples": rows,
                    TEST_INPUTS: test_inputs_digest(given, False),
                }
                self._dist.agree("SimilarityInfluence", facts)
            else:
                fingerprint, test = test_side()
            if all(int(t.shape[0]) == 0 for t in test.values()):
                # no test examples: no rows to rank, and no need to read the source set
                return {layer: _empty_result(test[layer], top_k) for layer in self.layers}
            if self._dist is not None:
                return self._sharded_search(
                    self._dist,
                    test,
                    top_k,
                    largest,
                    fingerprint,
                    device,
                    load_src_from_disk,
                    show_progress,
                )
            results = self._search(
                test, top_k, largest, fingerprint, device, load_src_from_disk, show_progress
            )
        return {layer: results[layer] for layer in self.layers}

    def _sharded_search(
        self,
        dist: DistributedContext,
        test: dict[str, Tensor],
        top_k: int,
        largest: bool,
        fingerprint: str,
        device: torch.device,
        load_src_from_disk: bool,
        show_progress: bool,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Each rank's top ``top_k`` of its shard, merged over ranks, for every layer."""

        held: list[_Anomalies] = []

        def local() -> tuple[Tensor, Tensor] | None:
            if not self._n_local:
                return None
            self._held_anomalies = held
            try:
                found = self._search(
                    test,
                    min(top_k, self._n_local),
                    largest,
                    fingerprint,
                    device,
                    load_src_from_disk,
                    show_progress,
                )
            finally:
                self._held_anomalies = None
            pairs = [found[layer] for layer in self.layers]
            dtype = pairs[0][1].dtype
            return (
                torch.stack([i for i, _ in pairs]) + self._offset,
                torch.stack([v.to(dtype) for _, v in pairs]),
            )

        def order(v: Tensor) -> Tensor:  # the ordering of the single-process search
            return ranked_order(v, largest)

        def warn_all(every: list[Any]) -> None:  # the same warnings on every rank
            for met in _Anomalies.merged(every):
                self._warn_anomalies(met)

        out = dist.score_columns(
            "SimilarityInfluence",
            local,
            top_k,
            None,
            order,
            device,
            lambda: held,
            warn_all,
            k_name="top_k",
            call={"similarity_direction": "max" if largest else "min"},
        )
        assert isinstance(out, tuple)
        return {layer: (out[0][i], out[1][i]) for i, layer in enumerate(self.layers)}

    # ------------------------------------------------------------------- source side
    def _n_src(self) -> int | None:
        if self._n_local is not None:  # this rank's shard
            return self._n_local
        fast = self._fast_tensors()
        if fast is not None:
            return int(fast[0].shape[0])
        return dataset_length(self._loader)

    def _src_batches(self) -> tuple[Iterable[Any], int | None, bool]:
        """The source batches, their number, and whether they are views of stored tensors."""
        fast = self._fast_tensors()
        if fast is not None:
            n = int(fast[0].shape[0])
            bs = int(self.batch_size)
            it = ([t[s : s + bs] for t in fast] for s in range(0, n, bs))
            return it, math.ceil(n / bs), True
        return self._loader, loader_batches(self._loader), False

    def _state_probe_inputs(
        self, inputs: Any, additional_forward_args: Any, device: torch.device
    ) -> tuple[Any, ...] | None:
        """Model inputs for :func:`~proponents.model_guard.observe_forward_state`: a copy of
        the first test example, or of the first source example when there is none
        (activations loaded from disk); ``None`` for inputs the call will refuse."""
        if inputs is not None:
            if isinstance(inputs, (DataLoader, Dataset)) or (
                isinstance(inputs, tuple) and not inputs
            ):
                return None
            return _first_example(_test_args(inputs, additional_forward_args), device)
        batches, _, unbatched = self._src_batches()
        for batch in batches:
            args = _source_args(batch, not unbatched, self._unpacks_nested_inputs)
            return _first_example(args, device)
        return None

    def _src_meta(
        self,
        layer: str,
        fingerprint: str,
        n_src: int | None,
        probe: str | None,
        collate: str | None,
    ) -> dict:
        meta: dict[str, Any] = {
            "kind": _SRC_KIND,
            "layer": layer,
            "model": fingerprint,
            "dataset_length": n_src,
            "dataset_probe": probe,
        }
        if collate is not None:  # absent for the default: older entries still match
            meta["collate_fn"] = collate
        return meta

    def _probe(self) -> str | None:
        """The source dataset's :func:`dataset_probe`, with the order a DataLoader reads it
        in when that is not the plain sequential one (see :func:`_sampler_order`)."""
        # Asked at every call: this object digests a TensorDataset's tensors again only
        # after torch edited them (a pass over the source set costs more than a search)
        probe = dataset_probe(self._loader.dataset, versions=self._seen_versions)
        if not isinstance(self.influence_src_dataset, DataLoader):
            return probe
        order = _sampler_order(self._loader)
        if order is None:
            return probe
        digest = hashlib.sha256(f"{probe}|".encode())
        hash_object(order, digest)
        return digest.hexdigest()

    def _search(
        self,
        test: dict[str, Tensor],
        top_k: int,
        largest: bool,
        fingerprint: str,
        device: torch.device,
        load_src_from_disk: bool,
        show_progress: bool,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        store = ArrayStore(self._model_dir / "src")
        n_src = self._n_src()
        probe, collate = self._probe(), _collate_fingerprint(self._loader)
        metas = {
            layer: self._src_meta(layer, fingerprint, n_src, probe, collate)
            for layer in self.layers
        }
        keys = {layer: safe_name(layer) for layer in self.layers}
        job = _BuildJob(
            store, keys, metas, test, top_k, largest, device, show_progress, fingerprint
        )
        reuse = load_src_from_disk and n_src is not None
        entries: dict[str, StoredEntry] = {}
        results: dict[str, tuple[Tensor, Tensor]] = {}
        to_build = []
        for layer in self.layers:
            entry, why = (
                self._load_src(store, keys[layer], metas[layer], self._open_entries.get(layer))
                if reuse
                else (None, None)
            )
            if entry is not None:
                entries[layer] = self._keep_open(layer, entry)
                continue
            self._close_entry(layer)
            if why is not None:
                warn(
                    f"SimilarityInfluence: not using the stored activations of layer "
                    f"{layer!r} in {str(store.directory)!r} because {why}; recomputing "
                    "them. (To keep activations of several models or source datasets, "
                    "give each its own model_id or activation_dir.)",
                    StoreRebuildWarning,
                )
            to_build.append(layer)
        if to_build:
            with store.lock():
                if reuse:  # another process may have built them while we waited
                    for layer in list(to_build):
                        entry, _ = self._load_src(store, keys[layer], metas[layer])
                        if entry is not None:
                            entries[layer] = self._keep_open(layer, entry)
                            to_build.remove(layer)
                if to_build:
                    results.update(self._build(job, to_build))
        if entries:
            scored, needing = self._score_entries(
                entries, test, top_k, largest, device, show_progress
            )
            results.update(scored)
            if needing:
                # Only where the power-iteration estimate of a layer's gain fell short
                # (GAIN_HEADROOM): these test rows need the activations the entry omits.
                for layer in needing:
                    warn(
                        f"SimilarityInfluence: the stored entry of layer {layer!r} keeps the "
                        "layer's inputs without its activations, and these test activations "
                        "would round too coarsely on the input side; recomputing the entry "
                        "with the activations",
                        StoreRebuildWarning,
                    )
                    self._close_entry(layer)
                with store.lock():
                    rebuilt = self._build(job, needing, with_activations=set(needing))
                results.update(rebuilt)
        return results

    def _load_src(
        self,
        store: ArrayStore,
        key: str,
        meta: dict,
        reuse: StoredEntry | None = None,
        verify_data: bool = True,
    ) -> tuple[StoredEntry | None, str | None]:
        """:meth:`ArrayStore.load` of a source entry, refused when it cannot serve this
        object's similarity metric (see :func:`_src_entry_problem`)."""
        entry, why = store.load(
            key, meta, reuse=reuse, required=_SRC_ARRAYS, verify_data=verify_data
        )
        if entry is None:
            return None, why
        problem = _src_entry_problem(entry, self._kind)
        if problem is not None:
            if entry is not reuse:
                entry.close()
            return None, problem
        return entry, None

    def _keep_open(self, layer: str, entry: StoredEntry) -> StoredEntry:
        """Remember ``entry`` as the open store entry of ``layer`` (closing an older one).

        A later call hands it back to :meth:`ArrayStore.load`, which returns it as it is
        while its files are unchanged: no manifest parsing, no file opening, and its
        smaller arrays stay mapped.
        """
        if self._open_entries.get(layer) is not entry:
            self._close_entry(layer)
        self._open_entries[layer] = entry
        return entry

    def _close_entry(self, layer: str) -> None:
        old = self._open_entries.pop(layer, None)
        if old is not None:
            old.close()

    def _scorer(self, layer: str, test: Tensor, k: int, largest: bool, rows: int) -> BlockScorer:
        return BlockScorer(
            self.similarity_metric,
            self._kind,
            test,
            k,
            largest,
            layer,
            max_block_rows=rows,
            replace_nan=self.replace_nan,
        )

    def _stored_pullback(self, entry: StoredEntry, test: Tensor, layer: str) -> Pullback | None:
        """The pullback that scores ``test`` against this entry's stored layer inputs, if any."""
        if self._kind != "cosine" or LAYER_INPUTS not in entry.arrays:
            return None
        out_shape = _activation_shape(entry)
        if tuple(test.shape[1:]) != out_shape:
            return None  # the direct product reports the mismatch
        in_shape = tuple(entry.shape(LAYER_INPUTS)[1:])
        return Pullback.for_layer(self.module.get_submodule(layer), in_shape, out_shape)

    def _score_entries(
        self,
        entries: dict[str, StoredEntry],
        test: dict[str, Tensor],
        top_k: int,
        largest: bool,
        device: torch.device,
        show_progress: bool,
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], list[str]]:
        """Score the test activations against stored entries.

        Returns the results, and the layers left unscored because their entry keeps the
        layer inputs without the activations these test rows need (to be rebuilt).
        """
        plans = {}
        needing: list[str] = []
        for layer, entry in entries.items():
            pullback = self._stored_pullback(entry, test[layer], layer)
            # What a block reads: the layer inputs when a pullback serves, the
            # activations otherwise.
            read = ["activations"] if pullback is None else [LAYER_INPUTS]
            if pullback is None and "activations" not in entry.arrays:
                # an entry of layer inputs only that cannot serve: test activations of
                # another shape are refused, anything else needs the activations
                self._scorer(layer, test[layer], top_k, largest, 1).check_shape(
                    _activation_shape(entry)
                )
                needing.append(layer)
                continue
            row_bytes = max(1, sum(_row_bytes(entry, name) for name in read))
            n = entry.shape("norms")[0]
            plans[layer] = (n, max(1, BLOCK_BYTES // row_bytes), pullback)
        total = sum(math.ceil(n / rows) for n, rows, _ in plans.values())
        results = {}
        with Progress(
            show_progress, "SimilarityInfluence: scoring stored activations", total, "block"
        ) as bar:
            for layer, entry in entries.items():
                if layer not in plans:
                    continue
                n, rows, pullback = plans[layer]
                _check_top_k(top_k, n)
                scorer = self._scorer(layer, test[layer], top_k, largest, rows)
                if pullback is not None:
                    scorer.pull_back(*pullback.pull(test[layer], scorer.dtype))
                norms = torch.from_numpy(entry.read("norms"))
                clean = math.isfinite(float(norms.sum())) and not bool((norms == 0).any())
                # per block, what the input-side rounding check reads from the source
                # rows: kept with the open entry, so a repeated call reads no norms again
                kept = self._input_ratios.get(layer)
                if kept is None or kept[0] is not entry:
                    kept = self._input_ratios[layer] = (entry, {})
                for start in range(0, n, rows):
                    stop = min(n, start + rows)
                    pulled = None
                    if pullback is not None:
                        pulled = torch.from_numpy(entry.memmap(LAYER_INPUTS, start, stop))
                        pulled = _on(pulled, device)
                    # With layer inputs, cosine reads the activations only for a block
                    # the input side would round too coarsely for.
                    block = None
                    if "activations" in entry.arrays:
                        block = torch.from_numpy(entry.memmap("activations", start, stop))
                        if pulled is None:
                            block = _on(block, device)
                    try:
                        scorer.update(
                            block,
                            start,
                            norms[start:stop],
                            norms_clean=clean,
                            pulled=pulled,
                            input_ratio=kept[1].get(start),
                        )
                    except ActivationsNeeded:
                        needing.append(layer)
                        break
                    if pulled is not None and scorer.last_input_ratio is not None:
                        kept[1][start] = scorer.last_input_ratio
                    del block, pulled
                    bar.update()
                else:
                    results[layer] = self._finish(scorer)
        return results, needing

    def _build(
        self, job: _BuildJob, layers: list[str], with_activations: Collection[str] = ()
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Compute, store and score the source activations of ``layers``.

        A pass that started to keep a layer's inputs without its activations and then
        found it must not (:meth:`_build_pass`) is run again, that layer's activations
        stored.
        """
        forced = set(with_activations)
        while True:
            try:
                return self._build_pass(job, layers, forced)
            except ActivationsNeeded as exc:
                if exc.layer in forced:
                    raise
                forced.add(exc.layer)

    def _build_pass(
        self, job: _BuildJob, layers: list[str], with_activations: Collection[str]
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """One pass over the source set: compute, store and score the activations.

        Affine layers that widen their inputs get the source examples' layer inputs
        stored (see :mod:`proponents.influence._pullback`), and are scored through them
        here already. Their activations are then left out unless the layer is in
        ``with_activations`` or some source block could need them: cosine scores a
        block directly, on its activations, when the input side would round too
        coarsely, which depends on the test rows only through how far the layer's
        adjoint stretches them, at most ``‖A‖₂``. With ``‖A‖₂`` estimated and given
        :data:`GAIN_HEADROOM`, every block must pass for any test rows; the first block
        decides, and a later one that does not pass (or a later batch that drops the
        inputs) raises :class:`ActivationsNeeded` for :meth:`_build` to start again.
        """
        store, keys, metas, test = job.store, job.keys, job.metas, job.test
        top_k, largest, device = job.top_k, job.largest, job.device
        show_progress, fingerprint = job.show_progress, job.fingerprint
        modules = {layer: self.module.get_submodule(layer) for layer in layers}
        # Only cosine similarity takes its products on the input side: the rounding bound
        # that keeps the Euclidean search exact is several times wider there (the
        # products' magnitudes through |A|), and the extra candidates cost more than the
        # narrower product saves (docs/similarity.md).
        candidates = _pullback_candidates(modules) if self._kind == "cosine" else []
        extractor = _Extractor(modules, candidates)
        loader = self._loader
        # Without a batch size a DataLoader passes its items on as they are (uncollated).
        unbatched = loader.batch_size is None and loader.batch_sampler is None
        if self._fast_rows is None and unbatched:
            extractor.hint = (
                " (influence_src_dataset is a DataLoader with batch_size=None, which passes "
                "each item on as it is: unless its items are whole batches already, give "
                "the DataLoader a batch_size, or pass the Dataset itself)"
            )
        row_bytes = {
            layer: max(1, test[layer][0].numel() * _storage_dtype(test[layer].dtype).itemsize)
            for layer in layers
        }
        for layer in candidates:  # kept inputs are at most this fraction of the outputs
            row_bytes[layer] += math.ceil(MAX_WIDTH_FRACTION * row_bytes[layer])
        block_rows = max(1, BLOCK_BYTES // sum(row_bytes.values()))
        scorers = {
            layer: self._scorer(
                layer, test[layer], top_k, largest, block_rows + int(self.batch_size)
            )
            for layer in layers
        }
        batches, n_batches, views = self._src_batches()
        staging = {layer: _Staging(block_rows) for layer in layers}
        feature_shapes: dict[str, tuple[int, ...]] = {}
        state = {"start": 0, "rows": 0}

        with ExitStack() as stack:
            writers = {
                layer: stack.enter_context(store.writer(keys[layer], metas[layer]))
                for layer in layers
            }
            kept = {
                layer: _KeptInputs(layer, modules[layer], writers[layer], block_rows)
                for layer in candidates
            }

            def omit_activations(layer: str, inputs: Tensor | None) -> bool:
                """Whether this block's activations are left out (see above)."""
                keeping = kept.get(layer)
                if keeping is None:
                    return False
                if inputs is None or keeping.pullback is None or layer in with_activations:
                    if keeping.omitting:
                        raise ActivationsNeeded(layer)
                    keeping.omitting = False
                    return False
                if keeping.omitting is None:
                    keeping.gain = keeping.pullback.gain_estimate() * GAIN_HEADROOM
                ratio = scorers[layer].last_input_ratio
                safe = ratio is not None and scorers[layer].accurate_for_gain(
                    keeping.gain, ratio, keeping.pullback.width
                )
                if not safe:
                    if keeping.omitting:
                        raise ActivationsNeeded(layer)
                    keeping.omitting = False
                if keeping.omitting is None:
                    keeping.omitting = True
                return keeping.omitting

            def kept_inputs(layer: str) -> Tensor | None:
                """This block's kept layer inputs (now written), to score it with."""
                if layer not in kept:
                    return None
                inputs = kept[layer].take()
                pullback = kept[layer].pullback
                if inputs is None or pullback is None:
                    return None
                if not scorers[layer].pulled_back:
                    if tuple(test[layer].shape[1:]) != feature_shapes[layer]:
                        return None  # the direct product reports the mismatch
                    scorers[layer].pull_back(*pullback.pull(test[layer], scorers[layer].dtype))
                return inputs

            def flush() -> None:
                if state["rows"] == 0:
                    return
                for layer in layers:
                    block = staging[layer].take()
                    flat = block.reshape(block.shape[0], -1)
                    norm_dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
                    norms = row_norms(flat, norm_dtype)
                    inputs = kept_inputs(layer)
                    scorers[layer].update(block, state["start"], norms, pulled=inputs)
                    if not omit_activations(layer, inputs):
                        writers[layer].append("activations", block.cpu().numpy())
                    writers[layer].append("norms", norms.cpu().numpy())
                state["start"] += state["rows"]
                state["rows"] = 0

            expected = metas[layers[0]]["dataset_length"]
            if not views:
                batches = _reading(batches, expected, lambda: state["start"] + state["rows"])
            for i, batch in enumerate(
                progress_iter(
                    batches, show_progress, "SimilarityInfluence: source activations", n_batches
                )
            ):
                raw = _source_args(batch, not unbatched, self._unpacks_nested_inputs)
                args = to_device(raw, device)
                # still views of the dataset unless the move to the model's device copied them
                acts = self._forward(extractor, args, fingerprint, i == 0, raw if views else None)
                size = int(acts[layers[0]].shape[0])
                if state["rows"] + size > block_rows:
                    flush()
                for layer in layers:
                    act = acts[layer]
                    shape = tuple(act.shape[1:])
                    if feature_shapes.setdefault(layer, shape) != shape:
                        raise InvalidArgumentError(
                            f"layer {layer!r} gives activations of shape {shape} per example in "
                            f"source batch {i} but {feature_shapes[layer]} before; every "
                            "example must give activations of one shape (pad or resize inputs)"
                        )
                    if layer in kept:
                        kept[layer].add(extractor.inputs.get(layer), act)
                    staging[layer].add(act)
                state["rows"] += size
            flush()
            n_rows = state["start"]
            if expected is not None and n_rows != expected:
                raise InvalidArgumentError(
                    f"influence_src_dataset reports {expected} examples but yielded {n_rows}; "
                    "its __len__ must match what it yields"
                )
            _check_top_k(top_k, n_rows)
            for layer in layers:
                if layer in kept and kept[layer].omitting:
                    recorded = np.array(feature_shapes[layer], dtype=np.int64)
                    writers[layer].put(ACTIVATION_SHAPE, recorded)
                writers[layer].commit()
                # Kept open for the next call: the bytes are the ones just written (under
                # the store's lock), so they are not read back for their checksum.
                entry, _ = self._load_src(store, keys[layer], metas[layer], verify_data=False)
                if entry is not None:
                    self._keep_open(layer, entry)
        return {layer: self._finish(scorers[layer]) for layer in layers}

    def _finish(self, scorer: BlockScorer) -> tuple[Tensor, Tensor]:
        met = _Anomalies(
            scorer.layer, scorer.nonfinite_src, scorer.nonfinite_test, scorer.nan_scores
        )
        if self._held_anomalies is not None:  # a rank's shard: warned once ranks have met
            self._held_anomalies.append(met)
        else:
            self._warn_anomalies(met)
        return scorer.result()

    def _warn_anomalies(self, met: _Anomalies) -> None:
        # cosine gives NaN; a distance is +inf, or NaN where a NaN takes part or infinities
        # of one sign meet
        scores = {
            "cosine": "NaN and rank last",
            "euclidean": "infinite or NaN (NaN ranks last)",
        }.get(self._kind or "", "what similarity_metric makes of them (NaN ranks last)")
        if met.src:
            warn(
                f"SimilarityInfluence: {count(met.src, 'source example')} "
                f"{'has' if met.src == 1 else 'have'} non-finite "
                f"activations in layer {met.layer!r}; their scores are {scores}",
                RuntimeWarning,
            )
        if met.test:
            warn(
                f"SimilarityInfluence: {count(met.test, 'test example')} "
                f"{'has' if met.test == 1 else 'have'} non-finite "
                f"activations in layer {met.layer!r}; their scores are {scores}",
                RuntimeWarning,
            )
        elif met.nan and not met.src:
            warn(
                f"SimilarityInfluence: similarity_metric returned "
                f"{count(met.nan, 'NaN score')} for layer {met.layer!r}; "
                f"{'it ranks' if met.nan == 1 else 'they rank'} last",
                RuntimeWarning,
            )

    # --------------------------------------------------------------------- test side
    def _test_activations(
        self,
        inputs: Any,
        additional_forward_args: Any,
        load_input_from_disk: bool,
        inputs_id: str | None,
        fingerprint: str,
        device: torch.device,
    ) -> dict[str, Tensor]:
        args: tuple[Any, ...] | None = None
        inputs_hash = None
        undescribed = False
        if isinstance(inputs, (DataLoader, Dataset)):
            raise ArgumentTypeError(
                f"inputs must be a tensor or a tuple of tensors (one test batch), got "
                f"{article(type(inputs).__name__)}; call influence once per batch"
            )
        if inputs is not None:
            if isinstance(inputs, tuple) and not inputs:
                raise InvalidArgumentError(
                    "inputs is an empty tuple: give at least one model input"
                )
            args = _test_args(inputs, additional_forward_args)
            if inputs_id is not None:
                digest = hashlib.sha256()
                if hash_object(args, digest):
                    inputs_hash = digest.hexdigest()
                else:
                    # Part of the inputs is known only by its type (e.g. a function): saved
                    # activations cannot be shown to come from them, so these count as new
                    # inputs, and what is saved now will not be reused either.
                    inputs_hash = f"undescribed-{os.urandom(8).hex()}"
                    undescribed = True
        store = (
            ArrayStore(self._model_dir / "inputs" / safe_name(inputs_id))
            if inputs_id is not None
            else None
        )
        metas = {
            layer: {
                "kind": _INPUT_KIND,
                "layer": layer,
                "model": fingerprint,
                "inputs_id": inputs_id,
                "inputs": inputs_hash,
            }
            for layer in self.layers
        }
        acts: dict[str, Tensor] = {}
        if load_input_from_disk and store is not None:
            ignore = ("inputs",) if inputs is None else ()
            for layer in self.layers:
                entry, why = store.load(
                    safe_name(layer), metas[layer], ignore=ignore, required=("activations",)
                )
                if entry is not None:
                    with entry:
                        acts[layer] = torch.from_numpy(entry.read("activations")).to(device)
                    continue
                if args is None:
                    raise InvalidArgumentError(
                        f"no usable saved activations for inputs_id={inputs_id!r} and layer "
                        f"{layer!r} ({why or 'none were saved'}); pass inputs to compute them"
                    )
                if undescribed and why is not None:
                    why = (
                        "the inputs or additional_forward_args hold an object that cannot be "
                        "described by its content (e.g. a function), so they cannot be "
                        "compared with the saved ones"
                    )
                if why is not None:
                    warn(
                        f"SimilarityInfluence: not using the saved activations of inputs_id="
                        f"{inputs_id!r} for layer {layer!r} because {why}; recomputing them",
                        StoreRebuildWarning,
                    )
        missing = [layer for layer in self.layers if layer not in acts]
        if missing:
            assert args is not None  # guaranteed by the checks above
            modules = {layer: self.module.get_submodule(layer) for layer in missing}
            moved = to_device(args, device)
            # the caller's own tensors (not copied by a move) are not handed to the model
            computed = self._forward(_Extractor(modules), moved, fingerprint, False, args)
            if store is not None:
                with store.lock():
                    for layer in missing:
                        with store.writer(safe_name(layer), metas[layer]) as writer:
                            act = computed[layer]
                            act = act.to(_storage_dtype(act.dtype)).contiguous().cpu()
                            writer.append("activations", act.numpy())
                            writer.commit()
            acts.update(computed)
        sizes = {layer: int(a.shape[0]) for layer, a in acts.items()}
        if len(set(sizes.values())) > 1:
            raise InvalidArgumentError(
                f"the test activations disagree on the number of examples: {sizes}"
            )
        return acts

    # ----------------------------------------------------------------------- forward
    def _forward(
        self,
        extractor: _Extractor,
        args: tuple[Any, ...],
        fingerprint: str,
        trial: bool,
        given: tuple[Any, ...] | None = None,
    ) -> dict[str, Tensor]:
        """Run the model on ``args`` and capture the layers, choosing the memory layout.

        Args:
            given: the caller's tensors ``args`` were moved from (the test inputs, or
                views of a stored dataset). Those ``args`` still share with them are
                copied for the model, in the chosen layout (so still one copy per batch):
                a model that edits its input in place cannot reach the caller's data.
        """

        def run(channels_last: bool) -> dict[str, Tensor]:
            own = args if given is None else unshared(args, given, copy_layout(channels_last))
            return extractor.run(self.module, in_channels_last(own) if channels_last else own)

        signature = _layout_signature(args, fingerprint)
        if signature is None or self.channels_last is False:
            return run(False)
        if self.channels_last is True:
            return run(True)
        known = self._layouts.get(signature)
        if known is not None:
            return run(known)
        if not trial:
            return run(False)
        t0 = time.perf_counter()
        acts = run(False)
        t_plain = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            other = run(True)
            t_cl = time.perf_counter() - t0
            same = all(_close(acts[name], other[name]) for name in acts)
            self._layouts[signature] = same and t_cl < 0.9 * t_plain
        except Exception:  # noqa: BLE001 - e.g. a .view() that needs a contiguous input
            self._layouts[signature] = False
        return acts


# ---------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class _Anomalies:
    """What scoring one layer met: source and test examples with non-finite
    activations, and NaN scores returned by the metric."""

    layer: str
    src: int
    test: int
    nan: int

    @staticmethod
    def merged(ranks: Iterable[list[_Anomalies] | None]) -> list[_Anomalies]:
        """One record per layer over every rank's records, in the layers' order: source
        rows and scores are split over ranks (summed); every rank that scores at all
        scores the whole test batch (the largest count, not the sum)."""
        out: dict[str, _Anomalies] = {}
        for records in ranks:
            for met in records or ():
                seen = out.setdefault(met.layer, _Anomalies(met.layer, 0, 0, 0))
                seen.src += met.src
                seen.nan += met.nan
                seen.test = max(seen.test, met.test)
        return list(out.values())


@dataclasses.dataclass(frozen=True)
class _BuildJob:
    """What a pass over the source set (:meth:`SimilarityInfluence._build`) works with."""

    store: ArrayStore
    keys: dict[str, str]
    metas: dict[str, dict]
    test: dict[str, Tensor]
    top_k: int
    largest: bool
    device: torch.device
    show_progress: bool
    fingerprint: str


class _Staging:
    """Gathers the activations of consecutive batches into one contiguous block.

    Copying each batch into a preallocated buffer converts its memory layout (e.g.
    channels-last) and its dtype to the stored ones in the same pass.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer: Tensor | None = None
        self.rows = 0

    def add(self, act: Tensor) -> None:
        b = int(act.shape[0])
        dtype = _storage_dtype(act.dtype)
        buf = self.buffer
        if buf is None or self.rows + b > buf.shape[0]:
            bigger = torch.empty(
                (max(self.capacity, self.rows + b), *act.shape[1:]), dtype=dtype, device=act.device
            )
            if buf is not None and self.rows:
                bigger[: self.rows].copy_(buf[: self.rows])
            self.buffer = buf = bigger
        buf[self.rows : self.rows + b].copy_(act)
        self.rows += b

    def take(self) -> Tensor:
        """The rows gathered so far (a view, valid until the next :meth:`add`)."""
        assert self.buffer is not None
        block = self.buffer[: self.rows]
        self.rows = 0
        return block


class _KeptInputs:
    """Keeps one layer's source inputs beside its activations, when a pullback serves it.

    The first batch decides: the layer's type and shapes must allow a pullback that
    saves work (:meth:`Pullback.for_layer`), and it must reproduce the direct inner
    products of that batch's first examples. A later batch with a differently shaped
    layer input (possible with strided convolutions) drops the inputs again. Inputs are
    staged per batch (converted to the standard layout once) and written block by block
    with the activations.
    """

    def __init__(self, layer: str, module: nn.Module, writer: Any, capacity: int) -> None:
        self.layer = layer
        self.module = module
        self.writer = writer
        self.pullback: Pullback | None = None
        self.decided = False
        #: whether the activations are left out (None until the first block decides)
        self.omitting: bool | None = None
        #: the adjoint's estimated gain with headroom, once the first block is written
        self.gain = 0.0
        self._staging = _Staging(capacity)

    def add(self, inputs: Tensor | None, outputs: Tensor) -> None:
        """Take one source batch's layer inputs and outputs."""
        if not self.decided:
            self.decided = True
            self.pullback = _verified_pullback(self.module, inputs, outputs)
        elif self.pullback is not None and (
            inputs is None or tuple(inputs.shape[1:]) != self.pullback.input_shape
        ):
            if self.omitting:  # earlier blocks were written without their activations
                raise ActivationsNeeded(self.layer)
            self.writer.discard(LAYER_INPUTS)
            self.pullback = None
            self._staging = _Staging(0)
        if self.pullback is not None and inputs is not None:
            self._staging.add(inputs)

    def take(self) -> Tensor | None:
        """The inputs staged since the last call (now written), or None."""
        if self.pullback is None or self._staging.rows == 0:
            return None
        block = self._staging.take()
        self.writer.append(LAYER_INPUTS, block.cpu().numpy())
        return block


def _activation_shape(entry: StoredEntry) -> tuple[int, ...]:
    """The per-example shape of a source entry's activations, stored or recorded."""
    if "activations" in entry.arrays:
        return tuple(entry.shape("activations")[1:])
    return tuple(int(v) for v in entry.read(ACTIVATION_SHAPE))


def _src_entry_problem(entry: StoredEntry, kind: str | None) -> str | None:
    """Why a stored source entry cannot serve a search of ``kind`` (None when it can)."""
    arrays = entry.arrays
    if "activations" in arrays:
        return None
    if LAYER_INPUTS not in arrays or ACTIVATION_SHAPE not in arrays:
        return "it lacks the array 'activations' (damaged)"
    if kind != "cosine":
        return (
            "it keeps the layer's inputs instead of its activations (it was built for "
            "cosine similarity, which searches on the input side) and this "
            "similarity_metric needs the activations"
        )
    return None


def _verified_pullback(
    module: nn.Module, inputs: Tensor | None, outputs: Tensor
) -> Pullback | None:
    """A pullback of ``module`` that reproduces this batch's inner products, or None."""
    if inputs is None or inputs.shape[0] != outputs.shape[0] or inputs.shape[0] == 0:
        return None
    if not inputs.is_floating_point() or inputs.dtype != outputs.dtype:
        return None
    pullback = Pullback.for_layer(module, tuple(inputs.shape[1:]), tuple(outputs.shape[1:]))
    if pullback is None:
        return None
    few = min(8, int(outputs.shape[0]))
    try:
        ok = pullback.agrees(inputs[:few], outputs[:few])
    except (RuntimeError, ValueError, TypeError):
        ok = False
    return pullback if ok else None


def _sampler_order(loader: DataLoader) -> Any:
    """What decides the order a DataLoader reads its dataset in, when it is not the
    plain sequential order (``None`` then), described without drawing a random number.

    A sampler or batch sampler that is a sequence (``range``, a list, an array) is
    described by its indices; any other one only by its class, since iterating it could
    consume the global random generators (a custom sampler may be random).
    """
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    parts: list[Any] = []
    for name, obj in (("sampler", sampler), ("batch_sampler", batch_sampler)):
        if obj is None or isinstance(obj, SequentialSampler):
            continue
        if isinstance(obj, BatchSampler) and (
            obj.sampler is sampler or isinstance(obj.sampler, SequentialSampler)
        ):
            continue  # batches of the sampler above: its order, whatever the batch size
        if isinstance(obj, range):
            parts.append((name, obj))
        elif isinstance(obj, (list, tuple, np.ndarray, Tensor)):
            parts.append((name, _as_index_array(obj)))
        else:
            parts.append((name, f"{type(obj).__module__}.{type(obj).__qualname__}"))
    return parts or None


def _collate_fingerprint(loader: DataLoader) -> str | None:
    """The :func:`~proponents.fingerprints.callable_fingerprint` of a loader's own
    ``collate_fn``, or ``None`` for torch's default (``default_convert`` without a batch
    size): the batches the model sees depend on it, the dataset probe does not see it."""
    collate = loader.collate_fn
    if collate is default_collate or collate is default_convert:
        return None
    return callable_fingerprint(collate)


def _reading(batches: Iterable[Any], expected: int | None, done: Callable[[], int]) -> Any:
    """``batches``, with an ``IndexError`` raised while reading them (a dataset whose
    ``__len__`` promises more items than its ``__getitem__`` has) turned into the error
    that says so; ``done()`` is the number of examples read so far."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except IndexError as exc:
            detail = f"IndexError: {exc}" if str(exc) else "IndexError"
            raise InvalidArgumentError(
                f"influence_src_dataset reports {expected} examples but reading them failed "
                f"after {done()} ({detail}); its __len__ must match what __getitem__ can "
                "return"
            ) from exc
        yield batch


def _empty_result(test: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """``(indices, values)`` of shape ``(0, top_k)`` for an empty test batch, of the
    dtypes and on the device a non-empty batch would give."""
    dtype = torch.float64 if test.dtype == torch.float64 else torch.float32
    return (
        torch.empty(0, top_k, dtype=torch.int64, device=test.device),
        torch.empty(0, top_k, dtype=dtype, device=test.device),
    )


def _as_index_array(indices: Any) -> Any:
    """A sequence of integer indices as one int64 array (hashed in one pass, not index by
    index); anything else (e.g. ragged lists of batches) as it is."""
    try:
        array = np.asarray(indices)
    except (TypeError, ValueError, RuntimeError):
        return indices
    return array.astype(np.int64) if array.dtype.kind in "iu" else indices


def _close_entries(entries: dict[str, StoredEntry]) -> None:
    for entry in entries.values():
        entry.close()
    entries.clear()


def _pullback_candidates(modules: dict[str, nn.Module]) -> list[str]:
    """The layers whose type may allow a pullback (their inputs are captured)."""
    return [name for name, module in modules.items() if may_pull_back(module)]


def _row_bytes(entry: StoredEntry, name: str) -> int:
    """Bytes of one row of array ``name`` of ``entry``."""
    shape = entry.shape(name)
    return int(np.prod(shape[1:], dtype=np.int64)) * entry.dtype(name).itemsize


def _on(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor if tensor.device == device else tensor.to(device)


class _Extractor:
    """Captures the output tensors of named submodules during one forward pass.

    For the layers named in ``inputs_of`` the first input tensor is captured as well
    (into :attr:`inputs`, replaced at every :meth:`run`), for the pullback search.
    """

    def __init__(self, modules: dict[str, nn.Module], inputs_of: Iterable[str] = ()) -> None:
        self.modules = modules
        self.inputs_of = frozenset(inputs_of)
        self.inputs: dict[str, Tensor] = {}
        self.clone = False
        #: Appended to the message about a first dimension that does not index examples.
        self.hint = ""

    def run(self, model: nn.Module, args: tuple[Any, ...]) -> dict[str, Tensor]:
        captured: dict[str, Tensor] = {}
        versions: dict[str, int | None] = {}
        inputs: dict[str, Tensor] = {}
        input_versions: dict[str, int | None] = {}
        clone = self.clone

        def hook_for(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, layer_inputs: Any, output: Any) -> None:
                if not isinstance(output, Tensor):
                    raise ArgumentTypeError(
                        f"layer {name!r} returns {article(type(output).__name__)}, not a "
                        "tensor; "
                        "choose a layer whose output is a single tensor (e.g. a submodule of it)"
                    )
                # A tensor made under inference_mode keeps no version counter, so a later
                # in-place edit of it could not be seen: it is copied at once (None).
                out = output.detach()
                versions[name] = None if clone else version_counter(out)
                captured[name] = out if versions[name] is not None else out.clone()
                if name in self.inputs_of and layer_inputs and isinstance(layer_inputs[0], Tensor):
                    x = layer_inputs[0].detach()
                    input_versions[name] = None if clone else version_counter(x)
                    inputs[name] = x if input_versions[name] is not None else x.clone()

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]
        try:
            model(*args)
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in self.modules if n not in captured]
        if missing:
            raise InvalidArgumentError(
                f"layer(s) {missing} did not run during the forward pass, so they have no "
                "activations; choose layers the model's forward uses"
            )
        # (a copy, None, cannot have changed)
        changed = any(
            versions[n] is not None and version_counter(captured[n]) != versions[n]
            for n in captured
        ) or any(
            input_versions[n] is not None and version_counter(inputs[n]) != input_versions[n]
            for n in inputs
        )
        if not clone and changed:
            # A later in-place operation changed a captured tensor: capture copies instead.
            self.clone = True
            return self.run(model, args)
        self.inputs = inputs
        try:
            n = batch_size_of(args)
        except BatchFormatError:
            n = int(next(iter(captured.values())).shape[0]) if captured else 0
        for name, act in captured.items():
            if act.dim() == 0 or act.shape[0] != n:
                raise InvalidArgumentError(
                    f"layer {name!r} gives an activation of shape {tuple(act.shape)} for model "
                    f"inputs whose first dimension is {n}; the first dimension of both must "
                    f"index the examples{self.hint}"
                )
            if act.is_complex():
                raise InvalidArgumentError(
                    f"layer {name!r} gives complex activations ({act.dtype}); similarity is "
                    "defined for real-valued ones: choose another layer, or wrap this one in a "
                    "module that returns a real view of it (e.g. torch.view_as_real)"
                )
        # Test and source activations meet in the dtype the source ones are stored in
        # (bfloat16, integer and bool outputs as float32), for every metric.
        return {name: act.to(_storage_dtype(act.dtype)) for name, act in captured.items()}


def _check_layers(module: nn.Module, layers: Any) -> list[str]:
    if isinstance(layers, str):
        names = [layers]
    elif isinstance(layers, (list, tuple)) and all(isinstance(x, str) for x in layers):
        names = list(dict.fromkeys(layers))
    else:
        raise ArgumentTypeError(
            f"layers must be a layer name or a list of names, got {type(layers).__name__}"
        )
    if not names:
        raise InvalidArgumentError("layers is empty: name at least one layer of the model")
    valid = [name for name, _ in module.named_modules() if name]
    # every name of a module registered twice (self.out = self.head) is accepted
    valid_set = {name for name, _ in module.named_modules(remove_duplicate=False) if name}
    for name in names:
        if name not in valid_set:
            shown = ", ".join(valid[:40]) + (
                f", … ({len(valid) - 40} more)" if len(valid) > 40 else ""
            )
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise InvalidArgumentError(
                f"unknown layer {name!r} in layers.{hint} Valid layer names of this "
                f"{type(module).__name__}: {shown or '(the model has no submodules)'}"
            )
    return names


def _check_top_k(top_k: int, n: int) -> None:
    if top_k > n:
        raise InvalidArgumentError(
            f"top_k={top_k} is out of range: it must be between 1 and the number of source "
            f"examples ({n})"
        )


def _takes_several_inputs(module: nn.Module) -> bool:
    """Whether ``module``'s forward may take two or more positional arguments (or its
    signature cannot be read): a forward of one argument gets a list as that argument."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def _source_args(batch: Any, collated: bool = True, several_inputs: bool = True) -> tuple[Any, ...]:
    """The model arguments of a source batch: ``batch[:-1]`` of a tuple or list (the inputs
    its first element holds, for ``((x1, x2), label)`` items, when the model may take
    ``several_inputs``), else the batch itself. A
    ``collated`` batch that is a list of strings is one input: collation turns string
    items (any other item, not a tuple) into a list of them."""
    if collated and _is_text_batch(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise BatchFormatError(
                "a source batch is an empty tuple; items should be (*model_inputs, label) "
                "or a single model input"
            )
        if several_inputs and len(batch) == 2 and _several_inputs_in(batch[0]):
            # Captum's form for several model inputs: ((x1, x2), label) items
            return tuple(batch[0])
        return tuple(batch[:-1]) if len(batch) >= 2 else (batch[0],)
    return (batch,)


def _several_inputs_in(first: Any) -> bool:
    """Whether the first element of an ``(inputs, label)`` batch is several model inputs
    (a tuple or list of two or more tensors, as ``((x1, x2), label)`` items collate)."""
    return (
        isinstance(first, (tuple, list))
        and len(first) >= 2
        and all(isinstance(t, torch.Tensor) for t in first)
    )


def _is_text_batch(batch: Any) -> bool:
    """Whether ``batch`` is a non-empty list of strings (a batch of texts)."""
    return isinstance(batch, list) and bool(batch) and all(isinstance(x, str) for x in batch)


def _first_example(args: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """The first example of the batch ``args`` (a batch of one; the whole batch where its
    examples cannot be told), copied onto ``device``: nothing the caller holds."""
    try:
        n = batch_size_of(args)
    except BatchFormatError:
        n = 1
    first = map_rows(args, n, lambda t: t[:1]) if n > 1 else args
    return unshared(to_device(first, device), first)


def _test_args(inputs: Any, additional_forward_args: Any) -> tuple[Any, ...]:
    """The model arguments of a test batch: ``inputs`` (only a tuple holds several model
    inputs, the spec's form; any other object, a list of strings included, is one input),
    then ``additional_forward_args``."""
    given = tuple(inputs) if isinstance(inputs, tuple) else (inputs,)
    return given + _as_tuple(additional_forward_args)


def _as_tuple(extra: Any) -> tuple[Any, ...]:
    if extra is None:
        return ()
    return tuple(extra) if isinstance(extra, tuple) else (extra,)


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype activations are stored and compared in: float32 for every dtype but the
    three that numpy stores (it has no bfloat16; integer and bool outputs are values)."""
    if dtype in (torch.float64, torch.float32, torch.float16):
        return dtype
    return torch.float32


#: Channels-last decisions per model, keyed by :func:`_layout_signature`: a new object
#: over the same model and weights (e.g. another activation directory) need not try the
#: layouts again.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, bool]] = weakref.WeakKeyDictionary()


def _layout_signature(args: tuple[Any, ...], fingerprint: str) -> Any:
    images = [a for a in args if is_image(a)]
    if not images or any(a.device.type != "cpu" for a in images):
        return None
    shapes = tuple((tuple(a.shape[1:]), a.dtype) for a in images)
    return fingerprint, shapes, torch.get_num_threads()


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    scale = float(a.abs().nan_to_num(0.0, 0.0, 0.0).max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30), equal_nan=True))


__all__ = ["SimilarityInfluence", "cosine_similarity", "euclidean_distance"]
