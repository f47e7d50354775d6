"""The ``proponents`` command line: demo end to end, explain on a task file, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the demo/dev extra)")
pytest.importorskip("matplotlib", reason="the report needs matplotlib (the plot/dev extra)")

from proponents.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, load_task, main  # noqa: E402
from proponents.demo import run_demo  # noqa: E402
from proponents.errors import InvalidArgumentError  # noqa: E402

METHODS = ["tracincp", "fast", "randproj", "similarity"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- help
def test_help_for_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == EXIT_OK
    assert "demo" in out and "explain" in out
    code, out, _ = run_cli(capsys, "demo", "--help")
    assert code == EXIT_OK
    for option in ("--out", "--noise", "--seed", "--method"):
        assert option in out
    code, out, _ = run_cli(capsys, "explain", "--help")
    assert code == EXIT_OK
    for option in ("--task", "--checkpoints", "--method", "--k", "--out"):
        assert option in out
    for name in ("model", "train_dataset", "test_dataset", "loss_fn", "render"):
        assert name in out


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "proponents", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--noise" in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["demo", "--noise", "1.5"],
        ["demo", "--noise", "lots"],
        ["demo", "--method", "magic"],
        ["demo", "--k", "0"],
        ["explain", "--checkpoints", "x"],
        ["explain", "--task", "t.py"],
    ],
)
def test_bad_arguments_exit_2(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_USAGE
    assert "error" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--seed", "-1"], "--seed: -1 is not a seed"),
        (["--seed", str(2**64)], "between 0 and 2**64 - 1"),
        (["--k", "100000"], "k=100000 exceeds the 1397 training digits"),
    ],
)
def test_demo_bad_option_exits_2_before_anything_is_written(capsys, tmp_path, argv, needle):
    """Out-of-range demo options are usage errors found before training: nothing is
    written, the output folder is not even made."""
    from sklearn.datasets import load_digits

    from proponents.demo.digits import N_TEST

    assert len(load_digits().target) - N_TEST == 1397  # the training digits, independently
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--quiet", *argv)
    assert code == EXIT_USAGE and needle in err
    assert not out.exists()


def test_run_demo_refuses_bad_seeds_and_k_before_writing(tmp_path):
    for kwargs, needle in [
        ({"seed": -1}, "seed must be between 0 and 2\\*\\*64 - 1, got -1"),
        ({"seed": 1.5}, "seed must be an int, got float"),
        ({"k": 1398}, "k=1398 exceeds the 1397 training digits"),
    ]:
        with pytest.raises(InvalidArgumentError, match=needle):
            run_demo(tmp_path / "out", epochs=1, **kwargs)
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- demo
def test_demo_finds_the_flipped_labels(capsys, tmp_path):
    """The default demo: TracInCP self-influence finds >= 80% of 10% flipped labels in the
    top 10%, and beats random order; the summary prints the figures and the report path."""
    code, out, err = run_cli(capsys, "demo", "--out", str(tmp_path), "--quiet")
    assert code == EXIT_OK, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["noise"] == 0.1 and summary["method"] == "tracincp"
    assert summary["n_flipped"] == round(0.1 * summary["n_train"])
    detection = summary["detection"]
    found = detection["TracInCP self-influence"]
    assert found["0.1"] >= 0.8, detection
    assert found["0.2"] >= found["0.1"] >= found["0.05"]
    assert detection["random order (expected)"]["0.1"] == pytest.approx(0.1, abs=0.001)
    assert summary["test_accuracy"] > 0.85
    assert f"{found['0.1'] * 100:.1f}%" in out
    assert "TracInCP self-influence" in out and "final loss" in out and "random order" in out
    assert str(tmp_path / "report.html") in out
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert (tmp_path / "mislabel_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "checkpoints").glob("ckpt-*.pt"))) == summary["epochs"]
    assert summary["seconds"]["total"] < 90


@pytest.mark.parametrize("method", METHODS)
def test_demo_small_setting_every_method(capsys, tmp_path, method):
    code, out, err = run_cli(
        capsys,
        "demo",
        "--out",
        str(tmp_path),
        "--method",
        method,
        "--epochs",
        "3",
        "--k",
        "3",
        "--examples",
        "2",
        "--noise",
        "0.2",
        "--seed",
        "1",
        "--quiet",
    )
    assert code == EXIT_OK, err
    for name in ("report.html", "mislabel_curve.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "checkpoints").glob("ckpt-*.pt"))) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_train"] + summary["n_test"] == 1797
    assert summary["n_flipped"] == round(0.2 * summary["n_train"])
    assert len(summary["test_indices"]) == 2
    detection = summary["detection"]
    assert set(detection) == {
        summary["suspicion"],
        "final loss",
        "random order (expected)",
        "best possible",
    }
    for name, values in detection.items():
        shares = [values[f] for f in ("0.05", "0.1", "0.2")]
        assert all(0.0 <= v <= 1.0 for v in shares), (name, values)
        assert shares == sorted(shares), (name, values)
        assert values["0.2"] <= detection["best possible"]["0.2"] + 1e-12
    # Even three epochs rank the flipped labels well above random order.
    random_order = detection["random order (expected)"]["0.2"]
    assert detection[summary["suspicion"]]["0.2"] > 1.5 * random_order
    html = (tmp_path / "report.html").read_text()
    n_images = html.count("<img")
    # The plot, 24 suspicious images, and each test digit with k proponents and k opponents.
    assert n_images == 1 + 24 + 2 * (1 + 2 * 3)
    assert "Report:" in out
    _assert_texts_fit_the_method(html, method)


def _assert_texts_fit_the_method(html: str, method: str) -> None:
    """The report's explanations describe the method that made it: similarity compares
    activations at the final weights, not influence on the loss over checkpoints."""
    notes = " ".join(re.findall(r'<p class="(?:note|sub)">([^<]*)</p>', html))
    tracin_words = ("influence scores on its loss", "found hard to fit")
    if method == "similarity":
        assert not any(words in notes for words in tracin_words), notes
        assert "most similar" in notes and "final weights" in notes
        assert not re.search(r"similarity over \d+ checkpoints", notes)
    else:
        assert all(words in notes for words in tracin_words), notes


def test_demo_is_deterministic_and_leaves_global_state_alone(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    first = run_demo(tmp_path / "a", epochs=2, k=2, n_wrong=1, n_right=1, seed=3)
    second = run_demo(tmp_path / "b", epochs=2, k=2, n_wrong=1, n_right=1, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    one = json.loads(first.summary_path.read_text())
    two = json.loads(second.summary_path.read_text())
    for key in ("seconds", "report", "figure"):
        one.pop(key), two.pop(key)
    assert one == two
    strip = re.compile(r"proponents-demo|/[ab]/")
    assert strip.sub("", first.report_path.read_text()) == strip.sub(
        "", second.report_path.read_text()
    )
    ckpt_a = torch.load(tmp_path / "a" / "checkpoints" / "ckpt-2.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "b" / "checkpoints" / "ckpt-2.pt", weights_only=True)
    for key, value in ckpt_a["model_state_dict"].items():
        assert torch.equal(value, ckpt_b["model_state_dict"][key]), key


# -------------------------------------------------------------------------- explain
TASK = '''
"""A toy text task: bags of words, two classes; some label names need escaping."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

WORDS = ["good", "bad", "fine", "awful", "<b>bold</b>", "a&b", "ok", "meh"]

class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(WORDS), 6)
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens).mean(1))))

g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, len(WORDS), (90, 5), generator=g)
positive = torch.isin(tokens, torch.tensor([0, 2, 6])).sum(1)
labels = (positive >= 2).long()
labels[:6] = 1 - labels[:6]  # six known-wrong training labels
torch.manual_seed(0)
model = BagOfWords()
train_dataset = TensorDataset(tokens[:70], labels[:70])
test_dataset = TensorDataset(tokens[70:], labels[70:])
loss_fn = nn.CrossEntropyLoss(reduction="sum")
label_names = ["negative", "<script>alert(1)</script>"]
mislabeled = list(range(6))
batch_size = 32

def render(tokens):
    return " ".join(WORDS[int(t)] for t in tokens)
'''


@pytest.fixture
def task(tmp_path) -> tuple[Path, Path]:
    """A task file and a folder of checkpoints trained on its data."""
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK))
    loaded = load_task(path)
    model, train = loaded.model, loaded.train_dataset
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = train.tensors
    for epoch in range(1, 5):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.save(
            {"model_state_dict": model.state_dict(), "learning_rate": 0.5},
            ckpts / f"epoch-{epoch}.pt",
        )
    return path, ckpts


@pytest.mark.parametrize("method", METHODS)
def test_explain_writes_the_report(capsys, tmp_path, task, method):
    path, ckpts = task
    out_dir = tmp_path / "out"
    code, out, err = run_cli(
        capsys,
        "explain",
        "--task",
        str(path),
        "--checkpoints",
        str(ckpts),
        "--method",
        method,
        "--k",
        "4",
        "--examples",
        "3",
        "--out",
        str(out_dir),
        "--quiet",
    )
    assert code == EXIT_OK, err
    assert str(out_dir / "report.html") in out
    html = (out_dir / "report.html").read_text()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["method"] == method and len(summary["test_indices"]) == 3
    # Text examples: escaped text, no images except the plot.
    assert html.count("<img") == 1
    assert html.count('class="ex-text"') == 24 + 3 * (1 + 2 * 4)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>bold" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "a&amp;b" in html
    _assert_texts_fit_the_method(html, method)
    subtitle = re.findall(r'<p class="sub">([^<]*)</p>', html)
    if method == "similarity":  # one checkpoint's weights are compared, not all four
        assert subtitle == ["similarity at the final weights (the last of 4 checkpoints)"]
    else:
        assert subtitle == [f"{method} over 4 checkpoints"]
    # Known-bad labels were given: the detection table is there.
    detection = summary["detection"]
    assert 0.0 <= detection["final loss"]["0.1"] <= 1.0
    assert (out_dir / "mislabel_curve.png").is_file()


def test_explain_task_missing_names(capsys, tmp_path):
    path = tmp_path / "incomplete.py"
    path.write_text("import torch\nmodel = torch.nn.Linear(2, 2)\ntrain_dataset = [1, 2]\n")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    code, _, err = run_cli(capsys, "explain", "--task", str(path), "--checkpoints", str(ckpts))
    assert code == EXIT_USAGE
    assert "does not define test_dataset, loss_fn" in err
    assert "model" in err  # the list of what a task file must define


def test_explain_task_that_fails_to_load(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("x = 1\nraise RuntimeError('no data here')\n")
    code, _, err = run_cli(capsys, "explain", "--task", str(path), "--checkpoints", str(tmp_path))
    assert code == EXIT_USAGE
    assert "(line 2)" in err and "RuntimeError: no data here" in err


def test_explain_task_of_wrong_kind(capsys, tmp_path):
    path = tmp_path / "wrong.py"
    path.write_text("model = 3\ntrain_dataset = test_dataset = []\nloss_fn = None\n")
    code, _, err = run_cli(capsys, "explain", "--task", str(path), "--checkpoints", str(tmp_path))
    assert code == EXIT_USAGE
    assert "model must be a torch.nn.Module" in err


def test_explain_missing_task_or_checkpoints(capsys, tmp_path, task):
    path, ckpts = task
    code, _, err = run_cli(
        capsys, "explain", "--task", str(tmp_path / "nope.py"), "--checkpoints", str(ckpts)
    )
    assert code == EXIT_USAGE and "nope.py does not exist" in err
    code, _, err = run_cli(
        capsys, "explain", "--task", str(path), "--checkpoints", str(tmp_path / "none")
    )
    assert code == EXIT_USAGE and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "explain", "--task", str(path), "--checkpoints", str(empty))
    assert code == EXIT_USAGE and str(empty) in err


def test_explain_runtime_failure_exits_1(capsys, tmp_path, task):
    path, _ = task
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model_state_dict": nn.Linear(3, 3).state_dict()}, bad / "ckpt-1.pt")
    code, _, err = run_cli(
        capsys, "explain", "--task", str(path), "--checkpoints", str(bad), "--quiet"
    )
    assert code == EXIT_FAILURE
    assert "proponents explain: failed:" in err and "ckpt-1.pt" in err
    assert "Traceback" not in err
    code, _, err = run_cli(
        capsys, "explain", "--task", str(path), "--checkpoints", str(bad), "--quiet", "--traceback"
    )
    assert code == EXIT_FAILURE and "Traceback" in err


def test_docs_task_example_runs(capsys, tmp_path, monkeypatch):
    """The task file and training loop of docs/cli.md work as written."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    task_code, train_code = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S)[:2]
    assert task_code.startswith("# task.py")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.py").write_text(task_code)
    exec(compile(train_code, "docs/cli.md training", "exec"), {})
    code, out, err = run_cli(
        capsys,
        "explain",
        "--task",
        "task.py",
        "--checkpoints",
        "ckpts",
        "--k",
        "8",
        "--out",
        "report",
        "--quiet",
    )
    assert code == EXIT_OK, err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["detection"]["TracInCP self-influence"]["0.1"] >= 0.8
    assert "Report: report/report.html" in out


def test_explain_similarity_layer_must_be_one_name(capsys, tmp_path, task):
    path, ckpts = task
    listed = tmp_path / "listed.py"
    listed.write_text(path.read_text() + "\nsimilarity_layer = ['hidden', 'out']\n")
    code, _, err = run_cli(
        capsys, "explain", "--task", str(listed), "--checkpoints", str(ckpts), "--quiet",
        "--method", "similarity", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == EXIT_USAGE, err
    assert "similarity_layer must be the name of one module" in err
    assert "['hidden', 'out']" in err and "Traceback" not in err


def test_explain_similarity_without_a_linear_layer_asks_for_similarity_layer(capsys, tmp_path):
    path = tmp_path / "nolinear.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torch.utils.data import TensorDataset

            class Pooled(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.embed = nn.Embedding(8, 2)

                def forward(self, tokens):
                    return self.embed(tokens).mean(1)

            tokens = torch.randint(0, 8, (20, 5), generator=torch.Generator().manual_seed(0))
            labels = torch.arange(20) % 2
            model = Pooled()
            train_dataset = TensorDataset(tokens[:15], labels[:15])
            test_dataset = TensorDataset(tokens[15:], labels[15:])
            loss_fn = nn.CrossEntropyLoss(reduction="sum")
            """
        )
    )
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"embed.weight": torch.randn(8, 2)}, folder / "ckpt-1.pt")
    code, _, err = run_cli(
        capsys, "explain", "--task", str(path), "--checkpoints", str(folder), "--quiet",
        "--method", "similarity", "--k", "2", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == EXIT_USAGE, err
    assert "similarity_layer" in err and "'embed'" in err
    assert "use --method" not in err  # it used to suggest the method that had just failed


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_explain_out_that_cannot_be_a_folder_exits_2(capsys, tmp_path, task, where):
    path, ckpts = task
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "report"
    code, _, err = run_cli(
        capsys, "explain", "--task", str(path), "--checkpoints", str(ckpts), "--quiet",
        "--method", "similarity", "--out", str(out),
    )  # fmt: skip
    assert code == EXIT_USAGE, err
    assert f"--out {out}" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"
    if where == "below a file":  # the reason is the file in the way (before: "File exists")
        assert f"cannot be created: {blocker} is a file, not a folder" in err
        assert "File exists" not in err


# ----------------------------------------------------------------- task mistakes, output
def _explain(capsys, path, ckpts, out, *extra):
    return run_cli(capsys, "explain", "--task", str(path), "--checkpoints", str(ckpts),
                   "--out", str(out), "--quiet", "--k", "3", *extra)  # fmt: skip


@pytest.mark.parametrize(
    ("addition", "needle"),
    [
        ("mislabeled = [-1, 2]", r"mislabeled \[-1\] are outside the 70 training"),
        ("mislabeled = [1000]", r"mislabeled \[1000\] are outside"),
        ("mislabeled = ['a']", "mislabeled must be a list of ints or a boolean mask"),
        ("import numpy as np\nmislabeled = np.ones(5, dtype=bool)", "boolean mask of shape"),
        ("test_indices = []", "test_indices must be a non-empty list of ints"),
        ("test_indices = 3", "test_indices must be a non-empty list of ints"),
        ("test_indices = [True]", "test_indices must be a non-empty list of ints"),
        ("import sys\nsys.exit(0)", r"called sys.exit\(0\) while loading"),
        ("loss_fn = nn.CrossEntropyLoss", "loss_fn is the class CrossEntropyLoss"),
        ("test_dataset = TensorDataset(tokens[70:])", r"test_dataset items must be \(\*inputs"),
        ("train_dataset = [{'x': t} for t in tokens[:70]]", "item 0 is a dict"),
        ("label_names = 5", "label_names must be a list of class names"),
        ("label_names = {0, 1, 2}", "label_names must be a list of class names"),
        ("label_names = 'abc'", r"label_names must be a list.*got str 'abc'"),
        ("def render(x):\n    return 1 / 0", r"render\(\*inputs\) failed on item 0.*Zero"),
    ],
)
def test_task_mistakes_exit_2_naming_the_option_and_leave_no_folder(
    capsys, tmp_path, task, addition, needle
):
    path, ckpts = task
    path.write_text(path.read_text() + "\n" + addition + "\n")
    out = tmp_path / "new" / "out"
    code, _, err = _explain(capsys, path, ckpts, out)
    assert code == EXIT_USAGE, err
    assert re.search(needle, err), err
    assert not (tmp_path / "new").exists()  # the folders it made are gone again


def test_a_boolean_mislabeled_mask_marks_those_examples(capsys, tmp_path, task):
    """``mislabeled`` as a mask of one entry per training example: the report counts the
    examples it marks (it read the mask's values as indices 0 and 1)."""
    path, ckpts = task
    path.write_text(
        path.read_text() + "\nimport numpy as np\nmislabeled = np.arange(70) % 10 == 0\n"
    )
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_OK, err
    html = (tmp_path / "out" / "report.html").read_text()
    assert "7 labels are known to be wrong" in html


def test_a_task_file_with_a_dataclass_loads(tmp_path, task):
    path, _ = task
    path.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
        "@dataclass\nclass Config:\n    lr: float = 0.1\n\ncfg = Config()\n" + path.read_text()
    )
    assert load_task(path).options is not None


def test_projection_dim_is_refused_for_other_methods(capsys, tmp_path, task):
    path, ckpts = task
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out", "--projection-dim", "4")
    assert code == EXIT_USAGE and "--projection-dim is for --method randproj" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_out_is_refused(capsys, tmp_path, task):
    path, ckpts = task
    code, _, err = _explain(capsys, path, ckpts, "")
    assert code == EXIT_USAGE and "--out is empty" in err


def test_a_failed_report_write_keeps_the_old_report(capsys, tmp_path, task, monkeypatch):
    """The report is written through a temporary file: a failure keeps the old one whole
    (it used to be truncated to 0 bytes), and no temporary file is left."""
    from proponents.report import builder

    path, ckpts = task
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("OLD")

    class FullDisk:
        """A file that takes ten bytes and then reports a full disk."""

        def __init__(self, path, mode):
            self.fh = open(path, mode)  # noqa: SIM115 - closed in __exit__

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:10])
            raise OSError(28, "No space left on device")

    def failing(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp") and "report.html" in str(path):
            return FullDisk(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builder, "open", failing, raising=False)
    code, _, err = _explain(capsys, path, ckpts, out)
    assert code == EXIT_FAILURE and "No space left" in err
    assert (out / "report.html").read_text() == "OLD"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_demo_refuses_a_checkpoint_folder_holding_other_files(capsys, tmp_path):
    """``DIR/checkpoints`` with files the demo did not write: exit 2 and every file kept
    (the demo deleted the user's ckpt-*.pt files there); its own folder is reused."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt-99.pt").write_text("precious")
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--epochs", "1", "--quiet",
                           "--examples", "2", "--k", "2")  # fmt: skip
    assert code == EXIT_USAGE and "holds files the demo did not write" in err
    assert (out / "checkpoints" / "ckpt-99.pt").read_text() == "precious"
    with pytest.raises(InvalidArgumentError, match="holds files the demo did not write"):
        run_demo(out, epochs=1, k=2, n_wrong=1, n_right=1)


def test_demo_randproj_refuses_seeds_beyond_its_projection_seed(capsys, tmp_path):
    code, _, err = run_cli(capsys, "demo", "--out", str(tmp_path / "o"), "--method",
                           "randproj", "--seed", str(2**43))  # fmt: skip
    assert code == EXIT_USAGE and "below 2**43 with method 'randproj'" in err
    assert not (tmp_path / "o").exists()


def test_the_package_and_the_command_start_without_importing_torch():
    """``import proponents`` (and the command's module) do not import torch, so an
    interrupt while torch loads reaches the command's handler; every public name still
    resolves, to the object of its home module."""
    code = (
        "import sys, proponents, proponents.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import importlib\n"
        "for name in proponents.__all__:\n"
        "    home = importlib.import_module(proponents._HOMES[name])\n"
        "    assert getattr(proponents, name) is getattr(home, name), name\n"
        "assert sorted(proponents.__all__) == sorted(proponents._HOMES)\n"
        "assert set(proponents.__all__) <= set(dir(proponents))\n"
        "assert proponents.errors.StoreError and proponents.neighbors.ExactNearestNeighbors\n"
        "assert not hasattr(proponents, 'no_such_name')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_an_interrupt_while_the_command_starts_exits_130(capsys, monkeypatch):
    import proponents.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run_cli(capsys, "demo")
    assert code == EXIT_INTERRUPTED and "proponents: interrupted" in err
    assert "Traceback" not in err


def test_ctrl_c_while_torch_loads_arrives_after_the_import():
    """An interrupt during torch's import is held back until the import is done, then
    delivered (an interrupt inside torch's native initialisation aborted the process)."""
    import signal

    child = (
        "import signal, sys, time\n"
        "seen = []\n"
        "signal.signal(signal.SIGINT, lambda *a: seen.append(hasattr(sys.modules.get('torch'),"
        " 'Tensor')))\n"
        "from proponents.cli import _import_torch_whole\n"
        # 'ready' once the signal is blocked (printed before, a loaded machine could let
        # the interrupt arrive before the import started)
        "block = signal.pthread_sigmask\n"
        "def announced(how, mask):\n"
        "    old = block(how, mask)\n"
        "    if how == signal.SIG_BLOCK:\n"
        "        print('ready', flush=True)\n"
        "    return old\n"
        "signal.pthread_sigmask = announced\n"
        "_import_torch_whole()\n"
        "time.sleep(0.2)\n"
        "print(seen, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "[True]"  # handled once, torch complete


def test_label_names_as_a_numpy_array_name_the_classes(capsys, tmp_path, task):
    """A NumPy array of names is indexed like a list (it was refused for a moment)."""
    path, ckpts = task
    path.write_text(
        path.read_text() + "\nimport numpy as np\nlabel_names = np.array(['neg', 'pos'])\n"
    )
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_OK, err
    assert "label: neg" in (tmp_path / "out" / "report.html").read_text()


# ------------------------------------------------------------- fixes of reported bugs
def test_explain_shows_each_test_examples_own_prediction(capsys, tmp_path, task):
    """explain with --examples covering the whole test set (misclassified ones moved
    first): every test card shows the prediction the model at the last checkpoint makes
    for that example, recomputed here, and is red exactly when it differs from the label.
    (before: the predictions of all test examples were read as one per shown row, so the
    reordered cards showed other examples' predictions)"""
    path, ckpts = task
    # two test labels flipped, so that some test examples are misclassified
    path.write_text(path.read_text() + "\ntest_labels = labels[70:].clone()\n"
                    "test_labels[:2] = 1 - test_labels[:2]\n"
                    "test_dataset = TensorDataset(tokens[70:], test_labels)\n")  # fmt: skip
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out", "--examples", "40")
    assert code == EXIT_OK, err
    loaded = load_task(path)
    state = torch.load(sorted(ckpts.glob("*.pt"))[-1], weights_only=True)["model_state_dict"]
    loaded.model.load_state_dict(state)
    x, y = loaded.test_dataset.tensors
    with torch.no_grad():
        predicted = loaded.model(x).argmax(1)
    names = ["negative", "&lt;script&gt;alert(1)&lt;/script&gt;"]
    shown = json.loads((tmp_path / "out" / "summary.json").read_text())["test_indices"]
    assert sorted(shown) == list(range(20)) and shown != list(range(20))  # reordered
    html = (tmp_path / "out" / "report.html").read_text()
    cards = re.findall(
        r"<b>test #(\d+)</b></div><div[^>]*>label: [^<]*</div><div[^>]*><span([^>]*)>"
        r"predicted: ([^<]*)<",
        html,
    )
    assert [int(i) for i, _, _ in cards] == shown
    for i, css, text in cards:
        i = int(i)
        assert text == names[int(predicted[i])], i
        assert ("wrong" in css) == bool(predicted[i] != y[i]), i


def test_explain_accepts_an_empty_mislabeled_list(capsys, tmp_path, task):
    """``mislabeled = []`` (no known-bad label): the report is written, with the sorted
    scores instead of a detection curve. (before: exit 2, NumPy reads [] as floats)"""
    path, ckpts = task
    path.write_text(path.read_text() + "\nmislabeled = []\n")
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_OK, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["detection"] == {}
    assert (tmp_path / "out" / "self_influence.png").is_file()


REGRESSION_TASK = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
torch.manual_seed(0)
x = torch.randn(40, 4)
y = x.sum(1, keepdim=True)  # labels of shape (N, 1)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
train_dataset = TensorDataset(x[:30], y[:30])
test_dataset = TensorDataset(x[30:], y[30:])
loss_fn = nn.MSELoss(reduction="sum")
"""


def test_similarity_compares_labels_of_shape_n_by_1(capsys, tmp_path):
    """The similarity method on labels shaped (N, 1): explain runs on a regression task,
    and on class labels the suspicion equals that of the same labels shaped (N,) and a
    recomputation by hand from the layer's activations. (before: ValueError, operands
    could not be broadcast together)"""
    import numpy as np
    from torch.utils.data import TensorDataset

    from proponents.report.analysis import NEIGHBOURS, run_method

    path = tmp_path / "reg.py"
    path.write_text(REGRESSION_TASK)
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"model_state_dict": load_task(path).model.state_dict()}, folder / "c-1.pt")
    code, _, err = run_cli(capsys, "explain", "--task", str(path), "--checkpoints", str(folder),
                           "--method", "similarity", "--k", "3", "--out", str(tmp_path / "o"),
                           "--quiet")  # fmt: skip
    assert code == EXIT_OK, err

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(30, 4)
    classes = torch.randint(0, 3, (30,))
    runs = [
        run_method(
            "similarity",
            model,
            TensorDataset(x, labels),
            TensorDataset(x[:2], labels[:2]),
            [],
            nn.CrossEntropyLoss(),
            [0, 1],
            k=2,
        )  # fmt: skip
        for labels in (classes[:, None], classes)
    ]
    np.testing.assert_array_equal(runs[0].suspicion, runs[1].suspicion)
    # by hand: cosine similarity of the ReLU's outputs, the 10 nearest others, weighted
    with torch.no_grad():
        act = model[1](model[0](x)).double()
    unit = act / act.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    expected = []
    for i in range(30):
        near = sim[i].topk(NEIGHBOURS).indices
        weight = sim[i, near].clamp(min=0)
        differs = (classes[near] != classes[i]).double()
        expected.append(float((weight * differs).sum() / weight.sum()))
    np.testing.assert_allclose(runs[0].suspicion, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_demo_with_an_unusable_checkpoints_folder_exits_2(capsys, tmp_path, monkeypatch, kind):
    """DIR/checkpoints that is a file, or a folder that cannot be written: exit 2 with a
    message naming it, before training, and the file is left alone. (before: exit 1 with
    the raw FileExistsError / PermissionError)"""
    import os

    from proponents.demo import digits

    out = tmp_path / "out"
    out.mkdir()
    target = out / "checkpoints"
    if kind == "file":
        target.write_text("mine")
        needle = "exists and is not a folder"
    else:
        target.mkdir()
        real = os.access  # the tests may run as root, for whom every folder is writable
        monkeypatch.setattr(
            digits.os, "access", lambda p, mode: False if Path(p) == target else real(p, mode)
        )
        needle = "is not writable"
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--epochs", "1", "--quiet")
    assert code == EXIT_USAGE, err
    assert str(target) in err and needle in err and "Traceback" not in err
    if kind == "file":
        assert target.read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_a_failed_run_removes_every_folder_it_made_also_through_dotdot(
    capsys, tmp_path, monkeypatch, task
):
    """``--out x/../y`` and a failure before anything is written: both folders the command
    made (x and y) are removed. (before: x was left behind)"""
    path, _ = task
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model_state_dict": nn.Linear(3, 3).state_dict()}, bad / "ckpt-1.pt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = _explain(capsys, path, bad, "x/../y")
    assert code == EXIT_FAILURE, err
    assert list(work.iterdir()) == []


def test_run_demo_checks_argument_types_before_creating_anything(tmp_path):
    """run_demo with non-integer epochs, k or counts, or a string noise: ArgumentTypeError
    and no output folder; a NumPy integer seed works like the same int. (before: raw
    TypeErrors after the folder was made, and np.uint64 passed the check then failed in
    torch)"""
    import numpy as np

    from proponents.errors import ArgumentTypeError

    out = tmp_path / "out"
    for kwargs, needle in [
        ({"epochs": 2.5}, "epochs must be an int, got float 2.5"),
        ({"k": 2.5}, "k must be an int"),
        ({"k": True}, "k must be an int"),
        ({"n_wrong": 1.0}, "n_wrong must be an int"),
        ({"noise": "0.1"}, "noise must be a number"),
        ({"method": None}, "method must be a str"),
    ]:
        with pytest.raises(ArgumentTypeError, match=needle):
            run_demo(out, **kwargs)
        assert not out.exists()
    with pytest.raises(ArgumentTypeError, match="out must be a folder path"):
        run_demo(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="out is empty"):
        run_demo("")
    kw = dict(epochs=1, k=2, n_wrong=1, n_right=0, method="fast")
    numpy_seed = run_demo(tmp_path / "np", seed=np.uint64(3), **kw)
    int_seed = run_demo(tmp_path / "int", seed=3, **kw)
    assert numpy_seed.detection == int_seed.detection
    assert json.loads(numpy_seed.summary_path.read_text())["seed"] == 3


def test_demo_refuses_to_replace_files_it_did_not_write(capsys, tmp_path):
    """An existing DIR holding a report.html or summary.json of the user's own (no demo
    mark): exit 2, the files kept; a folder of an earlier demo run is accepted, and a
    report.html that is a folder is refused. (before: silently replaced)"""
    from proponents.demo.digits import DEMO_MARKER
    from proponents.demo.run import check_demo_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("my report")
    (out / "summary.json").write_text('{"mine": 1}')
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--epochs", "1", "--quiet")
    assert code == EXIT_USAGE and "holds report.html, summary.json" in err, err
    assert "would replace them; give another output folder or remove them" in err
    assert (out / "report.html").read_text() == "my report"
    assert (out / "summary.json").read_text() == '{"mine": 1}'
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / DEMO_MARKER).write_text("x")
    check_demo_output(out)  # an earlier demo's folder: its files may be replaced
    (out / "report.html").unlink()
    (out / "report.html").mkdir()
    with pytest.raises(InvalidArgumentError, match="report.html is not a file"):
        check_demo_output(out)
    # one file of the user's: "it", not "them" (before: "would replace them")
    single = tmp_path / "single"
    single.mkdir()
    (single / "report.html").write_text("my report")
    with pytest.raises(InvalidArgumentError, match="holds report.html, .*") as caught:
        check_demo_output(single)
    assert "would replace it; give another output folder or remove it" in str(caught.value)
    assert "them" not in str(caught.value)


def test_explain_refuses_a_report_path_that_is_a_folder(capsys, tmp_path, task):
    """--out DIR where DIR/report.html is a folder: exit 2 before any work, naming it.
    (before: the report went to DIR/report.html/report.html)"""
    path, ckpts = task
    out = tmp_path / "out"
    (out / "report.html").mkdir(parents=True)
    code, out_text, err = _explain(capsys, path, ckpts, out)
    assert code == EXIT_USAGE, err
    assert f"{out / 'report.html'} exists and is not a file" in err
    assert list((out / "report.html").iterdir()) == [] and out_text == ""


def test_seed_help_shows_its_default_and_empty_checkpoints_is_refused(capsys, tmp_path, task):
    """``demo --help`` gives --seed's default 0, and ``--checkpoints ""`` is a usage error.
    (before: a default of 0 was hidden, as it equals False; "" meant the current folder)"""
    code, out, _ = run_cli(capsys, "demo", "--help")
    assert code == EXIT_OK
    assert re.search(r"--seed SEED\s+seed of data split, flips, training \(default: 0\)", out)
    path, _ = task
    code, _, err = run_cli(capsys, "explain", "--task", str(path), "--checkpoints", "",
                           "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == EXIT_USAGE and "--checkpoints is empty" in err
    assert not (tmp_path / "o").exists()


def test_explain_warns_on_stderr_about_labels_without_a_name(capsys, tmp_path, task):
    """A label_names list too short for the labels: the report shows the number, and
    stderr has one "warning:" line naming the label. (before: silently shown as numbers)"""
    path, ckpts = task
    path.write_text(path.read_text() + "\nlabel_names = ['negative']\n")
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_OK, err
    assert "proponents explain: warning: label_names has no name for label(s) 1 " in err
    assert "label: 1" in (tmp_path / "out" / "report.html").read_text()


def test_a_failed_summary_write_keeps_the_old_summary(capsys, tmp_path, task, monkeypatch):
    """summary.json is written through a temporary file too: a full disk keeps the old
    one whole. (before: it was left truncated, a file no JSON reader could load)"""
    import io

    from proponents.report import builder

    path, ckpts = task
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}\n')
    real_open = open

    class FullDisk:
        def __init__(self, path, mode, *args, **kwargs):
            self.fh = real_open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed below

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def close(self):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:10])
            raise OSError(28, "No space left on device")

    def failing(file, mode="r", *args, **kwargs):
        if "summary.json" in Path(file).name and ("w" in mode or "x" in mode):
            return FullDisk(file, mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", failing)
    monkeypatch.setattr(builder, "open", failing, raising=False)
    code, _, err = _explain(capsys, path, ckpts, out)
    assert code == EXIT_FAILURE and "No space left" in err
    assert json.loads((out / "summary.json").read_text()) == {"old": True}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_warnings_while_explaining_print_as_one_line_of_the_command(capsys, tmp_path, task):
    """A warning raised while the command runs (here by the task's model, as the library's
    own non-finite-score warning is) prints as one "proponents explain: warning:" line.
    (before: Python's form, "…/bin/proponents:8: RuntimeWarning: …" and "sys.exit(main())")"""
    path, ckpts = task
    path.write_text(
        path.read_text()
        + textwrap.dedent("""
            import warnings
            _forward = BagOfWords.forward
            def _warning_forward(self, tokens):
                warnings.warn("odd tokens in this batch", RuntimeWarning)
                return _forward(self, tokens)
            BagOfWords.forward = _warning_forward
        """)
    )
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_OK, err
    lines = [line for line in err.splitlines() if "odd tokens" in line]
    assert lines and set(lines) == {"proponents explain: warning: odd tokens in this batch"}
    assert "RuntimeWarning" not in err and "warnings.warn" not in err
    # the user's warning filters still apply, and are as they were after the command
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        code, _, err = _explain(capsys, path, ckpts, tmp_path / "out2")
    assert code == EXIT_OK and "odd tokens" not in err
    assert list(warnings.filters) == before


@pytest.mark.parametrize("form", ["function", "callable object", "partial", "nested partial"])
def test_a_failing_checkpoints_load_func_is_named_with_its_checkpoint(capsys, tmp_path, task, form):
    """An exception inside the task's checkpoints_load_func names that function and the
    checkpoint it was loading (exit 1). (before: "failed: KeyError: 'state'" alone; for a
    functools.partial that gives leading arguments, the model was named as the checkpoint)"""
    path, ckpts = task
    body = textwrap.dedent("""
        def _helper(checkpoint):
            if str(checkpoint).endswith("epoch-2.pt"):
                raise KeyError("state")
            return torch.load(checkpoint, weights_only=True)

        def _load(model, checkpoint):
            saved = _helper(checkpoint)
            model.load_state_dict(saved["model_state_dict"])
            return saved["learning_rate"]
    """)
    if form == "function":
        body += "checkpoints_load_func = _load\n"
    elif form in ("partial", "nested partial"):
        body += textwrap.dedent("""
            import functools

            def _load_on(device, retries, model, checkpoint):
                return _load(model, checkpoint)
        """)
        if form == "partial":
            body += "checkpoints_load_func = functools.partial(_load_on, 'cpu', 2)\n"
        else:
            body += (
                "checkpoints_load_func = functools.partial(functools.partial(_load_on, 'cpu'), 2)\n"
            )
    else:
        body += textwrap.dedent("""
            class Loader:
                def __call__(self, model, checkpoint):
                    return _load(model, checkpoint)

            checkpoints_load_func = Loader()
        """)
    path.write_text(path.read_text() + body)
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_FAILURE, err
    failing = ckpts / "epoch-2.pt"  # the one the function refuses (the last one loads)
    assert (
        "failed: the task's checkpoints_load_func raised KeyError: 'state' while loading "
        f"checkpoint {failing} (run with --traceback" in err
    ), err


def test_help_texts_say_what_docs_cli_md_says(capsys):
    """The task names' help and the commands' descriptions agree with docs/cli.md: render
    takes encoded image bytes too, test_indices defaults to half misclassified (listed
    first) and half correct, and the ranking is the method's (similarity has no
    self-influence). (before: "image array, PIL image or str", "misclassified first", and
    "Rank the training images by self-influence" for every method)"""
    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (?:yes|no) \| (.*) \|$", docs, re.M))
    image_bytes = re.search(r"PNG, JPEG, GIF or WebP bytes", rows["render"])
    default = re.search(r"half misclassified \(listed first\), half correct", rows["test_indices"])
    assert image_bytes and default  # the docs say it this way
    similarity_row = re.search(r"^\| `similarity` \|.*\|(.*)\|$", docs, re.M)
    assert similarity_row and "neighbour label disagreement" in similarity_row.group(1)

    def help_of(command):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == EXIT_OK
        return " ".join(out.split())

    explain, demo = help_of("explain"), help_of("demo")
    assert image_bytes.group(0) in explain and default.group(0) in explain
    for text in (explain, demo):
        assert "ranked by self-influence" not in text and "by self-influence and" not in text
        assert "neighbour label disagreement for similarity" in text


def test_a_loss_module_that_ignores_reduction_none_runs_and_the_final_loss_is_compared(
    capsys, tmp_path, task
):
    """A loss wrapper whose forward always sums, with known-bad labels: explain finishes,
    comparing the final loss of every training example; a loss_fn that gives several
    values for one example exits 2 naming loss_fn, before any influence pass.
    (before: "failed: baseline 'final loss' has 3 entries but train_dataset has 70")"""
    path, ckpts = task
    base = path.read_text()
    path.write_text(
        base
        + textwrap.dedent("""
            class WrappedCE(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.reduction = "sum"
                    self.ce = nn.CrossEntropyLoss(reduction="sum")

                def forward(self, out, y):
                    return self.ce(out, y)

            loss_fn = WrappedCE()
        """)
    )
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out")
    assert code == EXIT_OK, err
    detection = json.loads((tmp_path / "out" / "summary.json").read_text())["detection"]
    assert 0.0 <= detection["final loss"]["0.1"] <= 1.0
    path.write_text(base + "\ndef loss_fn(out, y):\n    return (out - 1.0) ** 2\n")
    code, _, err = _explain(capsys, path, ckpts, tmp_path / "out2")
    assert code == EXIT_USAGE, err
    assert "loss_fn gave 2 values (shape (1, 2)) for a batch of one example" in err


def _figures_in(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def _figure_of(report: Path) -> set[str]:
    """The figure the report shows, by the name it gives it."""
    return set(re.findall(r'<img class="plot" [^>]*alt="([^"]+)"', report.read_text()))


def test_a_rerun_into_the_same_out_removes_the_figure_of_the_earlier_run(capsys, tmp_path, task):
    """explain into a DIR of an earlier run: the folder holds the figure of the new report
    only; files of other names (the user's) are kept. (before: the earlier run's
    mislabel_curve.png stayed beside a report drawn without known-bad labels)"""
    path, ckpts = task
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_bytes(b"my own picture")
    (out / "notes.txt").write_text("mine")
    code, _, err = _explain(capsys, path, ckpts, out)
    assert code == EXIT_OK, err
    assert _figure_of(out / "report.html") == {"mislabel_curve.png"}
    path.write_text(path.read_text() + "\ndel mislabeled\n")
    code, _, err = _explain(capsys, path, ckpts, out)
    assert code == EXIT_OK, err
    assert _figure_of(out / "report.html") == {"self_influence.png"}
    assert _figures_in(out) == {"self_influence.png", "mine.png"}
    assert (out / "mine.png").read_bytes() == b"my own picture"
    assert (out / "notes.txt").read_text() == "mine"


def test_a_demo_rerun_into_the_same_out_removes_the_figure_of_the_earlier_run(tmp_path):
    """The demo with flipped labels, then without, into one folder: only the new report's
    figure is left, and the result names it. (before: both figures)"""
    kw = dict(epochs=1, k=2, n_wrong=1, n_right=0, method="fast")
    first = run_demo(tmp_path, noise=0.1, **kw)
    assert first.figure_path is not None and first.figure_path.name == "mislabel_curve.png"
    second = run_demo(tmp_path, noise=0.0, **kw)
    assert _figure_of(second.report_path) == {"self_influence.png"}
    assert second.figure_path is not None and _figures_in(tmp_path) == {second.figure_path.name}
