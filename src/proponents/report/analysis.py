"""Computing what a report shows: predictions, proponents/opponents, a suspicion ranking.

:func:`run_method` runs one of the library's methods over a model, its datasets and its
checkpoints, the way the command line does; :func:`predict` and
:func:`pick_test_examples` choose which test examples to explain.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from proponents.checkpoints import load_flexible_state_dict
from proponents.errors import ArgumentTypeError, InvalidArgumentError
from proponents.progress import progress_iter
from proponents.report.render import object_rows, tensor_numpy
from proponents.scoring import k_most

#: Method names accepted by the command line, in the order they are documented.
METHODS = ("tracincp", "fast", "randproj", "similarity")
#: Report headings of the TracIn methods' results (scores are for the test example's label).
PROPONENTS_TITLE = "Proponents: lowered this example's loss on its label"
OPPONENTS_TITLE = "Opponents: raised it"
#: Neighbours compared by the similarity method's label-disagreement score.
NEIGHBOURS = 10


@dataclass
class Analysis:
    """The results of one method, ready for :func:`~proponents.report.build_report`.

    Attributes:
        method: the method name (one of :data:`METHODS`).
        test_indices: ``(n_shown,)`` positions of the explained test examples.
        proponents: ``(indices, scores)``, both ``(n_shown, k)``.
        opponents: the same for opponents.
        suspicion: ``(n_train,)`` suspicion scores (self-influence or its stand-in).
        suspicion_name: what :attr:`suspicion` is.
        proponents_title: heading for proponents in the report.
        opponents_title: heading for opponents.
        notes: sentences explaining choices the method made.
        ranking_note: what ranks high by :attr:`suspicion`, for the report (``None``:
            the report's TracIn reading).
        examples_note: what the proponent and opponent strips show (``None``: TracIn's).
        uses_checkpoints: whether the method read every checkpoint (``False``: only the
            weights the model holds, the last checkpoint's).
        seconds: wall time of each step.
    """

    method: str
    test_indices: np.ndarray
    proponents: tuple[np.ndarray, np.ndarray]
    opponents: tuple[np.ndarray, np.ndarray]
    suspicion: np.ndarray
    suspicion_name: str
    proponents_title: str = PROPONENTS_TITLE
    opponents_title: str = OPPONENTS_TITLE
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    ranking_note: str | None = None
    examples_note: str | None = None
    uses_checkpoints: bool = True


def collate(dataset: Dataset, indices: Sequence[int] | np.ndarray) -> tuple[tuple[Any, ...], Any]:
    """Stack the items at ``indices`` into one batch ``(inputs, labels)``."""
    batch = default_collate([dataset[int(i)] for i in indices])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), batch[-1]
    return (batch,), None


def per_example_loss(loss_fn: Callable[..., Tensor]) -> Callable[[Tensor, Any], Tensor]:
    """A version of ``loss_fn`` that returns one value per example, ``(batch,)``.

    A loss module with a ``reduction`` attribute is copied with ``reduction="none"``;
    its entries are summed over non-batch dimensions (for ``"mean"`` losses: averaged).
    A module that still reduces the batch (a wrapper that ignores the attribute) and any
    other callable are applied to one example at a time.

    Raises:
        InvalidArgumentError: (from the returned function) ``loss_fn`` gives more than one
            value for a batch of one example.
    """

    def looped(out: Tensor, labels: Any) -> Tensor:
        values = []
        for i in range(out.shape[0]):
            value = torch.as_tensor(loss_fn(out[i : i + 1], labels[i : i + 1]))
            if value.numel() != 1:
                raise InvalidArgumentError(
                    f"loss_fn gave {value.numel()} values (shape {tuple(value.shape)}) for a "
                    "batch of one example, and the report needs one loss per example; give a "
                    "loss_fn that reduces a batch to one number, e.g. "
                    "nn.CrossEntropyLoss(reduction='sum')"
                )
            values.append(value.reshape(()))
        return torch.stack(values)

    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(reduction, str) and isinstance(loss_fn, nn.Module):
        unreduced: Any = copy.copy(loss_fn)
        unreduced.reduction = "none"

        def batched(out: Tensor, labels: Any) -> Tensor:
            value = unreduced(out, labels)
            n = out.shape[0]
            if value.dim() == 0 or value.shape[0] != n:  # it did not keep the batch
                return looped(out, labels)
            flat = value.reshape(n, -1)
            return flat.mean(1) if reduction == "mean" else flat.sum(1)

        return batched
    return looped


#: Losses of models whose outputs are values, not class scores.
_REGRESSION_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)


def prediction_kind(loss_fn: Callable[..., Tensor] | None) -> str:
    """How :func:`predict` reads an output, from the loss the model is trained with.

    ``"logit"`` (``BCEWithLogitsLoss``: a class is predicted where its output is above 0),
    ``"probability"`` (``BCELoss``: above 0.5), ``"value"`` (``MSELoss``, ``L1Loss``,
    ``SmoothL1Loss``, ``HuberLoss``: the output itself), or ``"class"`` for any other loss
    (the argmax of a last dimension of several entries, else the value).
    """
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return "logit"
    if isinstance(loss_fn, nn.BCELoss):
        return "probability"
    if isinstance(loss_fn, _REGRESSION_LOSSES):
        return "value"
    return "class"


def _predictions(out: Tensor, kind: str) -> np.ndarray:
    """One prediction per example of a batch's output (see :func:`prediction_kind`)."""
    n = int(out.shape[0])
    if kind == "class" and out.dim() >= 2 and out.shape[-1] > 1:
        return out.argmax(-1).reshape(n, -1)[:, 0].cpu().numpy()
    flat = out.reshape(n, -1)
    if kind in ("logit", "probability"):
        positive = (flat > (0.0 if kind == "logit" else 0.5)).cpu().numpy()
        if positive.shape[1] == 1:  # one binary output: class 1 or 0
            return positive[:, 0].astype(np.int64)
        # several binary outputs (multi-label): the classes predicted present
        return object_rows(np.flatnonzero(row).tolist() for row in positive)
    values = flat.float().cpu().numpy()
    if kind == "value" and values.shape[1] > 1:  # a multi-output regression: every value
        return object_rows(row.tolist() for row in values)
    return values[:, 0]


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[..., Tensor] | None = None,
    batch_size: int = 256,
    show_progress: bool = False,
    desc: str = "predicting",
    with_losses: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions and per-example losses, in eval mode.

    Args:
        model: the model, with the weights to evaluate (its train/eval mode is restored).
        dataset: items ``(*inputs, label)``.
        loss_fn: the loss the model is trained with: it decides how an output is read
            (:func:`prediction_kind`) and gives the losses; ``None``: class scores (or
            values), no losses.
        batch_size: examples per forward pass.
        show_progress: show a progress bar.
        desc: the progress bar's label.
        with_losses: compute the losses (when ``loss_fn`` is given).

    Returns:
        ``(predictions, losses)``, both ``(n,)``; ``losses`` is ``None`` without them.
        A prediction is a class index (argmax of class scores, or a thresholded binary
        output), the value of a one-output regression, or a list: the classes predicted
        present by a multi-label model, the values of a multi-output regression.
    """
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loss_one = per_example_loss(loss_fn) if loss_fn is not None and with_losses else None
    kind = prediction_kind(loss_fn)
    preds: list[np.ndarray] = []
    losses: list[np.ndarray] = []
    # A generator of its own: iterating a DataLoader draws a seed, not from global state.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    try:
        for batch in progress_iter(loader, show_progress, desc, total=len(loader)):
            if isinstance(batch, (tuple, list)) and len(batch) >= 2:
                inputs, labels = tuple(batch[:-1]), batch[-1]
            else:
                inputs, labels = (batch,), None
            inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in inputs)
            out = model(*inputs)
            preds.append(_predictions(out, kind))
            if loss_one is not None and labels is not None:
                if isinstance(labels, Tensor):
                    labels = labels.to(device)
                losses.append(loss_one(out, labels).float().cpu().numpy())
    finally:
        model.train(was_training)
    loss_array = np.concatenate(losses) if losses else None
    return np.concatenate(preds), loss_array


def labels_of(dataset: Dataset) -> np.ndarray:
    """The labels (last element of each item) of a dataset, as an array.

    A ``TensorDataset``'s last tensor is read directly; other datasets are read item by
    item, keeping only the labels.
    """
    if isinstance(dataset, TensorDataset):
        return tensor_numpy(dataset.tensors[-1])
    labels = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        labels.append(item[-1] if isinstance(item, (tuple, list)) and len(item) >= 2 else None)
    if any(label is None for label in labels):
        raise InvalidArgumentError(
            "the dataset's items carry no label; each item must be (*inputs, label)"
        )
    stacked = default_collate(labels)
    return tensor_numpy(stacked) if isinstance(stacked, Tensor) else np.asarray(stacked)


def pick_test_examples(
    labels: np.ndarray, predictions: np.ndarray, n_wrong: int, n_right: int
) -> np.ndarray:
    """The first ``n_wrong`` misclassified and first ``n_right`` correct test examples.

    When there are fewer of one kind, the other fills the gap, so ``n_wrong + n_right``
    examples are returned whenever the test set has that many. Without class labels and
    class predictions (a regression, string labels), nothing is misclassified: the first
    ``n_wrong + n_right`` examples are returned.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    # one label per example shaped (N, 1): compared as (N,), not broadcast to (N, N)
    if labels.ndim > 1 and labels.size == len(labels):
        labels = labels.reshape(-1)
    if predictions.ndim > 1 and predictions.size == len(predictions):
        predictions = predictions.reshape(-1)
    if labels.dtype.kind == "f" and predictions.dtype.kind in "iub" and labels.ndim == 1:
        # 0./1. targets of a binary model (BCE losses take float labels) are classes
        if bool(np.all(np.isfinite(labels))) and bool(np.all(labels == np.round(labels))):
            labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iub" or predictions.dtype.kind not in "iub":
        return np.arange(min(len(labels), n_wrong + n_right), dtype=np.int64)
    wrong = np.flatnonzero(predictions != labels)
    right = np.flatnonzero(predictions == labels)
    take_wrong = min(len(wrong), n_wrong + max(0, n_right - len(right)))
    take_right = min(len(right), n_right + (n_wrong - take_wrong if take_wrong < n_wrong else 0))
    return np.concatenate([wrong[:take_wrong], right[:take_right]]).astype(np.int64)


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` among the model's modules (registration order).

    Raises:
        InvalidArgumentError: the model has no ``nn.Linear`` layer.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InvalidArgumentError(
            "the model has no nn.Linear layer; the fast methods need the final layer to be "
            "nn.Linear (name it with final_fc_layer), or use --method tracincp or similarity"
        )
    return names[-1]


def _reduction_flag(loss_fn: Any) -> bool:
    """``sample_wise_grads_per_batch`` for TracInCP: whether ``loss_fn`` reduces the batch."""
    return getattr(loss_fn, "reduction", "sum") != "none"


def _batch_reducing(loss_fn: Any) -> Any:
    """``loss_fn`` with a summing reduction when it is a ``reduction="none"`` module."""
    if isinstance(loss_fn, nn.Module) and getattr(loss_fn, "reduction", None) == "none":
        summed: Any = copy.copy(loss_fn)
        summed.reduction = "sum"
        return summed
    return loss_fn


def _np_pair(result: Any) -> tuple[np.ndarray, np.ndarray]:
    indices, scores = result[0], result[1]
    return (
        tensor_numpy(indices).astype(np.int64),
        tensor_numpy(scores).astype(np.float64),
    )


def run_method(
    method: str,
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    checkpoints: Any,
    loss_fn: Callable[..., Tensor],
    test_indices: Sequence[int] | np.ndarray,
    *,
    k: int = 10,
    batch_size: int = 64,
    checkpoints_load_func: Callable[..., Any] = load_flexible_state_dict,
    layers: list[str] | None = None,
    final_fc_layer: str | nn.Module | None = None,
    similarity_layer: str | None = None,
    projection_dim: int | None = None,
    sample_wise_grads_per_batch: bool | None = None,
    show_progress: bool = False,
    seed: int = 0,
) -> Analysis:
    """Run one method: proponents, opponents and a suspicion ranking of the training set.

    * ``"tracincp"``: :class:`~proponents.TracInCP` over ``layers`` (all by default);
      suspicion = self-influence.
    * ``"fast"``: ``TracInCPFast`` on ``final_fc_layer``; suspicion = its self-influence.
    * ``"randproj"``: ``TracInCPFastRandProj`` for proponents/opponents; random projections
      give no self-influence, so suspicion is ``TracInCPFast``'s.
    * ``"similarity"``: ``SimilarityInfluence`` (cosine) on ``similarity_layer``, with the
      model as it is now (load the final weights first); proponents are the most similar
      training examples, opponents the least similar; suspicion is the similarity-weighted
      share of an example's nearest neighbours whose label differs from its own.

    Args:
        method: one of :data:`METHODS`.
        model: the model (for ``"similarity"``: holding the weights to compare with).
        train_dataset: training items ``(*inputs, label)``.
        test_dataset: test items ``(*inputs, label)``.
        checkpoints: checkpoint source, as the influence classes take it.
        loss_fn: the training loss; for the fast methods a ``reduction="none"`` module is
            used with ``reduction="sum"`` (the same per-example gradients).
        test_indices: positions in ``test_dataset`` to explain.
        k: proponents and opponents per test example.
        batch_size: training examples per batch.
        checkpoints_load_func: ``f(model, checkpoint) -> learning_rate``.
        layers: ``TracInCP`` layers (``None``: all parameters).
        final_fc_layer: final ``nn.Linear`` for the fast methods (default: the last one).
        similarity_layer: layer compared by ``"similarity"`` (default: the input of the
            last ``nn.Linear``, i.e. the layer registered just before it).
        projection_dim: ``TracInCPFastRandProj``'s projection size (``None``: no projection).
        sample_wise_grads_per_batch: ``TracInCP``'s flag; default from ``loss_fn.reduction``
            (``"none"`` -> ``False``, anything else -> ``True``).
        show_progress: show progress bars.
        seed: seed of the random projections.

    Returns:
        The :class:`Analysis`.

    Raises:
        InvalidArgumentError: an unknown method or a ``k`` larger than the training set.
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n_train = len(train_dataset)  # type: ignore[arg-type]
    if not 1 <= k <= n_train:
        raise InvalidArgumentError(f"k={k} must be between 1 and the {n_train} training examples")
    shown = np.asarray(test_indices, dtype=np.int64)
    inputs, targets = collate(test_dataset, shown)
    seconds: dict[str, float] = {}
    notes: list[str] = []

    if method == "similarity":
        return _run_similarity(
            model,
            train_dataset,
            inputs,
            shown,
            k,
            batch_size,
            similarity_layer,
            show_progress,
        )

    start = time.perf_counter()
    if method == "tracincp":
        from proponents.influence.tracincp import TracInCP

        flag = (
            _reduction_flag(loss_fn)
            if sample_wise_grads_per_batch is None
            else sample_wise_grads_per_batch
        )
        tracin: Any = TracInCP(
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            layers=layers,
            loss_fn=loss_fn,
            batch_size=batch_size,
            sample_wise_grads_per_batch=flag,
        )
        self_tracin = tracin
        name = "TracInCP self-influence"
    else:
        from proponents.influence.fast import TracInCPFast, TracInCPFastRandProj

        fc = final_fc_layer if final_fc_layer is not None else last_linear(model)
        fast_loss = _batch_reducing(loss_fn)
        self_tracin = TracInCPFast(
            model, fc, train_dataset, checkpoints, checkpoints_load_func, fast_loss, batch_size
        )
        name = "TracInCPFast self-influence"
        if method == "fast":
            tracin = self_tracin
        else:
            tracin = TracInCPFastRandProj(
                model,
                fc,
                train_dataset,
                checkpoints,
                checkpoints_load_func,
                fast_loss,
                batch_size,
                projection_dim=projection_dim,
                seed=seed,
                show_progress=show_progress,
            )
            notes.append(
                "Random projections give no self-influence, so the suspicion ranking comes "
                "from TracInCPFast (the same last-layer gradients, exact)."
            )
        if fc == "" or fc is model:  # the model is the one nn.Linear
            fc_name = "the model itself (one nn.Linear)"
        else:
            fc_name = fc if isinstance(fc, str) else type(fc).__name__
        notes.append(f"Last-layer TracIn on {fc_name}.")
    seconds["setup"] = time.perf_counter() - start

    start = time.perf_counter()
    suspicion = self_tracin.self_influence(show_progress=show_progress)
    seconds["self-influence"] = time.perf_counter() - start
    start = time.perf_counter()
    if method == "randproj":
        # Its nearest-neighbour search answers one direction per call.
        pro = _call_influence(tracin, inputs, targets, k, True, show_progress)
        con = _call_influence(tracin, inputs, targets, k, False, show_progress)
    else:
        # One pass gives the full (n_shown, n_train) scores; both ends come from it.
        scores = _call_influence(tracin, inputs, targets, None, True, show_progress)
        pro, con = k_most(scores, k, True), k_most(scores, k, False)
    seconds["proponents/opponents"] = time.perf_counter() - start
    return Analysis(
        method=method,
        test_indices=shown,
        proponents=_np_pair(pro),
        opponents=_np_pair(con),
        suspicion=tensor_numpy(suspicion).astype(np.float64),
        suspicion_name=name,
        notes=notes,
        seconds=seconds,
    )


def _call_influence(
    tracin: Any,
    inputs: tuple[Any, ...],
    targets: Any,
    k: int | None,
    proponents: bool,
    progress: bool,
) -> Any:
    return tracin.influence(
        inputs, targets, k=k, proponents=proponents, unpack_inputs=True, show_progress=progress
    )


def _default_similarity_layer(model: nn.Module) -> str:
    """The module registered just before the last ``nn.Linear`` (its input, usually).

    Raises:
        InvalidArgumentError: the model has no ``nn.Linear``, so there is no default; the
            message asks for ``similarity_layer`` and lists some module names. Also when
            the model is one ``nn.Linear``, which has no layer inside to compare.
    """
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(repr(n) for n in names[:12]) + (", …" if len(names) > 12 else "")
        raise InvalidArgumentError(
            "the model has no nn.Linear layer, so there is no default layer to compare; name "
            "the layer whose activations similarity compares with similarity_layer (in the "
            f"task file, or run_method(similarity_layer=...)): one of {shown or 'its modules'}"
        )
    fc = last_linear(model)
    if fc == "":  # the model itself is the nn.Linear: it has no layer inside
        raise InvalidArgumentError(
            "the model is a single nn.Linear, so it has no inner layer whose activations "
            "similarity could compare (the default is the input of the last nn.Linear); use "
            "another method (tracincp, fast or randproj), or build the model from named "
            "layers (nn.Sequential, say) and name one with similarity_layer"
        )
    names = [name for name, m in model.named_modules() if name and not list(m.children())]
    position = names.index(fc) if fc in names else -1
    if position <= 0:
        return fc
    return names[position - 1]


def _run_similarity(
    model: nn.Module,
    train_dataset: Dataset,
    inputs: tuple[Any, ...],
    test_indices: np.ndarray,
    k: int,
    batch_size: int,
    layer: str | None,
    show_progress: bool,
) -> Analysis:
    from proponents.influence.similarity import SimilarityInfluence

    if layer is not None and not isinstance(layer, str):
        raise ArgumentTypeError(
            f"similarity_layer must be the name of one module (a str), got {layer!r}; the "
            "similarity method compares one layer"
        )
    layer = layer if layer is not None else _default_similarity_layer(model)
    seconds: dict[str, float] = {}
    n_train = len(train_dataset)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="proponents-activations-") as folder:
        start = time.perf_counter()
        most = SimilarityInfluence(
            model, layer, train_dataset, folder, "model", batch_size=batch_size
        )
        least = SimilarityInfluence(
            model,
            layer,
            train_dataset,
            folder,
            "model",
            similarity_direction="min",
            batch_size=batch_size,
        )
        test_inputs: Any = inputs if len(inputs) > 1 else inputs[0]
        pro = most.influence(test_inputs, top_k=k, show_progress=show_progress)[layer]
        con = least.influence(test_inputs, top_k=k, show_progress=show_progress)[layer]
        seconds["proponents/opponents"] = time.perf_counter() - start

        start = time.perf_counter()
        # One row per example: a label of shape (1,) or (d,) (a regression target) is
        # compared entry by entry, and differs when any entry does.
        labels = labels_of(train_dataset)
        labels = labels.reshape(labels.shape[0], -1) if labels.ndim else labels.reshape(1, 1)
        neighbours = min(NEIGHBOURS, n_train - 1)
        suspicion = np.zeros(n_train)
        if neighbours >= 1:
            chunk = 512
            for lo in progress_iter(
                range(0, n_train, chunk),
                show_progress,
                "similarity: neighbour labels",
                total=-(-n_train // chunk),
            ):
                rows = np.arange(lo, min(lo + chunk, n_train))
                train_inputs, _ = collate(train_dataset, rows)
                batch: Any = train_inputs if len(train_inputs) > 1 else train_inputs[0]
                found, similar = most.influence(batch, top_k=neighbours + 1)[layer]
                idx = tensor_numpy(found)
                sim = tensor_numpy(similar).astype(np.float64)
                # Drop each example itself from its neighbours, keep the nearest others.
                order = np.argsort(idx == rows[:, None], axis=1, kind="stable")[:, :neighbours]
                near = np.take_along_axis(idx, order, axis=1)
                weight = np.clip(np.take_along_axis(sim, order, axis=1), 0.0, None)
                differs = (labels[near] != labels[rows][:, None]).any(axis=-1)
                total = weight.sum(axis=1)
                share = (weight * differs).sum(axis=1) / np.where(total > 0, total, 1.0)
                suspicion[rows] = np.where(total > 0, share, differs.mean(axis=1))
        seconds["self-influence"] = time.perf_counter() - start
    return Analysis(
        method="similarity",
        test_indices=test_indices,
        proponents=_np_pair(pro),
        opponents=_np_pair(con),
        suspicion=suspicion,
        suspicion_name=f"neighbour label disagreement ({layer})",
        proponents_title=f"Most similar training examples (cosine similarity of {layer})",
        opponents_title="Least similar training examples",
        ranking_note=(
            "An example ranks high when the training examples most similar to it carry "
            "other labels (a wrong label among look-alikes, or an example between classes)."
        ),
        examples_note=(
            "Each test example (blue) beside the training examples whose activations of "
            f"layer {layer!r} at the final weights are the most similar to its own (cosine "
            "similarity) and the least similar. Similarity reads neither the labels nor "
            "the loss: it shows look-alikes, not what moved the prediction."
        ),
        uses_checkpoints=False,
        notes=[
            f"Similarity of the activations of layer {layer!r} at the final weights. "
            "Similarity has no self-influence: an example is suspicious when the "
            f"{NEIGHBOURS} training examples most similar to it mostly carry another label."
        ]
        + (
            []
            if labels.dtype.kind in "iub"
            else [
                "The labels are not integer classes: a neighbour counts as disagreeing when "
                "its label differs at all, so this ranking says little about a regression."
            ]
        ),
        seconds=seconds,
    )
