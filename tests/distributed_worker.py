"""Run by tests/test_distributed.py under torchrun: sharded results vs one process.

Every rank computes each method and mode twice, once alone (``distributed=False``) and
once sharded over the process group, and checks that the two agree. Problems are printed
as ``MISMATCH ...`` lines; the rank exits with status 1 when there is any.

Usage: ``torchrun --nproc_per_node=2 tests/distributed_worker.py DATA_DIR [SCENARIO]``

``SCENARIO`` is ``equal`` (default: every method and mode), or one of the smaller checks
of :data:`SCENARIOS` (a failure at query time, a training DataLoader whose items are whole
batches, non-finite warnings). ``DIST_TIMEOUT_S`` bounds every collective (the process
group's ``timeout``), so a rank left waiting fails instead of hanging.

``DIST_BACKEND`` (default ``gloo``) picks the process group's backend and ``DIST_DEVICE``
(default ``cpu``) where the model and data live; with ``cuda`` each rank uses the GPU
numbered by its ``LOCAL_RANK`` (modulo the GPUs there are, so gloo ranks may share one),
and every result must come back on that device.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from proponents import SimilarityInfluence, TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.checkpoints import load_flexible_state_dict
from proponents.influence.similarity import cosine_similarity, euclidean_distance

FAILURES: list[str] = []
DEVICE = torch.device("cpu")


def _query_modes(n: int) -> list[tuple[str, dict]]:
    """The influence() modes compared between a sharded and a single-process object."""
    return [
        ("scores", {"k": None}),
        ("proponents", {"k": 5}),
        ("opponents", {"k": 5, "proponents": False}),
        ("k=n", {"k": n}),
    ]


def check(what: str, alone, sharded) -> None:
    for t in sharded if isinstance(sharded, tuple) else (sharded,):
        if t.device.type != DEVICE.type:
            FAILURES.append(f"{what}: result on {t.device}, the model is on {DEVICE}")
    if isinstance(alone, tuple):
        same_idx = torch.equal(alone[0], sharded[0])
        close = torch.allclose(alone[1], sharded[1], rtol=1e-5, atol=1e-6, equal_nan=True)
        if not (same_idx and close):
            FAILURES.append(f"{what}: indices {alone[0].tolist()} vs {sharded[0].tolist()}")
        return
    if alone.shape != sharded.shape or not torch.allclose(
        alone, sharded, rtol=1e-5, atol=1e-6, equal_nan=True
    ):
        FAILURES.append(f"{what}: {alone.shape} vs {sharded.shape}")


def expect_error(what: str, call, needle: str) -> None:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - any error type is reported below
        if needle not in str(err):
            FAILURES.append(f"{what}: message {err!r} lacks {needle!r}")
        return
    FAILURES.append(f"{what}: no error")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def prepare(folder: Path) -> None:
    """Write the data and three checkpoints that every rank reads."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(17, 6, generator=g), torch.randint(0, 3, (17,), generator=g)
    x[9], y[9] = x[2], y[2]  # equal scores in both shards: ties must keep dataset order
    xt, yt = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    torch.save({"x": x, "y": y, "xt": xt, "yt": yt}, folder / "data.pt")
    torch.manual_seed(0)
    model = MLP()
    for c, lr in enumerate([0.5, 1.5, 0.25]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        torch.save(
            {"model_state_dict": model.state_dict(), "learning_rate": lr}, folder / f"ckpt-{c}.pt"
        )


def main(folder: Path, scenario: str = "equal") -> int:
    global DEVICE
    if os.environ.get("DIST_DEVICE", "cpu") == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        DEVICE = torch.device("cuda", torch.cuda.current_device())
    timeout = timedelta(seconds=float(os.environ.get("DIST_TIMEOUT_S", 1800)))
    dist.init_process_group(os.environ.get("DIST_BACKEND", "gloo"), timeout=timeout)
    if scenario != "equal":
        SCENARIOS[scenario](folder, dist.get_rank())
        return finish(dist.get_rank())
    rank = dist.get_rank()
    data = {k: v.to(DEVICE) for k, v in torch.load(folder / "data.pt").items()}
    ckpts = sorted(str(p) for p in folder.glob("ckpt-*.pt"))
    torch.manual_seed(0)  # the same weights on every rank (SimilarityInfluence uses them)
    model = MLP().to(DEVICE)
    train = TensorDataset(data["x"], data["y"])
    x, y = data["xt"], data["yt"]
    test_loader = DataLoader(TensorDataset(x, y), batch_size=3)
    loss = nn.CrossEntropyLoss(reduction="sum")

    def tracin(batch_size: int, **kw):
        return TracInCP(
            model,
            train,
            ckpts,
            loss_fn=loss,
            batch_size=batch_size,
            sample_wise_grads_per_batch=True,
            **kw,
        )

    def fast(batch_size: int, **kw):
        return TracInCPFast(model, "fc2", train, ckpts, loss_fn=loss, batch_size=batch_size, **kw)

    # batch_size 3: 6 batches split 3/3; 17: one batch, so rank 0 has an empty shard.
    for batch_size in (3, 17):
        for label, build in (("TracInCP", tracin), ("TracInCPFast", fast)):
            alone, sharded = build(batch_size, distributed=False), build(batch_size)
            assert sharded._dist is not None
            tag = f"{label}[batch_size={batch_size}]"
            for mode, kwargs in (
                ("scores", {}),
                ("aggregate", {"aggregate": True}),
                ("proponents", {"k": 5}),
                ("opponents", {"k": 5, "proponents": False}),
                ("k=n", {"k": len(train)}),
            ):
                check(
                    f"{tag} {mode}",
                    alone.influence((x,), y, **kwargs),
                    sharded.influence((x,), y, **kwargs),
                )
            check(
                f"{tag} test loader",
                alone.influence(test_loader, k=4),
                sharded.influence(test_loader, k=4),
            )
            check(f"{tag} self-influence", alone.self_influence(), sharded.self_influence())
            check(f"{tag} influence()", alone.influence(), sharded.influence())
            check(
                f"{tag} self-influence of a loader",
                alone.self_influence(test_loader),
                sharded.self_influence(test_loader),
            )
            check(
                f"{tag} self-influence of a batch",
                alone.self_influence((x, y)),
                sharded.self_influence((x, y)),
            )

    for projection_dim in (None, 4):
        for batch_size in (3, 17):
            kw = dict(loss_fn=loss, batch_size=batch_size, projection_dim=projection_dim)
            alone = TracInCPFastRandProj(model, "fc2", train, ckpts, distributed=False, **kw)
            sharded = TracInCPFastRandProj(model, "fc2", train, ckpts, **kw)
            tag = f"TracInCPFastRandProj[dim={projection_dim}, batch_size={batch_size}]"
            for mode, kwargs in _query_modes(len(train)):
                check(
                    f"{tag} {mode}",
                    alone.influence((x,), y, **kwargs),
                    sharded.influence((x,), y, **kwargs),
                )
            check(
                f"{tag} test loader",
                alone.influence(test_loader, k=3),
                sharded.influence(test_loader, k=3),
            )
            path = folder / f"index-{projection_dim}-{batch_size}"
            sharded.save(path)
            loaded = TracInCPFastRandProj.load(
                path, model, ckpts, loss, train_dataset=train, batch_size=batch_size
            )
            check(
                f"{tag} saved and loaded",
                alone.influence((x,), y, k=5),
                loaded.influence((x,), y, k=5),
            )

    for batch_size in (4, 17):
        for direction in ("max", "min"):
            kw = dict(similarity_direction=direction, batch_size=batch_size)
            alone = SimilarityInfluence(
                model, ["fc1", "fc2"], train, folder / "act-alone", distributed=False, **kw
            )
            sharded = SimilarityInfluence(model, ["fc1", "fc2"], train, folder / "act", **kw)
            a, b = alone.influence(x, top_k=6), sharded.influence(x, top_k=6)
            for layer in ("fc1", "fc2"):
                check(f"SimilarityInfluence[{direction}, {batch_size}] {layer}", a[layer], b[layer])
            again = sharded.influence(x, top_k=len(train))  # from the stored shards
            check(
                f"SimilarityInfluence[{direction}, {batch_size}] stored, all",
                alone.influence(x, top_k=len(train))["fc2"],
                again["fc2"],
            )

    for direction in ("max", "min"):
        # NaN scores in both shards after the worst infinity, also in both: the merge
        # must rank them as the single process does (NaN after everything)
        worst = float("-inf") if direction == "max" else float("inf")

        def nan_and_worst(test, src, worst=worst):
            v = src[:, 0]
            out = torch.where(v > 0.5, torch.full_like(v, worst), v)
            out = torch.where(v < -0.5, torch.full_like(v, float("nan")), out)
            return out.expand(len(test), -1)

        kw = dict(similarity_direction=direction, batch_size=4, similarity_metric=nan_and_worst)
        alone = SimilarityInfluence(model, "fc1", train, folder / "nan-alone", distributed=False,
                                    **kw)  # fmt: skip
        sharded = SimilarityInfluence(model, "fc1", train, folder / "nan", **kw)
        check(
            f"SimilarityInfluence[{direction}] NaN after the worst infinity",
            alone.influence(x, top_k=len(train))["fc1"],
            sharded.influence(x, top_k=len(train))["fc1"],
        )

    if dist.get_world_size() == 1:  # the fault checks below need a second rank
        return finish(rank)
    # Ranks that disagree on the training data: the same clear error on every rank.
    n = len(train) - (1 if rank == 1 else 0)
    short = TensorDataset(data["x"][:n], data["y"][:n])
    expect_error(
        "dataset length",
        lambda: TracInCP(
            model, short, ckpts, loss_fn=loss, batch_size=3, sample_wise_grads_per_batch=True
        ),
        "dataset length differs",
    )

    # A training set that cannot be split into ranges is named as the training set.
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(data["x"], data["y"]))

    stream = DataLoader(Stream(), batch_size=3)
    expect_error(
        "IterableDataset training set",
        lambda: TracInCP(model, stream, ckpts, loss_fn=loss, sample_wise_grads_per_batch=True),
        "train_dataset is a DataLoader over an IterableDataset",
    )
    kw = dict(loss_fn=loss, batch_size=3, sample_wise_grads_per_batch=True, distributed=False)
    check(
        "IterableDataset, not sharded",
        TracInCP(model, train, ckpts, **kw).self_influence(),
        TracInCP(model, stream, ckpts, **kw).self_influence(),
    )

    # A rank failing mid-way: the others name it instead of waiting.
    def flaky(m, ckpt):
        if rank == 1 and ckpt == ckpts[-1]:
            raise OSError("disk went away")
        return load_flexible_state_dict(m, ckpt)

    broken = TracInCP(
        model, train, ckpts, flaky, loss_fn=loss, batch_size=3, sample_wise_grads_per_batch=True
    )
    needle = "disk went away" if rank == 1 else "rank 1 failed with CheckpointLoadError"
    expect_error("failing rank", lambda: broken.influence((x,), y, k=2), needle)
    expect_error("failing rank, scores", lambda: broken.influence((x,), y), needle)
    return finish(rank)


def _loaded(folder: Path):
    data = {k: v.to(DEVICE) for k, v in torch.load(folder / "data.pt").items()}
    ckpts = sorted(str(p) for p in folder.glob("ckpt-*.pt"))
    torch.manual_seed(0)
    return data, ckpts, MLP().to(DEVICE), nn.CrossEntropyLoss(reduction="sum")


def query_failure(folder: Path, rank: int) -> None:
    """A checkpoint or forward pass failing on rank 1 at query time, after construction
    succeeded everywhere: rank 1 raises its error, rank 0 names it (no hang)."""
    data, ckpts, model, loss = _loaded(folder)
    train = TensorDataset(data["x"], data["y"])
    x, y = data["xt"], data["yt"]
    armed = False

    def flaky(m, ckpt):
        if armed and rank == 1 and ckpt == ckpts[-1]:
            raise OSError("disk went away")
        return load_flexible_state_dict(m, ckpt)

    rand = TracInCPFastRandProj(model, "fc2", train, ckpts, flaky, loss_fn=loss, batch_size=3)
    fast = TracInCPFast(model, "fc2", train, ckpts, flaky, loss_fn=loss, batch_size=3)

    class Flaky(MLP):
        def forward(self, x):
            if armed and rank == 1:
                raise RuntimeError("forward failed on rank 1")
            return super().forward(x)

    torch.manual_seed(0)
    similar = SimilarityInfluence(Flaky().to(DEVICE), "fc1", train, folder / "act", batch_size=3)
    armed = True
    for label, obj in (("TracInCPFastRandProj", rand), ("TracInCPFast", fast)):
        needle = "disk went away" if rank == 1 else "rank 1 failed with CheckpointLoadError"
        expect_error(f"{label} query failure, k=2", lambda o=obj: o.influence((x,), y, k=2), needle)
        expect_error(f"{label} query failure, scores", lambda o=obj: o.influence((x,), y, k=None),
                     needle)  # fmt: skip
    needle = "forward failed on rank 1" if rank == 1 else "rank 1 failed with RuntimeError"
    expect_error("SimilarityInfluence query failure", lambda: similar.influence(x, top_k=2), needle)
    armed = False  # the objects work again afterwards, on every rank
    check("TracInCPFastRandProj after a failure", fast.influence((x,), y),
          rand.influence((x,), y, k=None))  # fmt: skip


def whole_batches(folder: Path, rank: int) -> None:
    """A training DataLoader(batch_size=None) whose items are batches of 3, 1, 5, 4, 4
    examples: built, saved and loaded sharded, TracInCPFastRandProj equals one process."""
    data, ckpts, model, loss = _loaded(folder)
    x, y = data["x"], data["y"]
    xt, yt = data["xt"], data["yt"]

    class Batches(torch.utils.data.Dataset):
        cuts = [0, 3, 4, 9, 13, 17]

        def __len__(self) -> int:
            return len(self.cuts) - 1

        def __getitem__(self, i):
            return x[self.cuts[i] : self.cuts[i + 1]], y[self.cuts[i] : self.cuts[i + 1]]

    train = DataLoader(Batches(), batch_size=None)
    kw = dict(loss_fn=loss, projection_dim=4)
    alone = TracInCPFastRandProj(model, "fc2", train, ckpts, distributed=False, **kw)
    sharded = TracInCPFastRandProj(model, "fc2", train, ckpts, **kw)
    assert sharded._dist is not None
    path = folder / "index-whole-batches"
    sharded.save(path)
    loaded = TracInCPFastRandProj.load(path, model, ckpts, loss, train_dataset=train)
    for label, obj in (("built", sharded), ("loaded", loaded)):
        for mode, kwargs in _query_modes(len(x)):
            check(
                f"whole batches, {label}, {mode}",
                alone.influence((xt,), yt, **kwargs),
                obj.influence((xt,), yt, **kwargs),
            )
    fast = TracInCPFast(model, "fc2", train, ckpts, loss_fn=loss)
    expect_error("whole batches, TracInCPFast k > n", lambda: fast.influence((xt,), yt, k=18),
                 "k=18 exceeds the 17 training examples")  # fmt: skip
    expect_error(
        "whole batches, SimilarityInfluence",
        lambda: SimilarityInfluence(model, "fc1", train, folder / "act-whole"),
        "batch_size=None",
    )


def _named(call) -> list[str]:
    """The example lists named by the non-finite warnings of ``call()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [
        repr(re.findall(r"(training|test) examples (\[[^]]*\])", str(w.message)))
        for w in caught
        if "non-finite" in str(w.message)
    ]


def _messages(call) -> list[str]:
    """The SimilarityInfluence warnings of ``call()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "SimilarityInfluence" in str(w.message)]


def nonfinite(folder: Path, rank: int) -> None:
    """A NaN training example in rank 1's shard and a NaN test example: every rank warns
    with the dataset positions a single process names."""
    data, ckpts, model, loss = _loaded(folder)
    x, y = data["x"].clone(), data["y"]
    x[13, 0] = float("nan")  # batch_size 2: row 5 of rank 1's shard, examples [8, 17)
    train = TensorDataset(x, y)
    xt = data["xt"].clone()
    xt[1, 0] = float("nan")
    yt = data["yt"]
    good = data["xt"]

    def build(label: str, **kw):
        if label == "TracInCP":
            return TracInCP(model, train, ckpts, loss_fn=loss, batch_size=2,
                            sample_wise_grads_per_batch=True, **kw)  # fmt: skip
        return TracInCPFast(model, "fc2", train, ckpts, loss_fn=loss, batch_size=2, **kw)

    for label in ("TracInCP", "TracInCPFast"):
        alone, sharded = build(label, distributed=False), build(label)
        for call in ("influence", "self_influence"):
            one = _named(lambda o=alone, c=call: _call(o, c, good, yt))
            many = _named(lambda o=sharded, c=call: _call(o, c, good, yt))
            if one != many or "13" not in "".join(one):
                FAILURES.append(f"{label}.{call} non-finite warning: {one} alone, {many} sharded")
    kw = dict(loss_fn=loss, batch_size=2)
    one = _named(lambda: TracInCPFastRandProj(model, "fc2", train, ckpts, distributed=False, **kw))
    rand = None

    def build_rand():
        nonlocal rand
        rand = TracInCPFastRandProj(model, "fc2", train, ckpts, **kw)

    many = _named(build_rand)
    if one != many or "13" not in "".join(one):
        FAILURES.append(f"TracInCPFastRandProj embedding warning: {one} alone, {many} sharded")
    assert rand is not None
    for k in (None, 3):
        many = _named(lambda k=k: rand.influence((xt,), yt, k=k))
        if many != [repr([("test", "[1]")])]:
            FAILURES.append(f"TracInCPFastRandProj NaN test example, k={k}: warnings {many}")

    # SimilarityInfluence counts rather than names: NaN source rows in both shards (2 and
    # 13) and a NaN test row give, on every rank, the counts of one process (before: each
    # rank warned its own share, and a rank without NaN rows said nothing)
    xs = x.clone()
    xs[2, 0] = float("nan")
    source = TensorDataset(xs, y)
    for metric in (cosine_similarity, euclidean_distance):
        kw = dict(batch_size=4, similarity_metric=metric)
        alone = SimilarityInfluence(model, "fc1", source, folder / f"sim-alone-{rank}",
                                    distributed=False, **kw)  # fmt: skip
        sharded = SimilarityInfluence(model, "fc1", source, folder / "sim-nan", **kw)
        for test in (good, xt):
            one = _messages(lambda o=alone, t=test: o.influence(t, top_k=3))
            many = _messages(lambda o=sharded, t=test: o.influence(t, top_k=3))
            if one != many or not any("2 source example" in m for m in one):
                FAILURES.append(
                    f"SimilarityInfluence[{metric.__name__}] warnings: {one} alone, {many} sharded"
                )


def mismatched_calls(folder: Path, rank: int) -> None:
    """Ranks making one call with different arguments (k, proponents, test inputs, the
    loader of a self-influence call, the projection of a saved index): every rank raises
    the same DistributedError naming what differs, and the objects work afterwards (before:
    a rank was aborted inside all_gather, or each rank returned its own wrong answer)."""
    data, ckpts, model, loss = _loaded(folder)
    train = TensorDataset(data["x"], data["y"])
    x, y = data["xt"], data["yt"]
    n = 4 + rank  # test examples: 4 on rank 0, 5 on rank 1
    tracin = TracInCP(model, train, ckpts, loss_fn=loss, batch_size=3,
                      sample_wise_grads_per_batch=True)  # fmt: skip
    calls = {
        "k": (lambda: tracin.influence((x,), y, k=3 + rank), "k differs (rank 0: 3, rank 1: 4)"),
        "k or scores": (
            lambda: tracin.influence((x,), y, k=None if rank else 3),
            "k differs (rank 0: 3, rank 1: None)",
        ),
        "proponents": (
            lambda: tracin.influence((x,), y, k=3, proponents=rank == 0),
            "proponents differs (rank 0: True, rank 1: False)",
        ),
        "test inputs": (
            lambda: tracin.influence((x[:n],), y[:n]),
            "the test inputs (their digest) differs",
        ),
        "test inputs, k": (
            lambda: tracin.influence((x[:n],), y[:n], k=2),
            "the test inputs (their digest) differs",
        ),
        # the same shapes, other values (before: each rank answered for its own inputs)
        "test input values": (
            lambda: tracin.influence((x + rank,), y, k=2),
            "the test inputs (their digest) differs",
        ),
        # a DataLoader is not read twice for a digest: its results' shapes differ
        "test loaders": (
            lambda: tracin.influence(DataLoader(TensorDataset(x[:n], y[:n]), batch_size=2)),
            "(rank 0: (4, 9), rank 1: (5, 8))",
        ),
        "aggregate": (
            lambda: tracin.influence((x,), y, aggregate=rank == 0),
            "(rank 0: (1, 9), rank 1: (5, 8))",
        ),
        "self-influence loader": (
            lambda: tracin.self_influence(DataLoader(TensorDataset(x[:n], y[:n]), batch_size=2)),
            "inputs_dataset length differs (rank 0: 4, rank 1: 5)",
        ),
    }
    # a rank with no test examples (before: it returned at once, and the others waited in
    # a collective until the process group's timeout)
    calls["an empty test batch on one rank"] = (
        lambda: tracin.influence((x[: 4 * rank],), y[: 4 * rank], k=3),
        "an empty test batch differs (rank 0: True, rank 1: False)",
    )
    calls["an empty test batch on one rank, scores"] = (
        lambda: tracin.influence((x[: 4 * rank],), y[: 4 * rank]),
        "an empty test batch differs (rank 0: True, rank 1: False)",
    )
    for what, (call, needle) in calls.items():
        expect_error(f"TracInCP, different {what}", call, needle)
    # training sets of one length but other examples (before: each rank scored its own)
    expect_error(
        "TracInCP, other training examples",
        lambda: TracInCP(
            model,
            TensorDataset(data["x"] * (1 + rank), data["y"]),
            ckpts,
            loss_fn=loss,
            batch_size=3,
            sample_wise_grads_per_batch=True,
        ),  # fmt: skip
        "training examples (five sampled) differs",
    )
    expect_error(
        "SimilarityInfluence, other source examples",
        lambda: SimilarityInfluence(
            model,
            "fc1",
            TensorDataset(data["x"] * (1 + rank), data["y"]),
            folder / f"act-other-{rank}",
            batch_size=3,
        ),  # fmt: skip
        "source examples (five sampled) differs",
    )
    # a checkpoint file that only rank 1 lacks: its error there, named on rank 0 (before:
    # rank 1 raised before the agreement, and rank 0 waited in it)
    missing = ckpts if rank == 0 else [*ckpts[:-1], str(folder / "no-such-checkpoint.pt")]
    expect_error(
        "TracInCP, a checkpoint missing on one rank",
        lambda: TracInCP(
            model, train, missing, loss_fn=loss, batch_size=3, sample_wise_grads_per_batch=True
        ),  # fmt: skip
        "rank 1 failed with" if rank == 0 else "no-such-checkpoint.pt",
    )
    for k in (None, 3):  # empty on every rank: every rank gets the empty result
        alone = TracInCP(model, train, ckpts, loss_fn=loss, batch_size=3,
                         sample_wise_grads_per_batch=True, distributed=False)  # fmt: skip
        check(
            f"TracInCP, empty test batches, k={k}",
            alone.influence((x[:0],), y[:0], k=k),
            tracin.influence((x[:0],), y[:0], k=k),
        )
    check("TracInCP after the mismatches",
          TracInCP(model, train, ckpts, loss_fn=loss, batch_size=3,
                   sample_wise_grads_per_batch=True, distributed=False).influence((x,), y, k=3),
          tracin.influence((x,), y, k=3))  # fmt: skip

    kw = dict(loss_fn=loss, batch_size=3, projection_dim=4)
    rand = TracInCPFastRandProj(model, "fc2", train, ckpts, **kw)
    for what, call, needle in (
        ("k", lambda: rand.influence((x,), y, k=2 + rank), "k differs (rank 0: 2, rank 1: 3)"),
        ("proponents", lambda: rand.influence((x,), y, k=2, proponents=rank == 1),
         "proponents differs (rank 0: False, rank 1: True)"),
        ("test inputs", lambda: rand.influence((x[:n],), y[:n], k=None),
         "the test inputs (their digest) differs"),
        ("test input values", lambda: rand.influence((x * (1 + rank),), y, k=2),
         "the test inputs (their digest) differs"),
        ("test loaders", lambda: rand.influence(
            DataLoader(TensorDataset(x[:n], y[:n]), batch_size=2), k=None), "differ in shape"),
        ("an empty test batch on one rank",
         lambda: rand.influence((x[: 4 * rank],), y[: 4 * rank], k=2),
         "the test inputs (their digest) differs"),
    ):  # fmt: skip
        expect_error(f"TracInCPFastRandProj, different {what}", call, needle)
    alone = TracInCPFastRandProj(model, "fc2", train, ckpts, distributed=False, **kw)
    check("TracInCPFastRandProj after the mismatches", alone.influence((x,), y, k=3),
          rand.influence((x,), y, k=3))  # fmt: skip
    other = TracInCPFastRandProj(model, "fc2", train, ckpts, **{**kw, "projection_dim": 2 + rank})
    expect_error(
        "TracInCPFastRandProj.save, different projections",
        lambda: other.save(folder / "index-mismatch"),
        "(rank 0: (9, 6), rank 1: (8, 9))",
    )
    # rank-local files: each rank raises its own error or names the rank that failed
    # (before: the failing rank raised before the exchange and the other waited in it)
    named = "rank 1 failed with"
    blocked = folder / f"index-blocked-{rank}"
    if rank == 1:
        blocked.write_text("not a folder")
    expect_error(
        "TracInCPFastRandProj.save, a path that is a file on one rank",
        lambda: rand.save(blocked),
        named if rank == 0 else "is a file, not a directory",
    )
    rand.save(folder / "index-shared")  # rank 0 writes it; the exchange ends after
    load_kw = dict(loss_fn=loss, batch_size=3, train_dataset=train)
    where = folder / ("index-shared" if rank == 0 else "index-absent")
    expect_error(
        "TracInCPFastRandProj.load, an index missing on one rank",
        lambda: TracInCPFastRandProj.load(where, model, ckpts, **load_kw),
        named if rank == 0 else "holds no saved TracInCPFastRandProj index",
    )
    copy = folder / f"index-copy-{rank}"
    shutil.copytree(folder / "index-shared", copy)
    if rank == 1:  # a damaged copy: one byte of its embeddings changed
        (array,) = [f for f in copy.iterdir() if f.name.endswith("embeddings.npy")]
        raw = bytearray(array.read_bytes())
        raw[-1] ^= 0xFF
        array.write_bytes(bytes(raw))
    expect_error(
        "TracInCPFastRandProj.load, a damaged copy on one rank",
        lambda: TracInCPFastRandProj.load(copy, model, ckpts, **load_kw),
        named if rank == 0 else "its checksum differs",
    )
    check("TracInCPFastRandProj.load after the failures", alone.influence((x,), y, k=3),
          TracInCPFastRandProj.load(folder / "index-shared", model, ckpts, **load_kw)
          .influence((x,), y, k=3))  # fmt: skip

    # an activation_dir that is a file on rank 1's machine only: named on every rank
    blocked = folder / f"act-blocked-{rank}"
    if rank == 1:
        blocked.write_text("not a folder")
    expect_error(
        "SimilarityInfluence, an unusable activation_dir on one rank",
        lambda: SimilarityInfluence(model, "fc1", train, blocked, batch_size=3),
        "rank 1 failed with InvalidArgumentError" if rank == 0 else "is a file, not a directory",
    )
    similar = SimilarityInfluence(model, "fc1", train, folder / "act-mismatch", batch_size=3)
    expect_error(
        "SimilarityInfluence, different top_k",
        lambda: similar.influence(x, top_k=2 + rank),
        "k differs (rank 0: 2, rank 1: 3)",
    )
    expect_error(
        "SimilarityInfluence, different test inputs",
        lambda: similar.influence(x[:n], top_k=2),
        "the number of test examples differs (rank 0: {4}, rank 1: {5})",
    )
    expect_error(
        "SimilarityInfluence, different test input values",
        lambda: similar.influence(x + rank, top_k=2),
        "the test inputs (their digest) differs",
    )
    expect_error(
        "SimilarityInfluence, an empty test batch on one rank",
        lambda: similar.influence(x[: 4 * rank], top_k=2),
        "the number of test examples differs (rank 0: {0}, rank 1: {4})",
    )

    lone = SimilarityInfluence(
        model, "fc1", train, folder / f"act-mismatch-alone-{rank}", batch_size=3, distributed=False
    )
    check(
        "SimilarityInfluence after the mismatches",
        lone.influence(x, top_k=2)["fc1"],
        similar.influence(x, top_k=2)["fc1"],
    )
    check(  # empty on every rank: no hang, no error
        "SimilarityInfluence, empty test batches",
        lone.influence(x[:0], top_k=2)["fc1"],
        similar.influence(x[:0], top_k=2)["fc1"],
    )


class _BagText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.fc = nn.EmbeddingBag(30, 5), nn.Linear(5, 3)

    def forward(self, tokens, offsets):
        return self.fc(self.bag(tokens, offsets))


def _pack(batch):
    tokens = [t for t, _ in batch]
    offsets = torch.tensor([0] + [len(t) for t in tokens[:-1]]).cumsum(0)
    return (
        torch.cat(tokens).to(DEVICE),
        offsets.to(DEVICE),
        torch.tensor([label for _, label in batch]).to(DEVICE),
    )


def packed(folder: Path, rank: int) -> None:
    """Packed text batches (a collate_fn concatenating token lists, EmbeddingBag offsets)
    sharded over the ranks: every TracIn class equals one process, test batch and
    self-influence alike."""
    g = torch.Generator().manual_seed(5)
    texts = [
        (torch.randint(0, 30, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g), i % 3)
        for i in range(17)
    ]
    torch.manual_seed(0)
    model = _BagText().to(DEVICE)
    path = folder / "bag.pt"
    if rank == 0:
        torch.save(model.state_dict(), path)
    dist.barrier()
    train = DataLoader(texts, batch_size=4, collate_fn=_pack)
    tokens, offsets, labels = _pack(texts[:5])
    none, total = nn.CrossEntropyLoss(reduction="none"), nn.CrossEntropyLoss(reduction="sum")
    makers = {
        "TracInCP": lambda d: TracInCP(model, train, [str(path)], loss_fn=none, distributed=d),
        "TracInCPFast": lambda d: TracInCPFast(
            model, "fc", train, [str(path)], loss_fn=total, distributed=d
        ),
        "TracInCPFastRandProj": lambda d: TracInCPFastRandProj(
            model, "fc", train, [str(path)], loss_fn=total, distributed=d
        ),
    }
    for label, make in makers.items():
        alone, sharded = make(False), make(None)
        if sharded._dist is None:
            FAILURES.append(f"packed, {label}: not sharded")
        for mode, kwargs in _query_modes(len(texts)):
            check(
                f"packed, {label}, {mode}",
                alone.influence((tokens, offsets), labels, **kwargs),
                sharded.influence((tokens, offsets), labels, **kwargs),
            )
        if label != "TracInCPFastRandProj":
            check(f"packed, {label}, self", alone.self_influence(), sharded.self_influence())


def _call(obj, call: str, x, y):
    return obj.influence((x,), y, k=3) if call == "influence" else obj.self_influence()


SCENARIOS = {"query-failure": query_failure, "whole-batches": whole_batches,
             "nonfinite": nonfinite, "mismatched-calls": mismatched_calls,
             "packed": packed}  # fmt: skip


def finish(rank: int) -> int:
    dist.barrier()
    for line in FAILURES:
        print(f"rank {rank} MISMATCH {line}", flush=True)
    print(f"rank {rank} checked, {len(FAILURES)} mismatches", flush=True)
    dist.destroy_process_group()
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), *sys.argv[2:]))
