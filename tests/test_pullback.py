"""Affine layers searched on their input side: ⟨t, A x + b⟩ = ⟨Aᵀ t, x⟩ + ⟨t, b⟩ in use.

References are float64 inner products of the layer's real outputs; the similarity
results are compared with a float64 brute force over the layer's activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from proponents.influence import _pullback, similarity
from proponents.influence._pullback import Pullback
from proponents.influence.similarity import LAYER_INPUTS, SimilarityInfluence
from proponents.store import ArrayStore, StoreRebuildWarning
from test_similarity import METRICS, _acts, _brute, _check

#: a widening layer's entry: its inputs in place of its activations (see _build_pass)
WITH_INPUTS = {"activation_shape", "norms", LAYER_INPUTS}
#: ... and with its activations, where some source block may need them
WITH_BOTH = {"activations", "norms", LAYER_INPUTS}
DIRECT_ONLY = {"activations", "norms"}

LAYERS = [
    # (module, per-example input shape)
    (nn.Linear(5, 12), (5,)),
    (nn.Linear(4, 11, bias=False), (3, 4)),  # a sequence dimension
    (nn.Conv1d(2, 6, 3, padding=1), (2, 9)),
    (nn.Conv2d(2, 6, 3, padding=1), (2, 6, 6)),
    (nn.Conv2d(2, 12, 3, stride=2, padding=1), (2, 7, 7)),  # odd input: output padding 0
    (nn.Conv2d(2, 16, 3, stride=2, padding=1), (2, 8, 8)),  # even input: output padding 1
    (nn.Conv2d(2, 8, 3, padding=2, dilation=2), (2, 6, 6)),
    (nn.Conv2d(4, 8, 3, padding="same", groups=2), (4, 5, 5)),
    (nn.Conv2d(3, 9, (3, 1), padding="valid", bias=False), (3, 6, 4)),
    (nn.Conv3d(2, 7, 3, padding=1), (2, 4, 4, 4)),
]


@pytest.mark.parametrize("layer,shape", LAYERS, ids=lambda v: str(v))
def test_pulled_back_rows_reproduce_the_inner_products(layer, shape):
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(7, *shape, dtype=torch.float64)  # source inputs
    with torch.no_grad():
        s = layer(x)
    t = torch.randn(5, *s.shape[1:], dtype=torch.float64)  # any test rows of that shape
    pullback = Pullback.for_layer(layer, shape, tuple(s.shape[1:]))
    assert pullback is not None
    rows, offsets = pullback.pull(t, torch.float64)
    assert rows.shape == (5, int(np.prod(shape))) and offsets.shape == (5,)
    direct = t.reshape(5, -1) @ s.reshape(7, -1).T
    torch.testing.assert_close(rows @ x.reshape(7, -1).T + offsets[:, None], direct)
    assert pullback.agrees(x, s)


@pytest.mark.parametrize("layer,shape", LAYERS, ids=lambda v: str(v))
def test_the_gain_estimate_approaches_the_operator_norm_from_below(layer, shape):
    """Against the spectral norm of the layer's linear part, materialised as a matrix."""
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        out_shape = tuple(layer(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    pullback = Pullback.for_layer(layer, shape, out_shape)
    assert pullback is not None
    width = int(np.prod(shape))
    basis = torch.eye(width, dtype=torch.float64).reshape(width, *shape)
    with torch.no_grad():
        matrix = pullback.apply(basis, torch.float64).reshape(width, -1)
        zero = layer(torch.zeros(1, *shape, dtype=torch.float64)).reshape(1, -1)
        # apply is the layer without its bias
        torch.testing.assert_close(matrix + zero, layer(basis).reshape(width, -1))
    true = float(torch.linalg.matrix_norm(matrix, ord=2))
    rng = torch.get_rng_state()
    estimate = pullback.gain_estimate()
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is untouched
    assert estimate <= true * (1 + 1e-9)
    assert estimate >= 0.9 * true


def test_layers_without_a_useful_pullback():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert Pullback.for_layer(nn.Linear(8, 10), (8,), (10,)) is None  # saves too little
    assert Pullback.for_layer(MyLinear(2, 10), (2,), (10,)) is None  # forward may differ
    assert Pullback.for_layer(nn.ReLU(), (4,), (4,)) is None
    reflect = nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect")
    assert Pullback.for_layer(reflect, (1, 5, 5), (8, 5, 5)) is None
    even_same = nn.Conv2d(1, 8, 2, padding="same")  # PyTorch pads it asymmetrically
    assert Pullback.for_layer(even_same, (1, 5, 5), (8, 5, 5)) is None
    hooked = nn.Linear(2, 10)
    hooked.register_forward_hook(lambda m, i, o: o * 3)
    assert Pullback.for_layer(hooked, (2,), (10,)) is None
    assert Pullback.for_layer(nn.Linear(2, 10), (2,), (10,)) is not None


def test_width_rule():
    assert 0 < _pullback.MAX_WIDTH_FRACTION < 1
    # 16 channels in, 32 out at one resolution: half the width, so searched on the input side
    assert Pullback.for_layer(nn.Conv2d(16, 32, 3, padding=1), (16, 8, 8), (32, 8, 8))
    # 3 in, 4 out: three quarters, not enough
    assert Pullback.for_layer(nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8), (4, 8, 8)) is None


def test_agrees_rejects_a_layer_that_is_not_what_its_weights_say():
    torch.manual_seed(0)
    layer = nn.Linear(3, 9).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    t = layer(x).detach()
    pullback = Pullback.for_layer(layer, (3,), (9,))
    assert pullback.agrees(x, t)
    t[2, 1] += 1e-2  # an output the weights do not produce from this input
    assert not pullback.agrees(x, t)


class Widening(nn.Module):
    """A convolution and a linear layer that widen their inputs, and a narrowing head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.up = nn.Linear(6 * 4 * 4, 200)
        self.head = nn.Linear(200, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = nn.functional.max_pool2d(h, 2).flatten(1)
        return self.head(torch.tanh(self.up(h)))


def _widening_data(n=41, n_test=5, size=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n + n_test, 2, size, size, generator=g)
    y = torch.randint(0, 3, (n + n_test,), generator=g)
    return TensorDataset(x[:n], y[:n]), x[n:]


def _spy_on_input_side_updates(monkeypatch) -> list[str]:
    """Layers whose blocks are scored on the input side, appended as it happens."""
    import proponents.influence._similarity_metrics as metrics

    seen: list[str] = []
    update = metrics.BlockScorer.update

    def spy(self, block, start, norms=None, norms_clean=False, pulled=None, input_ratio=None):
        if pulled is not None:
            seen.append(self.layer)
        return update(self, block, start, norms, norms_clean, pulled, input_ratio)

    monkeypatch.setattr(metrics.BlockScorer, "update", spy)
    return seen


def _stored_arrays(folder, layer):
    """Names of the arrays in the stored source entry of ``layer``."""
    manifest, _ = ArrayStore(folder / "src")._read_manifest(layer)
    return set(manifest["arrays"]) if manifest else set()


def _expected(model, layer, test, src_inputs, metric="cosine", direction="max", k=5):
    return _brute(_acts(model, layer, test), _acts(model, layer, src_inputs), metric, direction, k)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("direction", ["max", "min"])
def test_first_and_repeated_calls_on_the_input_side_match_brute_force(
    tmp_path, monkeypatch, metric, direction
):
    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()
    layers = ["conv", "up", "head"]
    sim = SimilarityInfluence(
        model,
        layers,
        train,
        tmp_path,
        similarity_metric=METRICS[metric],
        similarity_direction=direction,
        batch_size=6,  # does not divide 41
    )
    seen = _spy_on_input_side_updates(monkeypatch)
    first = sim.influence(test, top_k=7)
    # Euclidean distance is searched directly: its rounding bound is tight only there
    widening = {"conv", "up"} if metric == "cosine" else set()
    for layer in ("conv", "up"):
        assert _stored_arrays(tmp_path, layer) == (WITH_INPUTS if widening else DIRECT_ONLY)
    assert _stored_arrays(tmp_path, "head") == DIRECT_ONLY  # narrows: no inputs kept
    assert set(seen) == widening
    seen.clear()
    again = sim.influence(test, top_k=7)
    assert set(seen) == widening
    for layer in layers:
        expected = _expected(model, layer, test, train.tensors[0], metric, direction, 7)
        _check(first[layer], expected)
        _check(again[layer], expected)


def test_kept_inputs_are_the_layer_inputs(tmp_path):
    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()
    SimilarityInfluence(model, "up", train, tmp_path, batch_size=10).influence(test)
    manifest, _ = ArrayStore(tmp_path / "src")._read_manifest("up")
    kept = np.load(tmp_path / "src" / manifest["arrays"][LAYER_INPUTS]["file"])
    seen = {}
    handle = model.up.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        model(train.tensors[0])
    handle.remove()
    np.testing.assert_allclose(kept, seen["x"].numpy(), rtol=1e-6, atol=1e-7)


def test_test_inputs_of_another_size_still_use_the_input_side(tmp_path, monkeypatch):
    """Source inputs 8x8, test inputs 7x7, same output shape through a stride of 2: the
    identity only needs the test activations, so it still holds."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(2, 16, 3, stride=2, padding=1))
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(13, 2, 8, 8, generator=g), torch.zeros(13))
    test = torch.randn(4, 2, 7, 7, generator=g)
    sim = SimilarityInfluence(model, "conv", train, tmp_path, batch_size=5)
    seen = _spy_on_input_side_updates(monkeypatch)
    first = sim.influence(test, top_k=6)["conv"]
    again = sim.influence(test, top_k=6)["conv"]
    assert _stored_arrays(tmp_path, "conv") == WITH_INPUTS
    assert seen == ["conv", "conv"]  # its one block, in each of the two calls
    expected = _expected(model, "conv", test, train.tensors[0], k=6)
    _check(first, expected)
    _check(again, expected)


@pytest.mark.parametrize("blocks", ["one", "of one batch"])
def test_a_change_of_input_shape_drops_the_kept_inputs(tmp_path, monkeypatch, blocks):
    """Stride 2: inputs of 7x7 and 8x8 both give 4x4 outputs; one input array cannot hold
    both. In blocks of one batch, the first block was written without its activations
    when the second batch drops the inputs: the pass starts again, keeping them."""
    torch.manual_seed(0)
    if blocks != "one":  # a row: 16 * 4 * 4 float32 outputs and at most 2/3 of that
        monkeypatch.setattr(similarity, "BLOCK_BYTES", 4 * (1024 + 683))
    passes = _count_build_passes(monkeypatch)

    class MixedSizes(torch.utils.data.Dataset):
        """Items 4-7 are 7x7, the others 8x8: batches of 4 are uniform."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            sizes = [7 if 4 <= i < 8 else 8 for i in range(11)]
            self.items = [torch.randn(2, n, n, generator=g) for n in sizes]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i], 0

    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(2, 16, 3, stride=2, padding=1))
    data = MixedSizes()
    sim = SimilarityInfluence(model, "conv", DataLoader(data, batch_size=4), tmp_path)
    test = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    first = sim.influence(test, top_k=4)["conv"]
    assert _stored_arrays(tmp_path, "conv") == DIRECT_ONLY
    assert passes == ([set()] if blocks == "one" else [set(), {"conv"}])
    again = sim.influence(test, top_k=4)["conv"]
    src = torch.cat([_acts(model, "conv", x[None]) for x in data.items])
    expected = _brute(_acts(model, "conv", test), src, "cosine", "max", 4)
    _check(first, expected)
    _check(again, expected)
    # the same layer over inputs of one size does keep them
    uniform = TensorDataset(torch.randn(6, 2, 8, 8), torch.zeros(6))
    SimilarityInfluence(model, "conv", uniform, tmp_path / "uniform").influence(test)
    assert _stored_arrays(tmp_path / "uniform", "conv") == WITH_INPUTS


def test_a_layer_that_fails_the_check_is_searched_directly(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()
    pull = Pullback.pull

    def wrong(self, t, dtype):
        rows, offsets = pull(self, t, dtype)
        return rows * 1.01, offsets

    monkeypatch.setattr(Pullback, "pull", wrong)
    sim = SimilarityInfluence(model, ["conv", "up"], train, tmp_path, batch_size=8)
    sim.influence(test, top_k=3)
    assert _stored_arrays(tmp_path, "conv") == DIRECT_ONLY
    assert _stored_arrays(tmp_path, "up") == DIRECT_ONLY
    monkeypatch.setattr(Pullback, "pull", pull)
    again = sim.influence(test, top_k=3)
    for layer in ("conv", "up"):
        _check(again[layer], _expected(model, layer, test, train.tensors[0], k=3))


def test_saved_test_activations_use_the_input_side_too(tmp_path, monkeypatch):
    """Activations loaded with load_input_from_disk need no test inputs."""
    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()
    sim = SimilarityInfluence(model, "conv", train, tmp_path, batch_size=8)
    first = sim.influence(test, top_k=5, inputs_id="probe")["conv"]
    seen = _spy_on_input_side_updates(monkeypatch)
    again = sim.influence(None, top_k=5, load_input_from_disk=True, inputs_id="probe")["conv"]
    assert "conv" in seen
    expected = _expected(model, "conv", test, train.tensors[0])
    _check(first, expected)
    _check(again, expected)


def test_a_custom_metric_keeps_no_inputs(tmp_path):
    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()

    def dot(a, b):
        return a.flatten(1) @ b.flatten(1).T

    SimilarityInfluence(model, "conv", train, tmp_path, similarity_metric=dot).influence(test)
    assert _stored_arrays(tmp_path, "conv") == DIRECT_ONLY


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_other_model_dtypes_on_the_input_side(tmp_path, monkeypatch, dtype, metric):
    """float64 goes through the input side in float64. bfloat16 outputs are rounded, so
    they are not exactly A x + b: the check refuses, and the layers are searched directly."""
    torch.manual_seed(0)
    model = Widening().eval().to(dtype)
    train, test = _widening_data()
    train = TensorDataset(train.tensors[0].to(dtype), train.tensors[1])
    test = test.to(dtype)
    sim = SimilarityInfluence(
        model, ["conv", "up"], train, tmp_path, similarity_metric=METRICS[metric], batch_size=8
    )
    seen = _spy_on_input_side_updates(monkeypatch)
    for _ in range(2):  # built, then read back from the store
        result = sim.influence(test, top_k=4)
        for layer in ("conv", "up"):
            expected = _expected(model, layer, test, train.tensors[0], metric, "max", 4)
            idx, val = result[layer]
            assert val.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            _check((idx, val), expected, rtol=1e-5 if dtype == torch.float64 else 1e-2)
    if dtype == torch.float64 and metric == "cosine":
        assert set(seen) == {"conv", "up"}
        manifest, _ = ArrayStore(tmp_path / "src")._read_manifest("conv")
        assert manifest["arrays"][LAYER_INPUTS]["dtype"] == "<f8"
    else:
        assert seen == []
        assert _stored_arrays(tmp_path, "conv") == DIRECT_ONLY


@pytest.mark.parametrize("direction", ["min", "max"])
def test_euclidean_neighbours_of_near_duplicates_of_a_widening_layer_are_exact(
    tmp_path, monkeypatch, direction
):
    """Outputs a hair apart around a large bias, from a layer cosine similarity would search
    on its input side: Euclidean distance searches it directly, and exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64))
    with torch.no_grad():
        model[0].bias.mul_(0).add_(300 * torch.randn(64))
    g = torch.Generator().manual_seed(2)
    centre = torch.randn(8, generator=g)
    spread = 10.0 ** torch.empty(124, 1).uniform_(-3, -1, generator=g)
    x = centre + spread * torch.randn(124, 8, generator=g)
    train, test = TensorDataset(x[:120], torch.zeros(120)), x[120:]
    sim = SimilarityInfluence(
        model,
        "0",
        train,
        tmp_path,
        similarity_metric=METRICS["euclidean"],
        similarity_direction=direction,
        batch_size=50,
    )
    seen = _spy_on_input_side_updates(monkeypatch)
    expected = _expected(model, "0", test, x[:120], "euclidean", direction, 5)
    for _ in range(2):  # scored while stored, then from the store
        _check(sim.influence(test, top_k=5)["0"], expected)
    assert seen == []
    assert _stored_arrays(tmp_path, "0") == DIRECT_ONLY


def test_cosine_and_euclidean_share_one_store(tmp_path, monkeypatch):
    """A store built for Euclidean distance (activations only) serves cosine directly,
    without a rebuild. One built for cosine keeps a widening layer's inputs instead of its
    activations, so Euclidean distance rebuilds it, saying why; cosine then uses that."""
    import warnings as _warnings

    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()
    x = train.tensors[0]

    def search(folder, metric):
        direction = "max" if metric == "cosine" else "min"
        sim = SimilarityInfluence(
            model,
            "up",
            train,
            folder,
            similarity_metric=METRICS[metric],
            similarity_direction=direction,
        )
        result = sim.influence(test, top_k=6)["up"]
        _check(result, _expected(model, "up", test, x, metric, direction, 6))

    search(tmp_path / "euclidean", "euclidean")
    seen = _spy_on_input_side_updates(monkeypatch)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")  # a StoreRebuildWarning would fail here
        search(tmp_path / "euclidean", "cosine")
    assert seen == []
    monkeypatch.undo()

    search(tmp_path / "cosine", "cosine")
    assert _stored_arrays(tmp_path / "cosine", "up") == WITH_INPUTS
    with pytest.warns(StoreRebuildWarning, match="keeps the layer's inputs instead of its"):
        search(tmp_path / "cosine", "euclidean")
    assert _stored_arrays(tmp_path / "cosine", "up") == DIRECT_ONLY
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        search(tmp_path / "cosine", "cosine")


def _cancelling_linear() -> nn.Linear:
    """A Linear whose rows sum to zero: lin(x + c) == lin(x) for a constant offset c."""
    torch.manual_seed(9)
    lin = nn.Linear(8, 64)
    with torch.no_grad():
        lin.weight -= lin.weight.mean(1, keepdim=True)
    return lin


def _cosine_reference(lin, x, test, k):
    with torch.no_grad():
        acts_s, acts_t = lin(x).double(), lin(test).double()
    reference = (acts_t / acts_t.norm(dim=1, keepdim=True)) @ (
        acts_s / acts_s.norm(dim=1, keepdim=True)
    ).T
    order = torch.sort(reference, dim=1, descending=True, stable=True)
    return order.indices[:, :k], order.values[:, :k]


def _count_build_passes(monkeypatch):
    passes = []
    build_pass = SimilarityInfluence._build_pass

    def counting(self, *args, **kwargs):
        passes.append(set(args[-1]))  # the layers whose activations are kept
        return build_pass(self, *args, **kwargs)

    monkeypatch.setattr(SimilarityInfluence, "_build_pass", counting)
    return passes


def test_a_later_block_the_layer_cancels_starts_the_build_again_with_activations(
    tmp_path, monkeypatch
):
    """The first block decides to leave the activations out; a later block whose inputs
    the layer cancels would need them, so the pass starts again, keeping them."""
    lin = _cancelling_linear()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    x[100:] += 1e5  # blocks 3 and 4 only
    test = torch.cat([x[150:151] - 1e5, torch.randn(1, 8, generator=g)])
    # a layer input's row is 32 bytes, its output's 256: blocks of 50 rows
    monkeypatch.setattr(similarity, "BLOCK_BYTES", 50 * (256 + 171))
    passes = _count_build_passes(monkeypatch)
    sim = SimilarityInfluence(nn.Sequential(lin), "0", TensorDataset(x), tmp_path, batch_size=50)
    ref_idx, ref_val = _cosine_reference(lin, x, test, 3)
    for _ in range(2):
        idx, val = sim.influence(test, top_k=3)["0"]
        assert idx.tolist() == ref_idx.tolist()
        torch.testing.assert_close(val.double(), ref_val, rtol=0, atol=1e-6)
    assert passes == [set(), {"0"}]
    assert _stored_arrays(tmp_path, "0") == WITH_BOTH


def test_a_query_the_gain_estimate_did_not_cover_stores_the_activations(tmp_path, monkeypatch):
    """Should the estimate of ‖A‖₂ fall short, a query whose rows would round too coarsely
    on the input side of an entry without activations rebuilds it with them (a warning
    says so) and is answered as the direct product would be."""
    lin = _cancelling_linear()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    x[8:] += 1e5
    test = x[100:101] - 1e5
    x[5] = test[0] + 0.05 * torch.randn(8, generator=g)
    model = nn.Sequential(lin)
    ref_idx, ref_val = _cosine_reference(lin, x, test, 3)
    with monkeypatch.context() as patch:
        patch.setattr(Pullback, "gain_estimate", lambda self, iterations=30: 0.0)
        # batches of 50, as the reference's (the offset rows' float32 outputs round
        # differently in other batch sizes)
        SimilarityInfluence(model, "0", TensorDataset(x), tmp_path, batch_size=50).influence(
            test, top_k=3
        )
    assert _stored_arrays(tmp_path, "0") == WITH_INPUTS
    passes = _count_build_passes(monkeypatch)
    sim = SimilarityInfluence(model, "0", TensorDataset(x), tmp_path, batch_size=50)
    with pytest.warns(StoreRebuildWarning, match="round too coarsely on the input side"):
        idx, val = sim.influence(test, top_k=3)["0"]
    assert passes == [{"0"}]
    assert _stored_arrays(tmp_path, "0") == WITH_BOTH
    for _ in range(2):
        assert idx.tolist() == ref_idx.tolist()
        torch.testing.assert_close(val.double(), ref_val, rtol=0, atol=1e-6)
        idx, val = sim.influence(test, top_k=3)["0"]
    assert passes == [{"0"}]


def test_an_entry_of_layer_inputs_without_the_activation_shape_is_damaged(tmp_path):
    torch.manual_seed(0)
    model = Widening().eval()
    train, test = _widening_data()
    SimilarityInfluence(model, "up", train, tmp_path).influence(test)
    store = ArrayStore(tmp_path / "src")
    manifest, _ = store._read_manifest("up")
    assert manifest is not None
    entry, _ = store.load("up", manifest["meta"])
    assert entry is not None
    with entry:
        kept = {name: entry.read(name) for name in ("norms", LAYER_INPUTS)}
    with store.writer("up", manifest["meta"]) as writer:
        for name, array in kept.items():
            writer.put(name, array)
        writer.commit()
    with pytest.warns(StoreRebuildWarning, match="lacks the array 'activations'"):
        result = SimilarityInfluence(model, "up", train, tmp_path).influence(test, top_k=4)
    _check(result["up"], _expected(model, "up", test, train.tensors[0], k=4))
    assert _stored_arrays(tmp_path, "up") == WITH_INPUTS


def test_inputs_the_layer_cancels_are_scored_directly(tmp_path):
    """A Linear whose rows sum to zero cancels an offset added to all but a few inputs:
    their input-side products carry rounding of the offset's size (neighbours came out
    in the wrong order). Such blocks are scored on the activations; the neighbours and
    cosines equal a float64 brute force, built and from the store, and the inputs are
    still stored (blocks without the offset keep the input side)."""
    torch.manual_seed(9)
    lin = nn.Linear(8, 64)
    with torch.no_grad():
        lin.weight -= lin.weight.mean(1, keepdim=True)  # lin(x + c) == lin(x)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    x[8:] += 1e5
    test = x[100:101] - 1e5  # source 100 is its exact match
    x[5] = test[0] + 0.05 * torch.randn(8, generator=g)  # a near match without offset
    model = nn.Sequential(lin)
    sim = SimilarityInfluence(model, "0", TensorDataset(x), tmp_path, batch_size=50)
    with torch.no_grad():
        acts_s, acts_t = lin(x).double(), lin(test).double()
    reference = (acts_t / acts_t.norm()) @ (acts_s / acts_s.norm(dim=1, keepdim=True)).T
    order = torch.sort(reference, dim=1, descending=True, stable=True)
    for _ in range(2):
        idx, val = sim.influence(test, top_k=3)["0"]
        assert idx.tolist() == order.indices[:, :3].tolist()
        torch.testing.assert_close(val.double(), order.values[:, :3], rtol=0, atol=1e-6)
    # the activations are kept too: a query may need them for the offset rows
    assert _stored_arrays(tmp_path, "0") == WITH_BOTH
