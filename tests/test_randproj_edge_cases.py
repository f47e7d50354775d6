"""TracInCPFastRandProj's embeddings and queries against a float64 reference."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from proponents import TracInCPFast, TracInCPFastRandProj


def _reference_embeddings(model, layer, checkpoints, lrs, x, y, loss_fn):
    """Per checkpoint, sqrt(lr) times the float64 gradient of each example's own loss
    with respect to the layer's weight and bias, laid out (out, in + 1); concatenated."""
    parts = []
    for path, lr in zip(checkpoints, lrs):
        ref = copy.deepcopy(model).double()
        ref.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
        ref.double()
        linear = ref.get_submodule(layer)
        rows = []
        for i in range(len(y)):
            value = loss_fn(ref(x[i : i + 1].double()), y[i : i + 1].double())
            gw, gb = torch.autograd.grad(value, [linear.weight, linear.bias])
            rows.append(torch.cat([gw, gb[:, None]], dim=1).flatten())
        parts.append(math.sqrt(lr) * torch.stack(rows))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("storage", [{}, {"memory_budget": 0}])
def test_a_float16_layer_forms_its_embeddings_in_float32(tmp_path, storage):
    """A float16 final layer whose gradient entries g_o a_i (~1e5) overflow float16 while
    sqrt(lr) times them (~10) and every score lie far inside its range. Before, the
    entries were formed in float16: the embeddings were infinite, the examples named as
    non-finite, and their scores came back inf or NaN where TracInCPFast's are finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    paths, lrs = [], [1e-9, 4e-9]
    for c, lr in enumerate(lrs):
        with torch.no_grad():
            model[0].weight.fill_(1.0 + c / 10)
            model[0].bias.fill_(-c / 4)
        paths.append(tmp_path / f"c{c}.pt")
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, paths[-1])
    model.half()
    g = torch.Generator().manual_seed(1)
    x = (200 + 100 * torch.rand(7, 3, generator=g)).half()
    y = torch.zeros(7, 2).half()
    loss_fn = nn.MSELoss(reduction="sum")
    train = _reference_embeddings(model, "0", paths, lrs, x, y, loss_fn)
    want = train[:3] @ train.T
    raw = train[:, :8] / math.sqrt(lrs[0])  # the first checkpoint's gradient entries
    assert float(raw.abs().max()) > 65504  # overflow float16
    assert float(want.abs().max()) < 65504  # while the scores fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no example is named as non-finite
        index = TracInCPFastRandProj(
            model, "0", TensorDataset(x, y), paths, loss_fn=loss_fn, batch_size=4, **storage
        )
        scores = index.influence((x[:3],), y[:3], k=None)
        top = index.influence((x[:3],), y[:3], k=2, proponents=False)
        fast = TracInCPFast(model, "0", TensorDataset(x, y), paths, loss_fn=loss_fn, batch_size=4)
        expected_fast = fast.influence((x[:3],), y[:3], k=None)
    assert torch.isfinite(index.embeddings).all()
    # float16 rounding of the model's inputs, outputs and stored embeddings: within 1%
    tolerance = 1e-2 * float(want.abs().max())
    assert float((index.embeddings.double() - train).abs().max()) <= 1e-2 * float(train.abs().max())
    assert float((scores.double() - want).abs().max()) <= tolerance
    assert float((scores.double() - expected_fast.double()).abs().max()) <= tolerance
    order = torch.sort(scores, dim=1, stable=True)
    assert torch.equal(top.indices, order.indices[:, :2])
    assert torch.equal(top.influence_scores, order.values[:, :2])


def test_seeds_that_agree_modulo_2_to_the_32_draw_the_same_projections():
    """What the README says of seeds: the projection depends on the seed modulo 2**32."""
    from proponents.projection import GradientProjection

    def matrix(seed: int) -> torch.Tensor:
        return GradientProjection.create(
            10, 65, 8, seed * 1_000_003, torch.float64, torch.device("cpu")
        ).matrices[0]

    assert torch.equal(matrix(7), matrix(7 + 2**32))
    assert torch.equal(matrix(-1), matrix(2**32 - 1))
    assert not torch.equal(matrix(7), matrix(8))
