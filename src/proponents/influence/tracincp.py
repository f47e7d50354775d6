"""TracInCP: exact TracIn over checkpoints for any differentiable parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from proponents.checkpoints import load_flexible_state_dict
from proponents.checks import check_flag
from proponents.gradients.engine import GradientEngine
from proponents.gradients.loss import resolve_loss
from proponents.gradients.selection import resolve_layers
from proponents.influence.base import TracInCPBase
from proponents.scoring import TracInRunner


class TracInCP(TracInCPBase):
    """Exact TracIn: learning-rate-weighted gradient inner products summed over checkpoints.

    ``score[i, j] = sum_c lr_c * <grad loss(test_i), grad loss(train_j)>`` over the
    parameters of ``layers`` (all trainable parameters by default). Per-example
    gradients are always batched: Linear and Conv1d/Conv2d layers from one forward
    and backward pass (inner products of linear layers in factored form, without
    forming per-example weight gradients), every other layer through
    ``torch.func.vmap``. Both settings of ``sample_wise_grads_per_batch`` support
    every layer type; the flag only states how ``loss_fn`` reduces.

    Args:
        model: the model to explain (restored after every call).
        train_dataset: Dataset, list of examples or DataLoader of
            ``(*model_inputs, label)`` batches.
        checkpoints: directory, list of paths, or iterator of paths/loaded objects.
        checkpoints_load_func: ``f(model, checkpoint) -> learning_rate``.
        layers: module names (dotted paths allowed) whose parameters are compared;
            ``None`` for every parameter that requires gradients.
        loss_fn: the training loss: per-example (``reduction="none"``) when
            ``sample_wise_grads_per_batch=False``, ``"sum"``/``"mean"`` when ``True``;
            ``None`` differentiates the model output summed over non-batch dimensions.
        batch_size: batch size when ``train_dataset`` is a Dataset.
        sample_wise_grads_per_batch: whether ``loss_fn`` reduces over the batch.
        distributed: (keyword-only) shard the training set over torch.distributed ranks:
            ``None`` when a process group is initialised, ``True`` always, ``False`` never.

    Memory: one training batch of per-example gradients at a time (for linear layers
    only their inputs and output gradients), the test side's gradients, and the
    ``(n_test, n_train)`` score matrix.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader | list | tuple,
        checkpoints: Any,
        checkpoints_load_func: Callable[..., Any] = load_flexible_state_dict,
        layers: list[str] | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int = 1,
        sample_wise_grads_per_batch: bool = False,
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
        sample_wise_grads_per_batch = check_flag(
            sample_wise_grads_per_batch, "sample_wise_grads_per_batch", name
        )
        self.sample_wise_grads_per_batch = sample_wise_grads_per_batch
        self.layers = layers
        self._loss = resolve_loss(loss_fn, sample_wise_grads_per_batch, name)
        self._selected = resolve_layers(model, layers, name)
        self._engine = GradientEngine(model, self._selected, self._loss, name)

    def _runner(self) -> TracInRunner:
        return TracInRunner(
            self.model, self._engine, self.checkpoints, self.checkpoints_load_func, self.get_name()
        )
