"""The HTML influence report: content, escaping, self-containment, and a real browser."""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from proponents import KMostInfluentialResults
from proponents.errors import InvalidArgumentError
from proponents.report import InfluenceReport, MissingExtraError, build_report, plot
from proponents.report.render import as_image, example_html, png_bytes

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium); the browser checks need it",
)


# ---------------------------------------------------------------------------- data
def image_case(n_train: int = 30, n_shown: int = 3, k: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(n_train, 1, 6, 6, generator=g), torch.arange(n_train) % 3)
    test = TensorDataset(torch.rand(5, 1, 6, 6, generator=g), torch.tensor([0, 1, 2, 0, 1]))
    scores = torch.randn(n_shown, n_train, generator=g)
    top = scores.topk(k, dim=1)
    bottom = scores.topk(k, dim=1, largest=False)
    return {
        "train_dataset": train,
        "test_dataset": test,
        "proponents": KMostInfluentialResults(top.indices, top.values),
        "opponents": KMostInfluentialResults(bottom.indices, bottom.values),
        "test_indices": [4, 0, 2],
        "test_predictions": [2, 0, 2],
        "train_predictions": torch.arange(n_train) % 3,
        "self_influence": torch.rand(n_train, generator=g),
        "mislabeled": [1, 5, 7],
        "baselines": {"final loss": torch.rand(n_train, generator=g)},
        "label_names": ["zero", "one", "two"],
    }


def text_case() -> dict[str, Any]:
    words = ["<script>alert('x')</script>", "plain", "a&b", '"quoted"']
    tokens = torch.arange(8).reshape(4, 2) % 4
    train = TensorDataset(tokens, torch.tensor([0, 1, 1, 0]))
    test = TensorDataset(tokens[:2], torch.tensor([1, 0]))
    return {
        "train_dataset": train,
        "test_dataset": test,
        "proponents": (torch.tensor([[0, 1], [2, 3]]), torch.tensor([[2.0, 1.0], [0.5, 0.1]])),
        "opponents": (torch.tensor([[3, 2], [1, 0]]), torch.tensor([[-2.0, -1.0], [-3.0, -1.0]])),
        "test_predictions": [0, 0],
        "self_influence": torch.tensor([0.1, 4.0, 0.3, 2.0]),
        "label_names": ["<script>alert(1)</script>", "<i>positive</i>"],
        "render": lambda t: " ".join(words[int(i)] for i in t),
    }


# ------------------------------------------------------------------------ rendering
def test_png_writer_round_trips():
    mpimg = pytest.importorskip("matplotlib.image")
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (4, 6, 3), (3, 3, 4)]:
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        path = Path(tempfile.mkdtemp()) / "x.png"
        path.write_bytes(png_bytes(image))
        decoded = np.rint(mpimg.imread(path) * 255).astype(np.uint8)
        np.testing.assert_array_equal(decoded, image)


def test_image_detection():
    assert as_image(torch.rand(8, 8)).shape == (8, 8)
    assert as_image(torch.rand(1, 8, 8)).shape == (8, 8)
    assert as_image(torch.rand(1, 1, 8, 8)).shape == (8, 8)
    assert as_image(torch.rand(3, 5, 6)).shape == (5, 6, 3)
    assert as_image(np.zeros((5, 6, 3), np.uint8)).shape == (5, 6, 3)
    assert as_image(torch.full((4, 4), 2.0)).max() == 0  # constant: no division by zero
    assert as_image(torch.arange(10)) is None  # token ids are text
    assert as_image(torch.ones(4, 4, dtype=torch.long)) is None
    assert as_image(torch.rand(7)) is None
    image = as_image(torch.tensor([[0.0, 0.5], [1.0, float("nan")]]))
    assert image.tolist() == [[0, 128], [255, 0]]


def test_text_is_escaped():
    html, is_image = example_html("<script>alert(1)</script> & more", alt="x")
    assert not is_image
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    html, is_image = example_html(torch.rand(1, 8, 8), alt='"><script>')
    assert is_image and 'alt="&quot;&gt;&lt;script&gt;"' in html


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)), "image/jpeg"),
        (b"GIF89a" + bytes(range(256)), "image/gif"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(range(256)), "image/webp"),
    ],
)
def test_encoded_images_of_other_formats_are_shown_as_images(data, mime):
    """render() returning JPEG, GIF or WebP bytes: an image of that type (their bytes
    were decoded as text, control characters and all, into the page)."""
    import base64

    html, is_image = example_html(data, alt="x")
    assert is_image and f'src="data:{mime};base64,{base64.b64encode(data).decode()}"' in html


def test_bytes_that_are_neither_text_nor_an_image_are_described_not_dumped():
    html, is_image = example_html(bytes(range(256)), alt="x")
    assert not is_image and "&lt;256 bytes: not UTF-8 text" in html
    assert "\x00" not in html and "\x07" not in html
    html, _ = example_html("héllo".encode(), alt="x")
    assert "héllo" in html  # UTF-8 text bytes are text


def test_only_class_predictions_are_marked_wrong():
    """Class labels with a wrong class prediction get the "wrong" mark; a regression
    (float labels and predictions) and string labels never do (every card was red)."""
    from proponents.report.analysis import pick_test_examples

    case = image_case()
    html = build_report(**case).html
    assert 'class="wrong">predicted: two' in html  # test #4: label one, predicted two
    g = torch.Generator().manual_seed(1)
    for labels in (torch.rand(30, generator=g), None):
        regression = dict(case, label_names=None)
        values = torch.rand(30, generator=g)
        if labels is None:  # string labels through a dataset of (x, str) items
            regression["train_dataset"] = [(x, "cat") for x, _ in case["train_dataset"]]
            regression["test_dataset"] = [(x, "dog") for x, _ in case["test_dataset"]]
        else:
            regression["train_dataset"] = TensorDataset(case["train_dataset"].tensors[0], labels)
            regression["test_dataset"] = TensorDataset(
                case["test_dataset"].tensors[0], torch.rand(5, generator=g)
            )
        regression["train_predictions"] = values
        regression["test_predictions"] = [0.25, 0.5, 0.75]
        regression["mislabeled"] = regression["baselines"] = None
        assert 'class="wrong"' not in build_report(**regression).html
    # without classes nothing is "misclassified": the first examples are taken
    picked = pick_test_examples(np.array([0.5, 1.5, 2.5]), np.array([1.0, 1.5, 0.0]), 1, 1)
    assert picked.tolist() == [0, 1]
    strings = pick_test_examples(np.array(["a", "b", "c"]), np.array([0, 1, 2]), 2, 0)
    assert strings.tolist() == [0, 1]
    classes = pick_test_examples(np.array([0, 1, 2]), np.array([0, 2, 2]), 1, 1)
    assert classes.tolist() == [1, 0]  # misclassified first, then a correct one


def test_predictions_are_read_as_the_loss_reads_the_output():
    """A single-logit binary model predicted its raw logit (so no test example was ever
    "misclassified"), a multi-output regression and a multi-label model the argmax of
    their outputs. Each is now read as its loss reads it; references by hand."""
    from torch import nn

    from proponents.report.analysis import pick_test_examples, predict

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, generator=g)

    def outputs(model):
        with torch.no_grad():
            return model(x)

    binary = nn.Linear(4, 1)
    logits = outputs(binary)[:, 0]
    labels = (torch.rand(7, generator=g) > 0.5).float()
    data = TensorDataset(x, labels[:, None])  # the output's shape, as BCE losses need
    for loss, model, threshold in (
        (nn.BCEWithLogitsLoss(), binary, 0.0),
        (nn.BCELoss(), nn.Sequential(binary, nn.Sigmoid()), 0.5),
    ):
        values = outputs(model)[:, 0]
        pred, losses = predict(model, data, loss, batch_size=3)
        assert pred.dtype == np.int64
        assert pred.tolist() == [int(v > threshold) for v in values.tolist()]
        assert losses is not None and losses.shape == (7,)
    pred, _ = predict(binary, data, nn.BCEWithLogitsLoss(), batch_size=3)
    assert pred.tolist() == (logits > 0).long().tolist()
    # float 0./1. targets against these class predictions: the wrong ones come first
    wrong = [i for i in range(7) if pred[i] != labels[i]]
    right = [i for i in range(7) if pred[i] == labels[i]]
    assert len(wrong) >= 2 and right  # the seed gives a case that tests the order
    picked = pick_test_examples(labels[:, None].numpy(), pred, 2, 1)
    assert picked.tolist() == wrong[:2] + right[:1]

    multi = nn.Linear(4, 3)
    data3 = TensorDataset(x, torch.randn(7, 3, generator=g))
    pred, losses = predict(multi, data3, nn.MSELoss(), batch_size=4)
    assert [list(v) for v in pred] == outputs(multi).tolist()
    assert losses is not None and losses.shape == (7,)
    pred, _ = predict(multi, data3, nn.BCEWithLogitsLoss(), with_losses=False)
    want = [[c for c in range(3) if outputs(multi)[i, c] > 0] for i in range(7)]
    assert [list(v) for v in pred] == want
    # without a loss (or with a class loss), class scores are read by their argmax
    pred, none = predict(multi, data3)
    assert pred.tolist() == outputs(multi).argmax(1).tolist() and none is None


def test_binary_and_multi_output_predictions_on_cards():
    case = image_case()
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    binary = dict(case, label_names=None, mislabeled=None, baselines=None)
    binary["test_dataset"] = TensorDataset(case["test_dataset"].tensors[0], labels)
    binary["test_predictions"] = np.array([1, 1, 1, 0, 0])
    binary["test_predictions_for"] = "all"
    html = build_report(**binary).html
    # shown test examples 4, 0, 2: a 0./1. target is the class it names
    assert html.count('class="wrong">predicted: 0') == 1  # test #4: label 1, predicted 0
    assert html.count('class="wrong">predicted: 1') == 1  # test #2: label 0, predicted 1
    values = dict(binary, test_predictions=[[0.5, -1.25], [2.0, 3.0], [0.125, 1e6]])
    values["test_predictions_for"] = "shown"
    html = build_report(**values).html
    assert "predicted: [0.5, -1.25]" in html and "predicted: [0.125, 1.00e+06]" in html
    assert 'class="wrong"' not in html


# ------------------------------------------------------------------------- building
def test_report_for_a_notebook_and_a_file(tmp_path):
    report = build_report(**image_case(), title="My <report>")
    assert isinstance(report, InfluenceReport)
    fragment = report._repr_html_()
    assert fragment.startswith("<style>") and "<html" not in fragment
    assert "My &lt;report&gt;" in fragment
    # 24 suspicious cards are capped by the 30 examples; 3 rows of 1 + 4 + 4 cards; the plot.
    assert fragment.count("<img") == 24 + 3 * 9 + 1
    assert fragment.count("known bad") >= 1
    detection = report.figures["detection"]
    assert set(detection) == {
        "self-influence",
        "final loss",
        "random order (expected)",
        "best possible",
    }
    path = report.save(tmp_path / "out" / "report.html")
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and fragment in text
    assert (tmp_path / "out" / "mislabel_curve.png").read_bytes()[:4] == b"\x89PNG"
    # A folder works too.
    assert report.save(tmp_path / "out") == path


def test_report_is_self_contained():
    html = build_report(**image_case()).html
    assert "://" not in html  # no absolute URL anywhere (base64 cannot hold ':')
    for attr, value in re.findall(r"""\b(src|href|action|srcset)\s*=\s*["']?([^"'\s>]*)""", html):
        assert value.startswith("data:image/png;base64,"), (attr, value[:40])
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_text_examples_and_labels_are_escaped():
    report = build_report(**text_case())
    html = report.html
    assert "<script" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # a label
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html  # an example's text
    assert "a&amp;b" in html and "&quot;quoted&quot;" in html
    # No known-bad labels: the figure shows the sorted scores instead of a detection curve.
    assert report.figure_name == "self_influence.png" and "detection" not in report.figures
    assert report.figures["most_suspicious"] == [1, 3, 2, 0]


def test_similarity_results_and_bad_shapes():
    case = image_case()
    indices, scores = case["proponents"]
    case["proponents"] = {"fc": (indices, scores)}
    build_report(**case)
    case["proponents"] = {"a": (indices, scores), "b": (indices, scores)}
    with pytest.raises(InvalidArgumentError, match="2 layers"):
        build_report(**case)
    case["proponents"] = (indices, scores[:, :2])
    with pytest.raises(InvalidArgumentError, match="must both be"):
        build_report(**case)
    case["proponents"] = (indices + 100, scores)
    with pytest.raises(InvalidArgumentError, match="train_dataset has 30"):
        build_report(**case)
    case = image_case()
    case["self_influence"] = torch.rand(3)
    with pytest.raises(InvalidArgumentError, match="self_influence has 3 entries"):
        build_report(**case)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"proponents\[plot\]"):
        build_report(**image_case())
    report = build_report(**image_case(), plot_figure=False)
    assert report.figure_png is None and report.html.count("<img") == 24 + 27


# -------------------------------------------------------------------------- browser
class Chromium:
    """Headless chromium driven over the DevTools protocol on a pipe (no network port).

    The browser's own proxy points at a dead local port, so nothing could leave the
    machine; requests the page makes are still reported by the Network domain.
    """

    FLAGS = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ]

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def fds() -> None:  # the protocol pipe is fd 3 (commands) and fd 4 (replies)
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *self.FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe"],
            pass_fds=(3, 4),
            preexec_fn=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self._buffer = b""
        self._id = 0
        self.messages: list[dict[str, Any]] = []

    def _read_until(self, wanted: Any, timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                self.messages.append(message)
                if wanted(message):
                    return message
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._from_r], [], [], left)[0]:
                chunk = os.read(self._from_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed its protocol pipe")
                self._buffer += chunk

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_w, json.dumps(message).encode() + b"\0")
        number = self._id
        reply = self._read_until(lambda m: m.get("id") == number)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, path: Path, script: str) -> tuple[Any, list[str]]:
        """Load ``path``, wait for its load event, evaluate ``script`` (JSON result).

        Returns:
            The script's value and the URLs of every request the page made.
        """
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Network.enable", {}, session)
        self.call("Page.enable", {}, session)
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, session)
        self._read_until(
            lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session
        )
        value = self.call(
            "Runtime.evaluate", {"expression": script, "returnByValue": True}, session
        )["result"]["value"]
        time.sleep(0.2)  # let late requests (none expected) be reported
        self.call("Runtime.evaluate", {"expression": "0"}, session)
        urls = [
            m["params"]["request"]["url"]
            for m in self.messages
            if m.get("method") == "Network.requestWillBeSent" and m.get("sessionId") == session
        ]
        return json.loads(value), urls

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)
        shutil.rmtree(self.profile, ignore_errors=True)


PAGE_FACTS = """JSON.stringify({
  images: document.images.length,
  decoded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  plotWidth: (document.querySelector('img.plot') || {naturalWidth: 0}).naturalWidth,
  scripts: document.scripts.length,
  text: document.body.innerText,
  title: document.title,
})"""


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    chromium = Chromium()
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the demo/dev extra)")
    from proponents.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, epochs=2, k=3, n_wrong=2, n_right=2).report_path


def _network(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("data:", "file:"))]


@needs_chromium
def test_demo_report_renders_offline_in_chromium(browser, demo_report, tmp_path):
    facts, urls = browser.open(demo_report, PAGE_FACTS)
    # The plot, 24 suspicious digits, and 4 test digits with 3 proponents and 3 opponents.
    expected = 1 + 24 + 4 * (1 + 2 * 3)
    assert facts["images"] == expected
    assert facts["decoded"] == expected  # every inline PNG decoded and drawn
    assert facts["plotWidth"] == 640
    assert "Most suspicious training examples" in facts["text"]
    assert "which training digits are mislabelled" in facts["title"]
    assert urls and urls[0].startswith("file:")
    assert _network(urls) == []

    # The same check does see requests when a page makes them.
    control = tmp_path / "control.html"
    control.write_text(
        '<img src="http://probe.invalid/a.png"><img src="https://probe.invalid/b.png">'
    )
    _, control_urls = browser.open(control, "JSON.stringify(0)")
    assert _network(control_urls) == ["http://probe.invalid/a.png", "https://probe.invalid/b.png"]


@needs_chromium
def test_dumped_dom_holds_the_images():
    """Chromium's plain --dump-dom (no protocol): the rendered DOM holds every image."""
    report = build_report(**image_case())
    with tempfile.TemporaryDirectory() as folder:
        path = report.save(Path(folder) / "report.html")
        result = subprocess.run(
            [
                CHROMIUM,
                *Chromium.FLAGS,
                f"--user-data-dir={folder}/profile",
                "--dump-dom",
                path.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert dom.count("<img") == 24 + 27 + 1
    assert dom.count('class="plot"') == 1
    assert "Most suspicious training examples" in dom


@needs_chromium
def test_escaped_text_shows_as_text_in_chromium(browser, tmp_path):
    path = build_report(**text_case()).save(tmp_path / "report.html")
    facts, urls = browser.open(path, PAGE_FACTS)
    assert facts["scripts"] == 0  # nothing from the data became a script element
    assert "<script>alert(1)</script>" in facts["text"]  # the label, shown literally
    assert "<script>alert('x')</script> plain" in facts["text"]
    assert "<i>positive</i>" in facts["text"]
    assert facts["images"] == facts["decoded"] == 1  # just the plot
    assert _network(urls) == []


def test_a_failing_render_names_render_and_the_example():
    """A ``render`` that raises on some example: the error says it was render() and on
    which example (it was the bare ZeroDivisionError)."""
    from proponents.errors import RenderError

    case = image_case()
    shown = []

    def render(x):
        shown.append(1)
        if len(shown) == 4:
            raise ZeroDivisionError("division by zero")
        return x

    with pytest.raises(RenderError, match=r"render\(\) raised ZeroDivisionError.*#\d+"):
        build_report(**case, render=render)


# ------------------------------------------------------------- inputs checked and read
def _shown_predictions_of(html: str) -> dict[int, tuple[str, bool]]:
    """test position -> (the predicted label its card shows, whether it is marked wrong)."""
    found = re.findall(
        r"<b>test #(\d+)</b></div><div[^>]*>label: [^<]*</div><div[^>]*><span([^>]*)>"
        r"predicted: ([^<]*)<",
        html,
    )
    return {int(i): (shown, "wrong" in css) for i, css, shown in found}


def test_predictions_per_test_example_follow_reordered_test_indices():
    """``test_predictions`` with one entry per test example and ``test_indices`` that
    reorder all of them (as ``explain`` passes them, misclassified first): each card shows
    its own example's prediction, and only the misclassified one is red. Without
    ``test_predictions_for`` the two readings are ambiguous there and it is refused.
    (before: equal lengths were read as one per shown row, so all three cards showed
    another example's prediction and were marked wrong)"""
    train = TensorDataset(torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    labels = torch.tensor([0, 1, 2])
    test = TensorDataset(torch.rand(3, 4), labels)
    per_example = torch.tensor([0, 1, 0])  # test #2 is misclassified
    order = [2, 0, 1]
    pro = (torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    common = dict(test_indices=order, plot_figure=False)
    html = build_report(
        train, test, pro, test_predictions=per_example, test_predictions_for="all", **common
    ).html
    expected = {i: (str(int(per_example[i])), bool(per_example[i] != labels[i])) for i in order}
    assert _shown_predictions_of(html) == expected
    # the same predictions given per shown row, in the order of test_indices
    per_row = per_example[order]
    html = build_report(
        train, test, pro, test_predictions=per_row, test_predictions_for="shown", **common
    ).html
    assert _shown_predictions_of(html) == expected
    with pytest.raises(InvalidArgumentError, match="test_predictions_for='all'"):
        build_report(train, test, pro, test_predictions=per_example, **common)
    with pytest.raises(InvalidArgumentError, match="needs one per test example \\(3\\)"):
        build_report(train, test, pro, test_predictions=[0, 1], test_predictions_for="all")
    with pytest.raises(InvalidArgumentError, match="'shown' .* or 'all'"):
        build_report(train, test, pro, test_predictions=per_example, test_predictions_for="x")
    # unambiguous lengths keep working without the keyword; so do rows 0..n-1 in order
    html = build_report(train, test, pro, test_predictions=per_example, plot_figure=False).html
    assert _shown_predictions_of(html) == {i: expected[i] for i in range(3)}
    pro2 = (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    html = build_report(
        train, test, pro2, test_indices=[2, 1], test_predictions=per_example, plot_figure=False
    ).html
    assert _shown_predictions_of(html) == {2: expected[2], 1: expected[1]}


def _bad_case() -> tuple[TensorDataset, TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))
    test = TensorDataset(torch.rand(2, 4, generator=g), torch.randint(0, 3, (2,), generator=g))
    return train, test, (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))


def test_a_boolean_mislabeled_mask_is_read_as_a_mask_and_bad_indices_are_refused():
    """``mislabeled`` as a boolean mask of the training-set length marks and counts the
    examples it flags, exactly as their index list does; negative or too large indices,
    a mask of another length and float "indices" are refused with typed errors.
    (before: the mask's values were read as indices 0 and 1, [-1] counted as the last
    example without marking it, and [25] raised a raw IndexError)"""
    from proponents.errors import ArgumentTypeError

    train, test, pro = _bad_case()
    scores = torch.arange(20.0)  # example 19 is the most suspicious
    mask = torch.arange(20) >= 15  # examples 15..19 are known bad
    kw = dict(self_influence=scores, plot_figure=False)
    by_mask = build_report(train, test, pro, mislabeled=mask, **kw)
    by_list = build_report(train, test, pro, mislabeled=[15, 16, 17, 18, 19], **kw)
    # By hand: the top 1, 2, 4 of 20 examples are 19; 19, 18; 19..16: 1, 2, 4 of the 5.
    expected = {0.05: 1 / 5, 0.1: 2 / 5, 0.2: 4 / 5}
    assert by_mask.figures["detection"]["self-influence"] == pytest.approx(expected)
    assert by_mask.figures["detection"] == by_list.figures["detection"]
    assert by_mask.html.count('<span class="badge">known bad</span>') == 5
    assert "5 labels are known to be wrong" in by_mask.html
    assert build_report(train, test, pro, mislabeled=mask.numpy(), **kw).html == by_mask.html
    for wrong, error, needle in [
        ([-1], InvalidArgumentError, "mislabeled: index -1 is outside the 20 examples"),
        ([3, 25], InvalidArgumentError, "index 25 is outside"),
        (torch.ones(19, dtype=torch.bool), InvalidArgumentError, r"mask of shape \(19,\)"),
        ([1.5], ArgumentTypeError, "integers|ints"),
    ]:
        with pytest.raises(error, match=needle):
            build_report(train, test, pro, mislabeled=wrong, **kw)
    empty = build_report(train, test, pro, mislabeled=[], **kw)
    assert "detection" not in empty.figures and "known bad</span>" not in empty.html


def test_bad_result_indices_and_prediction_lengths_are_named():
    """A proponent index of -1 is named as the offending index, and ``train_predictions``
    of the wrong length is refused with InvalidArgumentError. (before: the message named
    index 3, the largest valid one, and a short train_predictions raised IndexError)"""
    train, test, pro = _bad_case()
    with pytest.raises(InvalidArgumentError, match="training index -1 but train_dataset has 20"):
        build_report(train, test, (torch.tensor([[-1], [3]]), torch.ones(2, 1)))
    with pytest.raises(InvalidArgumentError, match="train_predictions has 2 entries .* has 20"):
        build_report(train, test, pro, train_predictions=[0, 1], self_influence=torch.rand(20))


def test_repeated_known_bad_indices_count_once_everywhere():
    """detection_table with repeated indices [0, 0, 1, 1]: the ranking's share and "best
    possible" both count the two distinct examples, so a perfect ranking equals best
    possible; bad indices outside the examples are refused. (before: best possible divided
    by 4, reporting 25% at 5% where the perfect ranking itself found 50%)"""
    from proponents.report import detection_table
    from proponents.report.plot import found_curve

    scores = torch.arange(20.0).flip(0)  # example 0 first, then 1: a perfect ranking
    table = detection_table({"s": scores}, [0, 0, 1, 1])
    assert table == detection_table({"s": scores}, [0, 1])
    # By hand: 20 examples, 2 bad; the top 1 holds one of them, the top 2 both.
    assert table["s"] == {0.05: 0.5, 0.1: 1.0, 0.2: 1.0}
    assert table["best possible"] == table["s"]
    with pytest.raises(InvalidArgumentError, match="index -1 is outside the 20"):
        found_curve(scores, [-1])


def test_dollar_signs_in_ranking_names_are_drawn_as_text():
    """Ranking names holding ``$`` (a self_influence_name, a baseline name) are plotted
    as written, in the legend and the title. (before: matplotlib read them as mathtext
    and raised ValueError: ParseFatalException)"""
    train, test, pro = _bad_case()
    g = torch.Generator().manual_seed(1)
    for kw in (
        {"self_influence_name": "cost $\\x$", "mislabeled": [1]},
        {"baselines": {"loss $^$": torch.rand(20, generator=g)}, "mislabeled": [1]},
        {"self_influence_name": "$5 score"},  # the sorted-scores figure's title
    ):
        report = build_report(train, test, pro, self_influence=torch.rand(20, generator=g), **kw)
        assert report.figure_png is not None and report.figure_png[:4] == b"\x89PNG"
    from proponents.report.plot import _plain

    assert _plain("cost $\\x$") == "cost \\$\\x\\$"


def test_bfloat16_inputs_scores_and_render_results_are_shown():
    """bfloat16 examples, self-influence and render() results: shown as their float32
    values (the same image, the same ranking). (before: TypeError: Got unsupported
    ScalarType BFloat16)"""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 8, 8, generator=g).bfloat16()
    labels = torch.randint(0, 3, (20,), generator=g)
    scores = torch.rand(20, generator=g).bfloat16()
    pro = (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    kw = dict(self_influence=scores, plot_figure=False)
    as_bf16 = build_report(TensorDataset(x, labels), TensorDataset(x[:2], labels[:2]), pro, **kw)
    as_f32 = build_report(
        TensorDataset(x.float(), labels),
        TensorDataset(x[:2].float(), labels[:2]),
        pro,
        self_influence=scores.float(),
        plot_figure=False,
    )
    assert as_bf16.html == as_f32.html
    assert (
        as_bf16.figures["most_suspicious"][:5]
        == torch.argsort(scores.float(), descending=True, stable=True)[:5].tolist()
    )
    np.testing.assert_array_equal(as_image(x[0]), as_image(x[0].float()))
    html, is_image = example_html(torch.rand(3, 8, 8, generator=g).bfloat16(), alt="x")
    assert is_image
    assert build_report(
        TensorDataset(torch.rand(20, 4, generator=g), labels),
        TensorDataset(torch.rand(2, 4, generator=g), labels[:2]),
        pro,
        render=lambda v: v.bfloat16(),
        plot_figure=False,
    ).html


def test_label_names_without_a_name_for_some_labels_warn():
    """A label_names list shorter than the labels: those labels are shown as numbers and
    a UserWarning names them. (before: the fallback to numbers was silent)"""
    train, test, pro = _bad_case()
    names = ["zero", "one"]
    missing = sorted({int(v) for v in train.tensors[1]} | {int(v) for v in test.tensors[1]})
    missing = [v for v in missing if v >= len(names)]
    assert missing == [2]  # the data has a label 2 (independently of the report)
    with pytest.warns(UserWarning, match=r"no name for label\(s\) 2 \(2 names given\)"):
        html = build_report(
            train, test, pro, label_names=names, self_influence=torch.rand(20), plot_figure=False
        ).html
    assert "label: 2" in html and "label: zero" in html
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(train, test, pro, label_names=["a", "b", "c"], plot_figure=False)


def test_scores_and_labels_of_negative_zero_show_as_0():
    """A score or a regression label of -0.0 is shown as 0. (before: "-0")"""
    train = TensorDataset(torch.rand(4, 6, 6), torch.tensor([-0.0, 1.5, 0.0, 2.0]))
    pro = (torch.tensor([[0, 1]]), torch.tensor([[-0.0, 1e-9]]))
    report = build_report(train, train, pro, self_influence=torch.zeros(4).neg(), plot_figure=False)
    html = report.html
    assert "-0" not in re.sub(r"e-\d\d", "", html.split("</style>")[1])
    assert "score: 0<" in html and "label: 0<" in html


def test_negative_labels_are_not_named_from_the_end_of_a_label_names_list():
    """A label -1 (an "unlabelled" marker, say) with a label_names list is shown as -1, with
    the warning. (before: it was silently named after the list's last class)"""
    train = TensorDataset(torch.rand(4, 6, 6), torch.tensor([-1, 0, 1, 1]))
    pro = (torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.2]]))
    with pytest.warns(UserWarning, match=r"no name for label\(s\) -1 "):
        html = build_report(train, train, pro, label_names=["cat", "dog"], plot_figure=False).html
    first = html.split("train #0</b>")[1].split("</div></div>")[0]
    assert "label: -1" in first and "dog" not in first
    # a dict may name negative labels
    html = build_report(train, train, pro, label_names={-1: "unknown", 0: "cat", 1: "dog"},
                        plot_figure=False).html  # fmt: skip
    assert "label: unknown" in html


def test_test_examples_with_labels_of_shape_n_by_1_are_picked_by_their_label():
    """Misclassified test examples are found when each label is shaped (1,). (before: the
    labels were broadcast against the predictions to an (N, N) table, and correct examples
    were shown as the misclassified ones)"""
    from proponents.report.analysis import pick_test_examples

    labels = np.array([[0], [1], [1], [0], [1]])
    predictions = np.array([0, 0, 1, 1, 1])
    assert pick_test_examples(labels, predictions, 2, 2).tolist() == [1, 3, 0, 2]
    assert pick_test_examples(labels, predictions[:, None], 2, 1).tolist() == [1, 3, 0]


@needs_chromium
def test_a_long_summary_value_wraps_instead_of_widening_the_page(browser, tmp_path):
    """A long path without spaces in the summary (the task file's, say) wraps in its cell.
    (before: the summary grid grew to its length and the page scrolled sideways)"""
    case = text_case()
    case["summary"] = {"task": "/data/" + "deeply_nested_folder/" * 20 + "task.py", "k": "3"}
    path = build_report(**case, plot_figure=False).save(tmp_path / "report.html")
    facts, _ = browser.open(
        path,
        "JSON.stringify({page: document.documentElement.scrollWidth - "
        "document.documentElement.clientWidth, text: document.body.innerText})",
    )
    assert facts["page"] <= 0
    assert "deeply_nested_folder/" in facts["text"]


def _cards_of(html: str) -> dict[tuple[str, int], tuple[str, str, bool]]:
    """(kind, index) -> (label shown, prediction shown, marked wrong), for every card."""
    found = re.findall(
        r"<b>(train|test) #(\d+)</b></div><div[^>]*>label: ([^<]*)</div>"
        r"<div[^>]*><span([^>]*)>predicted: ([^<]*)<",
        html,
    )
    return {(kind, int(i)): (label, pred, "wrong" in css) for kind, i, label, css, pred in found}


@pytest.mark.parametrize("form", ["tensor", "numpy", "list"])
def test_float_class_labels_are_named_like_the_integer_they_equal(form):
    """0./1. targets (a BCE-trained binary model) with label_names: the label shows the
    name of its class and a matching prediction is not marked wrong. (before: the label
    was shown as "1" beside "predicted: pos", and every card was red)"""
    names = ["neg", "pos"]
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 3, generator=g)
    classes = [0, 1, 1, 0, 1, 0, 0, 1]
    targets = torch.tensor(classes, dtype=torch.float32)
    if form == "tensor":  # 0-dim float tensors, as a TensorDataset gives them
        train: Any = TensorDataset(x, targets)
    elif form == "numpy":
        train = [(x[i], np.float32(c)) for i, c in enumerate(classes)]
    else:
        train = [(x[i], float(c)) for i, c in enumerate(classes)]
    predictions = list(classes)
    predictions[2] = 0  # one wrong prediction: train #2 (label pos, predicted neg)
    pro = (torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5]]))
    html = build_report(
        train,
        train,
        pro,
        test_indices=[3],
        test_predictions=[1],  # test #3 is class 0: wrong
        test_predictions_for="shown",
        train_predictions=torch.tensor(predictions),
        self_influence=torch.rand(8, generator=g),
        label_names=names,
        plot_figure=False,
    ).html
    cards = _cards_of(html)
    assert len(cards) >= 8 + 1
    for (kind, i), (label, pred, wrong) in cards.items():
        given = classes[i]
        predicted = 1 if kind == "test" else predictions[i]
        assert label == names[given] and pred == names[predicted]
        assert wrong == (given != predicted), (kind, i)


def test_indices_that_are_not_whole_numbers_are_refused_naming_the_argument():
    """Float result indices or test_indices of a fractional value are refused. (before:
    they were cut towards zero, so 0.9, 2.7 and 5.5 were shown as train #0, #2 and #5)"""
    from proponents.errors import ArgumentTypeError

    x = torch.rand(10, 3)
    data = TensorDataset(x, torch.zeros(10, dtype=torch.long))
    fractional = torch.tensor([[0.9, 2.7, 5.5]])
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    with pytest.raises(InvalidArgumentError, match=r"proponents indices .*0\.9, 2\.7, 5\.5"):
        build_report(data, data, (fractional, scores), plot_figure=False)
    one = (torch.tensor([[1]]), scores[:, :1])
    with pytest.raises(InvalidArgumentError, match=r"opponents indices .*nan"):
        build_report(data, data, one, (torch.tensor([[float("nan")]]), scores[:, :1]))
    with pytest.raises(InvalidArgumentError, match=r"test_indices .*1\.5"):
        build_report(data, data, one, test_indices=[1.5], plot_figure=False)
    with pytest.raises(ArgumentTypeError, match="proponents indices"):
        build_report(data, data, (np.array([["a", "b"]]), scores[:, :2]), plot_figure=False)
    # floats of whole values are positions like ints: the same cards as int indices
    whole = torch.tensor([[4.0, 7.0, 1.0]])
    html = build_report(data, data, (whole, scores), test_indices=np.array([2.0]),
                        plot_figure=False).html  # fmt: skip
    shown = re.findall(r"<b>(train|test) #(\d+)</b>", html)
    assert shown == [("test", "2"), ("train", "4"), ("train", "7"), ("train", "1")]


def test_an_overflowed_self_influence_ranks_first_and_non_finite_scores_are_counted():
    """+inf self-influence (an overflow) is the most suspicious, NaN says nothing and
    comes last, and a note counts them. (before: +inf ranked after every finite score)"""
    from proponents.report.plot import found_curve

    g = torch.Generator().manual_seed(2)
    n = 12
    data = TensorDataset(torch.rand(n, 3, generator=g), torch.zeros(n, dtype=torch.long))
    scores = torch.rand(n, generator=g)
    scores[3], scores[7], scores[9], scores[0] = float("inf"), float("nan"), float("-inf"), 5.0
    values = scores.tolist()
    finite = sorted((i for i in range(n) if math.isfinite(values[i])), key=lambda i: -values[i])
    want = [3, *finite, 9, 7]
    pro = (torch.tensor([[0]]), torch.tensor([[1.0]]))
    report = build_report(data, data, pro, self_influence=scores, plot_figure=False)
    assert report.figures["most_suspicious"] == want
    notes = re.findall(r'<p class="note">([^<]*)</p>', report.html)
    counted = [note for note in notes if "not a finite number" in note]
    assert len(counted) == 1
    assert counted[0].startswith("3 training examples have")
    assert "1 +inf, ranked first" in counted[0] and "1 NaN, ranked last" in counted[0]
    assert "1 -inf" in counted[0]
    # the detection curve reads the same order: a bad example scored +inf is found first
    assert found_curve(scores, [3])[1] == 1.0
    # finite scores: no such note
    html = build_report(data, data, pro, self_influence=torch.rand(n), plot_figure=False).html
    assert "not a finite number" not in html


def test_one_known_bad_label_is_counted_in_the_singular():
    """One known-bad label: "1 label is known to be wrong". (before: "1 labels are")"""
    train, test, pro = _bad_case()
    n = len(train)
    one = build_report(train, test, pro, self_influence=torch.rand(n), mislabeled=[3],
                       plot_figure=False).html  # fmt: skip
    assert "1 label is known to be wrong" in one and "1 labels" not in one
    two = build_report(train, test, pro, self_influence=torch.rand(n), mislabeled=[3, 4],
                       plot_figure=False).html  # fmt: skip
    assert "2 labels are known to be wrong" in two


def test_a_long_label_name_can_be_read_in_full_from_its_title():
    """A label name too long for a card is cut with an ellipsis by the page's style; the
    card line carries the whole name, escaped, as its title. (before: no way to read it)"""
    import html as html_module

    long_name = 'a "very" long <class> name & more, ' * 4
    train = TensorDataset(torch.rand(4, 6, 6), torch.tensor([0, 1, 0, 1]))
    pro = (torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.2]]))
    page = build_report(train, train, pro, test_predictions=[1], label_names=["short", long_name],
                        plot_figure=False).html  # fmt: skip
    titles = [html_module.unescape(t) for t in re.findall(r'<div title="([^"]*)">', page)]
    assert f"label: {long_name}" in titles and f"predicted: {long_name}" in titles
    assert "<class>" not in page  # escaped everywhere, the attribute included


@needs_chromium
def test_a_long_unbroken_title_wraps_instead_of_widening_the_page(browser, tmp_path):
    """A title, subtitle or note without spaces wraps. (before: the page scrolled sideways)"""
    case = text_case()
    word = "influence_report_of_a_model_with_a_very_long_name_" * 6
    path = build_report(**case, title=word, subtitle=word, notes=[word],
                        plot_figure=False).save(tmp_path / "report.html")  # fmt: skip
    facts, _ = browser.open(
        path,
        "JSON.stringify({page: document.documentElement.scrollWidth - "
        "document.documentElement.clientWidth, text: document.body.innerText})",
    )
    assert facts["page"] <= 0
    assert "influence_report_of_a_model" in facts["text"]


def test_the_top_share_of_a_tiny_training_set_holds_at_least_one_example():
    """With one training example (known bad) every share, "best possible" included, is
    100%: the top 5% of one example is that example. (before: every share was 0%, as
    round(0.05 * 1) examples, none, were inspected)"""
    from proponents.report import detection_table

    table = detection_table({"s": [0.5]}, [0])
    for name in ("s", "random order (expected)", "best possible"):
        assert set(table[name].values()) == {1.0}, (name, table[name])
    # ten examples, the one bad label ranked first: found in the top 5% (the first one)
    scores = np.arange(10.0)  # example 9 ranks first
    table = detection_table({"s": scores}, [9])
    assert table["s"][0.05] == 1.0 and table["best possible"][0.05] == 1.0
    assert table["random order (expected)"][0.05] == 1 / 10
    # a large set keeps the rounded count: 5% of 1397 is 70 examples
    big = detection_table({"s": np.arange(1397.0)}, list(range(1397 - 140, 1397)))
    assert big["random order (expected)"][0.05] == 70 / 1397
    assert big["s"][0.05] == 70 / 140


# ---------------------------------------------------------------- audit of the report
class _SummingWrapper(torch.nn.Module):
    """A loss module with a ``reduction`` attribute that its forward ignores."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = reduction
        self.inner = torch.nn.CrossEntropyLoss(reduction=reduction)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(out, y)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_loss_module_that_ignores_reduction_none_gives_one_loss_per_example(reduction):
    """A wrapper whose forward always reduces the batch: each example's loss is computed
    alone, equal to cross-entropy without reduction (a loss of one example is the same
    summed or averaged). (before: the batch's one total, reshaped to one entry, so
    explain failed at the end with "baseline 'final loss' has 3 entries")"""
    from proponents.report.analysis import per_example_loss, predict

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        got = per_example_loss(_SummingWrapper(reduction))(model(x), y)
    assert got.shape == (10,)
    torch.testing.assert_close(got, want)
    _, losses = predict(model, TensorDataset(x, y), _SummingWrapper(reduction), batch_size=4)
    assert losses is not None
    np.testing.assert_allclose(losses, want.numpy(), rtol=1e-5)

    def per_entry(out, labels):  # no reduction at all: one value per class of the example
        return (out - 1.0) ** 2

    with pytest.raises(InvalidArgumentError, match=r"loss_fn gave 3 values .* one loss per"):
        per_example_loss(per_entry)(model(x), y)


def test_multi_label_predictions_given_as_lists_of_classes_are_shown():
    """Multi-label predictions as lists of classes of different lengths, for the test and
    the training examples, are shown as those classes (named), beside the labels in the
    same form. (before: a raw NumPy "inhomogeneous shape" ValueError)"""
    g = torch.Generator().manual_seed(0)
    train_labels = (torch.rand(20, 3, generator=g) > 0.5).float()
    test_labels = (torch.rand(6, 3, generator=g) > 0.5).float()
    train = TensorDataset(torch.randn(20, 4, generator=g), train_labels)
    test = TensorDataset(torch.randn(6, 4, generator=g), test_labels)
    pro = (torch.arange(6).reshape(2, 3), torch.rand(2, 3, generator=g))
    names = ["cat", "dog", "bird"]
    train_pred = [[i % 3] if i % 2 else [0, 2] for i in range(20)]
    html = build_report(
        train,
        test,
        pro,
        test_predictions=[[0], [2, 1]],
        train_predictions=train_pred,
        self_influence=torch.arange(20.0),
        label_names=names,
        plot_figure=False,
    ).html

    def named(classes):
        return "[" + ", ".join(names[c] for c in sorted(classes)) + "]"

    def present(row):
        return [c for c in range(3) if row[c] == 1]

    cards = _cards_of(html)
    assert cards[("test", 0)] == (
        named(present(test_labels[0])),
        "[cat]",
        present(test_labels[0]) != [0],
    )
    assert cards[("test", 1)][1] == "[dog, bird]"
    train_cards = {i: v for (kind, i), v in cards.items() if kind == "train"}
    assert train_cards  # the suspicious examples and the proponents
    for i, shown in train_cards.items():
        label = named(present(train_labels[i]))
        assert shown == (label, named(train_pred[i]), label != named(train_pred[i])), i


def test_multi_label_cards_show_the_label_and_the_prediction_alike():
    """A perfect multi-label model (BCEWithLogitsLoss): on every card the label (multi-hot)
    and the prediction (classes present) show the same classes, and none is red; given
    as a multi-hot array, the predictions read the same. A regression with 0./1. targets
    still shows values. (before: "label: [1, 0, 1]" beside "predicted: [0, 2]")"""
    from torch import nn

    from proponents.report.analysis import predict

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = (x[:, :3] > 0).float()
    model = nn.Linear(5, 3)
    with torch.no_grad():  # output k is x[:, k]: every prediction is right
        model.weight.zero_()
        model.weight[:, :3] = torch.eye(3)
        model.bias.zero_()
    train, test = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])
    train_pred, _ = predict(model, train, nn.BCEWithLogitsLoss())
    test_pred, _ = predict(model, test, nn.BCEWithLogitsLoss())
    pro = (torch.arange(8).reshape(2, 4), torch.rand(2, 4, generator=g))
    common = dict(self_influence=torch.rand(30, generator=g), plot_figure=False)
    html = build_report(
        train, test, pro, test_predictions=test_pred, train_predictions=train_pred, **common
    ).html
    cards = _cards_of(html)
    assert html.count(">predicted: ") == 2 + 24 + 8  # every card has a prediction
    for (kind, i), (label, pred, wrong) in cards.items():
        row = (train if kind == "train" else test)[i][1]
        assert label == pred == str([c for c in range(3) if row[c] == 1]), (kind, i)
        assert not wrong
    # the same predictions as a multi-hot array; one wrong test prediction is red
    multi_hot = (model(x[30:]) > 0).detach().clone()
    multi_hot[1] = ~multi_hot[1]
    html = build_report(train, test, pro, test_predictions=multi_hot, **common).html
    cards = _cards_of(html)
    assert cards[("test", 0)][0] == cards[("test", 0)][1] and not cards[("test", 0)][2]
    flipped = str([c for c in range(3) if y[31, c] == 0])
    assert cards[("test", 1)][1:] == (flipped, True)
    # a regression's values beside 0./1. targets: the label keeps its values
    html = build_report(train, test, pro, test_predictions=[[0.25, 0.5, 1.5]] * 2, **common).html
    label, pred, wrong = _cards_of(html)[("test", 0)]
    assert label == "[" + ", ".join(str(v) for v in y[30].int().tolist()) + "]"
    assert pred == "[0.25, 0.5, 1.5]" and not wrong


def test_a_model_that_is_one_linear_layer(tmp_path):
    """A logistic regression (the model is one nn.Linear): similarity says there is no
    layer inside to compare and what to do instead; fast names the layer as the model
    itself. (before: "Valid layer names of this Linear: (the model has no submodules)",
    and the note "Last-layer TracIn on .")"""
    from torch import nn

    from proponents.report.analysis import run_method

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    model = nn.Linear(5, 2)
    ckpt = tmp_path / "0.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.1}, ckpt)
    args = (model, data, data, [str(ckpt)], nn.CrossEntropyLoss(reduction="sum"), [0, 1])
    with pytest.raises(InvalidArgumentError) as caught:
        run_method("similarity", *args, k=3)
    message = str(caught.value)
    assert "single nn.Linear" in message and "no inner layer" in message
    assert "tracincp, fast or randproj" in message and "similarity_layer" in message
    for method in ("fast", "randproj"):
        notes = run_method(method, *args, k=3).notes
        assert "Last-layer TracIn on the model itself (one nn.Linear)." in notes
    # a model with named layers still names its final one
    deep = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.save({"model_state_dict": deep.state_dict(), "learning_rate": 0.1}, ckpt)
    notes = run_method("fast", deep, *args[1:], k=3).notes
    assert "Last-layer TracIn on 2." in notes


# ------------------------------------------------- argument checks of build_report and save
@pytest.mark.parametrize(
    ("wrong", "error", "needle"),
    [
        ({"title": None}, "type", r"title must be a str, got None"),
        ({"subtitle": 3}, "type", r"subtitle must be a str or None, got int"),
        ({"summary": [1, 2]}, "type", r"summary must be a mapping .*got list"),
        ({"baselines": [1, 2]}, "type", r"baselines must be a mapping .*got list"),
        ({"baselines": {3: torch.rand(20)}}, "type", r"names of baselines must be str"),
        ({"baselines": {"loss": ["a"] * 20}}, "type", r"baselines\['loss'\] must be real"),
        ({"label_names": 5}, "type", r"label_names must be a list .*got int 5"),
        ({"label_names": "abc"}, "type", r"label_names must be a list .*got str 'abc'"),
        ({"n_suspicious": 1.5}, "type", r"n_suspicious must be an int; got float \(1\.5\)"),
        ({"n_suspicious": -1}, "value", r"n_suspicious must be 0 or more .*got -1"),
        ({"self_influence": ["abc"] * 20}, "type", r"self_influence must be real numbers"),
        ({"self_influence": [object()] * 20}, "type", r"self_influence must be real numbers"),
        ({"notes": "Flipped labels"}, "type", r"notes must be a list .*notes=\['Flipped"),
        ({"notes": ["ok", 7]}, "type", r"notes\[1\] must be a str, got int"),
        ({"notes": 7}, "type", r"notes must be a list \(or tuple\) of str, got int"),
        ({"render": 5}, "type", r"render must be a function .*got int"),
        ({"plot_figure": "yes"}, "type", r"plot_figure must be True or False, got str 'yes'"),
    ],
)
def test_build_report_refuses_wrong_arguments_naming_them(wrong, error, needle):
    """Each wrong argument fails at the call with a typed error naming it. (before: title=None
    raised AttributeError inside html.escape, summary or baselines as a list AttributeError
    .items, label_names=5 TypeError len(), n_suspicious=1.5 a slice TypeError, string scores
    a ValueError from NumPy; notes="...", n_suspicious=-1 and plot_figure="yes" were taken)"""
    from proponents.errors import ArgumentTypeError

    train, test, pro = _bad_case()
    kw: dict[str, Any] = {"self_influence": torch.rand(20), "plot_figure": False, **wrong}
    expected = ArgumentTypeError if error == "type" else InvalidArgumentError
    with pytest.raises(expected, match=needle) as caught:
        build_report(train, test, pro, **kw)
    assert type(caught.value) is expected
    assert str(caught.value).startswith(("build_report: ", "self_influence ", "baselines["))


def test_result_scores_that_are_not_numbers_are_refused_naming_them():
    """Proponent scores of strings are refused as proponents scores. (before: a raw ValueError
    from NumPy's float conversion)"""
    from proponents.errors import ArgumentTypeError

    train, test, _ = _bad_case()
    with pytest.raises(ArgumentTypeError, match="proponents scores must be real numbers"):
        build_report(train, test, (torch.zeros(2, 1, dtype=torch.long), [["a"], ["b"]]))


def test_one_note_in_a_list_is_one_paragraph_and_a_bare_string_is_refused():
    """notes=["Flipped labels"] adds one paragraph; notes="Flipped labels" is refused with
    the fix instead of being shown one character per paragraph. (before: 14 paragraphs)"""
    from proponents.errors import ArgumentTypeError

    train, test, pro = _bad_case()
    plain = build_report(train, test, pro, plot_figure=False).fragment
    noted = build_report(train, test, pro, notes=["Flipped labels"], plot_figure=False).fragment
    assert noted.count('<p class="note">') == plain.count('<p class="note">') + 1
    assert '<p class="note">Flipped labels</p>' in noted
    as_tuple = build_report(train, test, pro, notes=("Flipped labels",), plot_figure=False)
    assert as_tuple.fragment == noted
    with pytest.raises(ArgumentTypeError, match=r"notes=\['Flipped labels'\]"):
        build_report(train, test, pro, notes="Flipped labels", plot_figure=False)


def test_n_suspicious_of_zero_shows_none_and_plot_figure_takes_numpy_booleans():
    """n_suspicious=0 is the one way to show no suspicious example (-1 is refused above);
    a NumPy boolean is a valid plot_figure, and label_names may be a 1-D array."""
    train, test, pro = _bad_case()
    none = build_report(
        train, test, pro, self_influence=torch.rand(20), n_suspicious=0, plot_figure=np.False_
    )
    assert none.figures["most_suspicious"] == [] and none.figure_png is None
    named = build_report(train, test, pro, label_names=np.array(["a", "b", "c"]),
                         plot_figure=False)  # fmt: skip
    assert "label: " in named.fragment


def test_save_refuses_a_missing_or_empty_path(tmp_path, monkeypatch):
    """save(None) raises ArgumentTypeError naming path and save("") InvalidArgumentError,
    writing nothing; "." still writes report.html in the current folder. (before: None gave
    pathlib's TypeError and "" wrote ./report.html)"""
    from proponents.errors import ArgumentTypeError

    train, test, pro = _bad_case()
    report = build_report(train, test, pro, plot_figure=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentTypeError, match=r"InfluenceReport\.save: path must be .*NoneType"):
        report.save(None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match=r"InfluenceReport\.save: path .*bytes"):
        report.save(b"report.html")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"InfluenceReport\.save: path is empty"):
        report.save("")
    assert list(tmp_path.iterdir()) == []
    assert report.save(".").resolve() == tmp_path / "report.html"


# ------------------------------------------------- argument checks of detection_table, found_at
def test_detection_table_refuses_rankings_that_do_not_fit():
    """Rankings of different lengths, rankings of another length than n, 2-D or missing
    scores, fractions outside [0, 1] and no rankings without n are refused, each naming
    the argument. (before: n came from the first ranking only, so a 30-score ranking was
    compared as if of 40; n=1000 over 40 scores and fractions 1.5 or -0.2 gave numbers;
    detection_table({}, [1]) said "give positions 0 to -1")"""
    from proponents.errors import ArgumentTypeError
    from proponents.report import detection_table

    forty = torch.arange(40.0)
    cases = [
        (({"a": forty, "b": torch.arange(30.0)}, [1]), {}, InvalidArgumentError,
         r"rankings\['b'\] has 30 scores but rankings\['a'\] has 40"),
        (({"a": forty}, [1]), {"n": 1000}, InvalidArgumentError,
         r"rankings\['a'\] has 40 scores but n is 1000"),
        (({"a": forty}, [1]), {"fractions": (0.1, 1.5)}, InvalidArgumentError,
         r"fractions\[1\] must be from 0 to 1 .*got 1\.5"),
        (({"a": forty}, [1]), {"fractions": (-0.2,)}, InvalidArgumentError,
         r"fractions\[0\] must be from 0 to 1 .*got -0\.2"),
        (({"a": forty}, [1]), {"fractions": (float("nan"),)}, InvalidArgumentError,
         r"fractions\[0\] must be from 0 to 1"),
        (({"a": forty}, [1]), {"fractions": 0.1}, ArgumentTypeError,
         r"fractions must be a sequence"),
        (({"a": forty}, [1]), {"fractions": ("0.1",)}, ArgumentTypeError,
         r"fractions\[0\] must be a number"),
        (({"a": forty}, [1]), {"n": 40.0}, ArgumentTypeError, r"n must be an int or None"),
        (({}, [1]), {"n": -1}, InvalidArgumentError, r"n must be 0 or more"),
        (({}, [1]), {}, InvalidArgumentError, r"rankings is empty.*give n"),
        (({"a": forty.reshape(4, 10)}, [1]), {}, InvalidArgumentError,
         r"rankings\['a'\] must be one-dimensional.*\(4, 10\)"),
        (({"a": None}, [1]), {}, ArgumentTypeError, r"rankings\['a'\] must be .*got None"),
        (([forty], [1]), {}, ArgumentTypeError, r"rankings must be a mapping .*got list"),
        (({"a": forty}, [40]), {}, InvalidArgumentError, r"bad: index 40 is outside the 40"),
    ]  # fmt: skip
    for args, kw, error, needle in cases:
        with pytest.raises(error, match=needle) as caught:
            detection_table(*args, **kw)
        assert type(caught.value) is error, (args, kw)
        assert str(caught.value).startswith("detection_table: "), str(caught.value)


def test_detection_table_with_n_and_no_rankings_gives_the_reference_rows():
    """With no rankings, n sets the size: random order and best possible by hand (4 of 40
    examples are the top 10%, 2 bad: 10% and 100%)."""
    from proponents.report import detection_table

    table = detection_table({}, [1, 2], fractions=(0.1,), n=40)
    assert table == {"random order (expected)": {0.1: 0.1}, "best possible": {0.1: 1.0}}
    # consistent rankings give the same table as before, n given or not
    scores = torch.arange(40.0)
    assert detection_table({"a": scores}, [39], n=40) == detection_table({"a": scores}, [39])


def test_found_at_refuses_none_two_dimensional_scores_and_fractions_outside_0_1():
    """found_at(None, ...) is refused instead of reading None as one example; 2-D scores
    and fractions outside [0, 1] are refused. (before: 'index 1 is outside the 1
    examples', a (4, 10) array counted as 40 examples, fraction 2.0 gave 1.0)"""
    from proponents.errors import ArgumentTypeError
    from proponents.report import found_at

    scores = torch.arange(40.0)
    assert found_at(scores, [39, 1], 0.05) == 0.5  # top 2 of 40: examples 39 and 38
    for args, error, needle in [
        ((None, [1], 0.1), ArgumentTypeError, r"^scores must be one score per example.*None"),
        ((scores.reshape(4, 10), [1], 0.1), InvalidArgumentError, r"^scores must be one-dim"),
        ((np.array(["a", "b"]), [1], 0.1), ArgumentTypeError, r"^scores must be real numbers"),
        ((scores, [1], 2.0), InvalidArgumentError, r"^fraction must be from 0 to 1.*2\.0"),
        ((scores, [1], -0.1), InvalidArgumentError, r"^fraction must be from 0 to 1.*-0\.1"),
        ((scores, [1], True), ArgumentTypeError, r"^fraction must be a number .*bool"),
        ((scores, [1], None), ArgumentTypeError, r"^fraction must be a number .*NoneType"),
        ((scores, [40], 0.1), InvalidArgumentError, r"^bad: index 40 is outside the 40"),
    ]:
        with pytest.raises(error, match=needle) as caught:
            found_at(*args)
        assert type(caught.value) is error, args


def test_report_functions_document_every_argument():
    """build_report, InfluenceReport.save, detection_table and found_at each have an Args
    section naming every parameter. (before: found_at had none)"""
    import inspect

    from proponents.report import detection_table, found_at

    for function in (build_report, InfluenceReport.save, detection_table, found_at):
        doc = inspect.getdoc(function) or ""
        assert "\nArgs:\n" in doc, function.__name__
        args = doc.split("\nArgs:\n", 1)[1]
        for name in inspect.signature(function).parameters:
            if name != "self":
                assert re.search(rf"^    {name}: ", args, re.M), (function.__name__, name)


def test_names_notes_and_column_scores_in_the_forms_that_worked_before_the_checks():
    """The argument checks must not refuse what was served before them: label names as
    dict.values() (or a pandas Series / Index: any iterable of names), notes from a
    generator, and (n, 1) columns of suspicion scores for found_at."""
    train, test, pro = _bad_case()
    as_list = build_report(train, test, pro, label_names=["a", "b", "c"], plot_figure=False)
    names = {0: "a", 1: "b", 2: "c"}.values()
    assert build_report(train, test, pro, label_names=names, plot_figure=False).fragment == (
        as_list.fragment
    )
    noted = build_report(train, test, pro, notes=["x", "y"], plot_figure=False)
    generated = build_report(train, test, pro, notes=(n for n in ["x", "y"]), plot_figure=False)
    assert generated.fragment == noted.fragment
    scores = np.random.default_rng(0).random(30)
    bad = [3, 7, 11]
    assert plot.found_at(scores[:, None], bad, 0.2) == plot.found_at(scores, bad, 0.2)
