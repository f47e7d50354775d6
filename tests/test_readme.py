"""The README's quick start runs as written and finds what it promises."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = next(b for b in python_blocks() if "TracInCP(" in b)
    assert len(quick.strip().splitlines()) <= 20
    scope: dict = {}
    exec(compile(quick, "README quick start", "exec"), scope)
    props, opps = scope["proponents"], scope["opponents"]
    assert props.indices.shape == (2, 5) and opps.indices.shape == (2, 5)
    assert torch.all(props.influence_scores[:, :-1] >= props.influence_scores[:, 1:])
    assert torch.all(opps.influence_scores[:, :-1] <= opps.influence_scores[:, 1:])
    assert scope["suspicious"].shape == (10,)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["0.pt", "1.pt", "2.pt"]


def test_last_layer_example_runs_after_the_quick_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    quick = next(b for b in blocks if "TracInCP(" in b)
    fast = next(b for b in blocks if "TracInCPFastRandProj(" in b)
    scope: dict = {}
    exec(compile(quick, "README quick start", "exec"), scope)
    exec(compile(fast, "README last-layer example", "exec"), scope)
    restored = scope["index"]
    top = restored.influence((scope["x"][:2],), scope["y"][:2], k=5)
    assert top.indices.shape == (2, 5)
    assert (tmp_path / "tracin-index").is_dir()


def test_similarity_example_runs_after_the_quick_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    quick = next(b for b in blocks if "TracInCP(" in b)
    sim = next(b for b in blocks if "SimilarityInfluence(" in b)
    scope: dict = {}
    exec(compile(quick, "README quick start", "exec"), scope)
    exec(compile(sim, "README similarity example", "exec"), scope)
    assert scope["indices"].shape == (2, 5)
    assert scope["near"]["2"][0].shape == (2, 5)
    assert torch.all(scope["near"]["2"][1][:, :-1] <= scope["near"]["2"][1][:, 1:])


def test_packed_batch_example_scores_each_text_as_if_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "EmbeddingBag" in b)
    scope: dict = {}
    exec(compile(block, "README packed-batch example", "exec"), scope)
    model, texts = scope["model"], scope["texts"]

    def grad(tokens, label):
        model.zero_grad()
        out = model(tokens, torch.tensor([0]))
        torch.nn.functional.cross_entropy(out, torch.tensor([label])).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    train = torch.stack([grad(*t) for t in texts])
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scope["scores"], train[:3] @ train.T, rtol=1e-4, atol=1e-5)
    assert torch.equal(scope["suspicious"], (train * train).sum(1).argsort(descending=True)[:5])
