"""The ``proponents`` command: ``proponents demo`` and ``proponents explain``.

Exit codes: 0 success; 2 a usage problem (bad arguments, a task file that is missing,
fails to load or lacks a required name, an empty checkpoint folder, an output folder that
cannot be made or whose files cannot be written there); 1 a failure while
running (a checkpoint that does not fit the model, a missing optional dependency, an
error raised by the model); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Exit codes.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

METHOD_HELP = (
    "tracincp: exact TracIn over all parameters (or the task's `layers`); "
    "fast: TracIn on the final linear layer; "
    "randproj: the same with random projections and nearest-neighbour search; "
    "similarity: cosine similarity of a layer's activations"
)

#: Names a task file must define, with what each must be.
REQUIRED_NAMES = {
    "model": "the torch.nn.Module (or a function returning it)",
    "train_dataset": "map-style Dataset of (*inputs, label) items",
    "test_dataset": "the test set, in the same form",
    "loss_fn": "the training loss, e.g. nn.CrossEntropyLoss(reduction='sum')",
}
#: Names a task file may define.
OPTIONAL_NAMES = {
    "render": "render(*inputs) -> image array, PIL image, PNG, JPEG, GIF or WebP bytes, "
    "or a string to show",
    "label_names": "names of the integer labels (list or dict)",
    "layers": "TracInCP layers (module names); default: all parameters",
    "final_fc_layer": "final nn.Linear for fast/randproj; default: the last one",
    "similarity_layer": "layer compared by similarity; default: fc input",
    "checkpoints_load_func": "f(model, checkpoint) -> learning rate",
    "batch_size": "training examples per batch; default 64",
    "sample_wise_grads_per_batch": "TracInCP's flag; default from loss_fn.reduction",
    "test_indices": "test examples to explain; default: half misclassified (listed first), "
    "half correct (--examples)",
    "mislabeled": "training indices known to be mislabelled (detection curve)",
}


class UsageError(Exception):
    """A problem with the command line or the task file (exit code 2)."""


class TaskFunctionError(Exception):
    """A function of the task file raised while the command ran (exit code 1); the
    message names the function and what it was given, the cause is its exception."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; adds meaningful defaults to option help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # by identity: a default of 0 equals False but is worth showing (--seed)
        hidden = action.default is None or action.default is False
        if not hidden and action.default is not argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _wrap(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(p, 78) for p in paragraphs)


def _name_list(names: dict[str, str]) -> str:
    lines = []
    indent = " " * 19
    for name, what in names.items():
        first = f"  {name}\n{indent}" if len(name) > 16 else f"  {name:<16} "
        text = textwrap.fill(
            what, 78, initial_indent=indent, subsequent_indent=indent, break_long_words=False
        )
        lines.append(first + text[len(indent) :] + "\n")
    return "".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with our error format (exit code 2 stays argparse's)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _seed(text: str) -> int:
    from proponents.demo.run import SEED_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is not a seed between 0 and 2**64 - 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``proponents`` command."""
    from proponents import __version__
    from proponents.demo.run import EPOCHS
    from proponents.report.analysis import METHODS

    parser = _Parser(
        prog="proponents",
        description=(
            "Find the training examples behind a PyTorch model's predictions (TracIn, "
            "similarity) and show them in a self-contained HTML report."
        ),
        epilog="Run 'proponents COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"proponents {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--quiet", action="store_true", help="no progress bars (the summary is still printed)"
    )
    common.add_argument(
        "--traceback", action="store_true", help="show the full traceback when something fails"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train a small CNN on noisy 8x8 digits and report what influence finds",
        description=_wrap(
            "Train a small CNN on scikit-learn's bundled 8x8 handwritten digits with a "
            "fraction of the training labels flipped, saving a checkpoint every epoch. Rank "
            "the training images by the method's suspicion score (self-influence for the "
            "TracIn methods, neighbour label disagreement for similarity) and report how "
            "many flipped labels the top 5/10/20% hold, beside the final-loss ranking and "
            "random order; explain a few misclassified and correct test digits by their "
            "proponents and opponents; write report.html and print a summary.",
            "Seeded and deterministic. Needs the demo extra (scikit-learn, matplotlib): "
            'pip install "proponents[demo]".',
        ),
        formatter_class=_Formatter,
    )
    demo.add_argument("--out", default="proponents-demo", metavar="DIR", help="output folder")
    demo.add_argument(
        "--noise", type=_fraction, default=0.1, help="fraction of training labels flipped"
    )
    demo.add_argument("--seed", type=_seed, default=0, help="seed of data split, flips, training")
    demo.add_argument("--method", choices=METHODS, default="tracincp", help=METHOD_HELP)
    demo.add_argument(
        "--epochs", type=_positive, default=EPOCHS, help="training epochs (= checkpoints)"
    )
    demo.add_argument("--k", type=_positive, default=8, help="proponents/opponents per test digit")
    demo.add_argument(
        "--examples",
        type=_positive,
        default=6,
        metavar="N",
        help="test digits to explain: half misclassified, half correct",
    )
    demo.set_defaults(handler=_cmd_demo)

    explain = commands.add_parser(
        "explain",
        parents=[common],
        help="explain your own model from a task file and its checkpoints",
        description=_wrap(
            "Load a task file (Python) that defines the model, the training and test "
            "datasets and the loss; run the chosen method over the checkpoints; write "
            "report.html with test examples beside their proponents and opponents and the "
            "training examples ranked by the method's suspicion score (self-influence for "
            "the TracIn methods, neighbour label disagreement for similarity).",
        )
        + "\n\nA task file must define:\n"
        + _name_list(REQUIRED_NAMES)
        + "It may define:\n"
        + _name_list(OPTIONAL_NAMES)
        + "\n"
        + _wrap("The task file is run as Python code: use only task files you trust."),
        formatter_class=_Formatter,
    )
    explain.add_argument("--task", required=True, metavar="TASK.py", help="the task file")
    explain.add_argument(
        "--checkpoints",
        required=True,
        metavar="DIR",
        help="folder of checkpoints (*.pt *.pth *.ckpt *.bin *.safetensors, natural order)",
    )
    explain.add_argument("--method", choices=METHODS, default="tracincp", help=METHOD_HELP)
    explain.add_argument("--k", type=_positive, default=10, help="proponents/opponents shown")
    explain.add_argument("--out", default="proponents-report", metavar="DIR", help="output folder")
    explain.add_argument(
        "--examples",
        type=_positive,
        default=6,
        metavar="N",
        help="test examples to explain when the task gives no test_indices: "
        "half misclassified, half correct",
    )
    explain.add_argument(
        "--batch-size", type=_positive, default=None, help="override the task's batch_size"
    )
    explain.add_argument(
        "--projection-dim",
        type=_positive,
        default=None,
        help="random projection size for --method randproj (default: no projection)",
    )
    explain.set_defaults(handler=_cmd_explain)
    return parser


# ----------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from proponents.demo import run_demo
    from proponents.demo.run import check_demo_arguments, check_demo_output
    from proponents.errors import ArgumentTypeError, InvalidArgumentError

    n_wrong = (args.examples + 1) // 2
    settings = dict(
        noise=args.noise,
        seed=args.seed,
        method=args.method,
        epochs=args.epochs,
        k=args.k,
        n_wrong=n_wrong,
        n_right=args.examples - n_wrong,
    )
    try:  # before the output folder is made: a bad option leaves nothing behind
        check_demo_arguments(**settings)
    except (InvalidArgumentError, ArgumentTypeError) as exc:
        raise UsageError(str(exc)) from exc
    with _output_folder(args.out) as out:
        try:  # an unusable DIR/checkpoints or files of the user's own (removed again)
            check_demo_output(out)
        except (InvalidArgumentError, ArgumentTypeError) as exc:
            raise UsageError(str(exc)) from exc
        result = run_demo(out, show_progress=not args.quiet, **settings)
    print(result.summary_text())
    return EXIT_OK


# -------------------------------------------------------------------------- explain
@dataclass
class Task:
    """The names a task file defined.

    Attributes:
        path: the task file.
        model: the model.
        train_dataset: training items ``(*inputs, label)``.
        test_dataset: test items.
        loss_fn: the loss.
        options: the optional names it defined (see :data:`OPTIONAL_NAMES`).
    """

    path: Path
    model: Any
    train_dataset: Any
    test_dataset: Any
    loss_fn: Any
    options: dict[str, Any] = field(default_factory=dict)


def _task_location(exc: BaseException, path: Path) -> str:
    """``" (line N)"`` of the deepest traceback frame inside the task file, if any."""
    line = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = f" (line {frame.lineno})"
    if isinstance(exc, SyntaxError) and exc.lineno:
        line = f" (line {exc.lineno})"
    return line


def load_task(path: str | Path) -> Task:
    """Run a task file and collect the names it defines.

    The file is imported as a module from its path (its folder is put first on
    ``sys.path`` meanwhile, so it can import files beside it).

    Raises:
        UsageError: the file does not exist, fails to run, lacks a required name or
            defines one of the wrong kind; the message says which and what is expected.
    """
    import torch
    from torch import nn

    task_path = Path(path)
    if not task_path.is_file():
        raise UsageError(f"task file {task_path} does not exist (or is not a file)")
    spec = importlib.util.spec_from_file_location(f"proponents_task_{task_path.stem}", task_path)
    if spec is None or spec.loader is None:
        raise UsageError(f"task file {task_path} cannot be loaded as Python (use a .py file)")
    module = importlib.util.module_from_spec(spec)
    folder = str(task_path.resolve().parent)
    sys.path.insert(0, folder)
    # registered as an imported module is (dataclasses and pickling look it up there)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:  # sys.exit() or an argument parser in the task file
        raise UsageError(
            f"task file {task_path} called sys.exit({exc.code!r}) while loading (an argument "
            "parser at its top level, say); a task file must only define names"
        ) from exc
    except BaseException as exc:
        raise UsageError(
            f"task file {task_path} failed while loading{_task_location(exc, task_path)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)

    missing = [name for name in REQUIRED_NAMES if not hasattr(module, name)]
    if missing:
        expected = "\n".join(f"  {name}: {what}" for name, what in REQUIRED_NAMES.items())
        raise UsageError(
            f"task file {task_path} does not define {', '.join(missing)}.\n"
            f"A task file must define:\n{expected}"
        )
    model = module.model
    if not isinstance(model, nn.Module) and callable(model):
        try:
            model = model()
        except Exception as exc:
            raise UsageError(
                f"task file {task_path}: calling model() to build the model failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"task file {task_path}: model must be a torch.nn.Module (or a function returning "
            f"one), got {type(module.model).__name__}"
        )
    for name in ("train_dataset", "test_dataset"):
        data = getattr(module, name)
        if isinstance(data, torch.utils.data.DataLoader):
            data = data.dataset
            setattr(module, name, data)
        if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise UsageError(
                f"task file {task_path}: {name} must be a map-style Dataset (with __len__ and "
                f"__getitem__) of (*inputs, label) items, got {type(data).__name__}"
            )
        if len(data) == 0:
            raise UsageError(f"task file {task_path}: {name} is empty")
        try:
            first = data[0]
        except Exception as exc:
            raise UsageError(
                f"task file {task_path}: reading item 0 of {name} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(first, (tuple, list)) or len(first) < 2:
            from proponents.errors import article

            shown = type(first).__name__
            size = f" of length {len(first)}" if isinstance(first, (tuple, list)) else ""
            raise UsageError(
                f"task file {task_path}: {name} items must be (*inputs, label) tuples, but "
                f"item 0 is {article(shown)}{size}; give each example its label "
                "(TensorDataset(x, y))"
            )
    if isinstance(module.loss_fn, type):
        raise UsageError(
            f"task file {task_path}: loss_fn is the class {module.loss_fn.__name__}, not a loss "
            f"object; give an instance, e.g. loss_fn = {module.loss_fn.__name__}(reduction='sum')"
        )
    if not callable(module.loss_fn):
        raise UsageError(
            f"task file {task_path}: loss_fn must be callable as loss_fn(outputs, labels), got "
            f"{type(module.loss_fn).__name__}"
        )
    options = {name: getattr(module, name) for name in OPTIONAL_NAMES if hasattr(module, name)}
    for name in ("render", "checkpoints_load_func"):
        if name in options and not callable(options[name]):
            raise UsageError(
                f"task file {task_path}: {name} must be a function, got "
                f"{type(options[name]).__name__}"
            )
    render = options.get("render")
    if render is not None:
        # tried on one example now, not after every influence pass has run
        try:
            render(*tuple(module.train_dataset[0])[:-1])
        except Exception as exc:
            raise UsageError(
                f"task file {task_path}: render(*inputs) failed on item 0 of train_dataset: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    names = options.get("label_names")
    # a sequence (list, tuple, NumPy array) or a mapping; a string is a sequence of letters
    if names is not None and (isinstance(names, (str, bytes)) or not hasattr(names, "__getitem__")):
        raise UsageError(
            f"task file {task_path}: label_names must be a list of class names (index i is "
            f"label i) or a dict {{label: name}}, got {type(names).__name__} {names!r}"
        )
    layer = options.get("similarity_layer")
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise UsageError(
            f"task file {task_path}: similarity_layer must be the name of one module of the "
            f"model (a str such as 'fc1' or 'features.3'), got {layer!r}; the similarity "
            "method compares one layer"
        )
    batch = options.get("batch_size", 64)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UsageError(f"task file {task_path}: batch_size must be a positive int, got {batch!r}")
    return Task(
        task_path, model, module.train_dataset, module.test_dataset, module.loss_fn, options
    )


def _resolve_checkpoints(folder: str) -> list[Any]:
    from proponents.checkpoints import resolve_checkpoints
    from proponents.errors import CheckpointNotFoundError

    if not folder:
        raise UsageError("--checkpoints is empty; give the folder that holds the checkpoints")
    path = Path(folder)
    if not path.exists():
        raise UsageError(f"checkpoint folder {path} does not exist")
    try:
        return resolve_checkpoints(str(path))
    except CheckpointNotFoundError as exc:
        raise UsageError(str(exc)) from exc


@contextmanager
def _output_folder(path: str, option: str = "--out") -> Iterator[Path]:
    """``path`` as a folder that exists and can be written (created if needed), for the
    body of a ``with``; the folders it created are removed again (each only while still
    empty) if making it or the body fails.

    Raises:
        UsageError: it is empty, names an existing file, or cannot be created or written.
    """
    if not path:
        raise UsageError(f"{option} is empty; give the folder to write into")
    created: list[Path] = []
    try:
        yield _make_folder(Path(path), option, created)
    except BaseException:
        for made in reversed(created):
            try:
                made.rmdir()  # only if still empty
            except OSError:
                break
        raise


def _make_folder(folder: Path, option: str, created: list[Path]) -> Path:
    """Make ``folder`` one component at a time, appending each folder made to
    ``created``: lexical prefixes, so that with ``x/../y`` both ``x`` and ``y`` are
    known (a walk up the parents of ``x/../y`` never reaches ``x``)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"{option} {folder} is an existing file, not a folder; give a folder to write "
            "the report into (it is created if needed)"
        )
    prefix = Path(folder.parts[0])
    for part in (None, *folder.parts[1:]):
        if part is not None:
            prefix = prefix / part
        if prefix.is_dir():
            continue
        if prefix.exists() or prefix.is_symlink():  # a file (or a dangling link) in the way
            what = "is a file" if prefix.is_file() else "exists"
            raise UsageError(
                f"{option} {folder} cannot be created: {prefix} {what}, not a folder; "
                "give a folder path whose parents are folders"
            )
        try:
            prefix.mkdir()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UsageError(
                f"{option} {folder} cannot be created ({reason}); give a folder you can write to"
            ) from exc
        created.append(prefix)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder} is not writable; give a folder you can write to")
    return folder


#: Files explain writes into its output folder (one of the two figures).
EXPLAIN_FILES = ("report.html", "summary.json", "mislabel_curve.png", "self_influence.png")


def _check_output_files(out: Path, names: Sequence[str]) -> None:
    """Refuse, before any work, output files that exist as something other than a file (a
    folder named ``report.html`` would get the report written inside it).

    Raises:
        UsageError: naming the path.
    """
    for name in names:
        target = out / name
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise UsageError(
                f"{target} exists and is not a file, and the command writes its {name} there; "
                "move it away or give another --out"
            )


def _cmd_explain(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.projection_dim is not None and args.method != "randproj":
        raise UsageError(f"--projection-dim is for --method randproj, not {args.method}")
    task = load_task(args.task)
    checkpoints = _resolve_checkpoints(args.checkpoints)
    with _output_folder(args.out) as out:
        _check_output_files(out, EXPLAIN_FILES)
        try:
            return _explain(args, task, checkpoints, out, start)
        except Exception as exc:
            load_func = task.options.get("checkpoints_load_func")
            described = _load_func_failure(exc, load_func) if load_func is not None else None
            if described is None:
                raise
            raise TaskFunctionError(described) from exc


def _code_of(func: Any) -> tuple[Any, int]:
    """The code object a call of ``func`` runs, and the position there of the first
    argument the caller passes (1 for a method's ``self``, shifted by the arguments of
    ``functools.partial`` layers); the code is ``None`` when it has none (a builtin)."""
    import functools
    import inspect

    bound = 0  # arguments a partial gives before the caller's
    while isinstance(func, functools.partial):
        bound += len(func.args)
        func = func.func
    with contextlib.suppress(ValueError):  # a cycle of __wrapped__ keeps func as it is
        func = inspect.unwrap(func)
    if inspect.ismethod(func):
        return getattr(func.__func__, "__code__", None), 1 + bound
    code = getattr(func, "__code__", None)
    if code is not None:
        return code, bound
    call = inspect.getattr_static(type(func), "__call__", None)  # a callable object
    return getattr(call, "__code__", None), 1 + bound


def _load_func_failure(exc: BaseException, load_func: Any) -> str | None:
    """A message naming the task's ``checkpoints_load_func`` when ``exc`` (or an
    exception it came from) was raised inside it, with the checkpoint it was loading as
    read from its frame in the traceback; ``None`` when it was not."""
    code, first = _code_of(load_func)
    if code is None:
        return None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is code:
                where = ""
                names = code.co_varnames[: code.co_argcount]
                if len(names) > first + 1:
                    checkpoint = tb.tb_frame.f_locals.get(names[first + 1])
                    if isinstance(checkpoint, (str, os.PathLike)):
                        where = f" while loading checkpoint {os.fspath(checkpoint)}"
                    elif checkpoint is not None:
                        where = f" while loading a checkpoint given as {type(checkpoint).__name__}"
                return (
                    f"the task's checkpoints_load_func raised {type(current).__name__}: "
                    f"{current}{where}"
                )
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return None


def _explain(
    args: argparse.Namespace, task: Task, checkpoints: list[Any], out: Path, start: float
) -> int:
    """The explain command once its inputs are loaded and ``out`` exists."""
    from proponents.checkpoints import load_flexible_state_dict
    from proponents.errors import ArgumentTypeError, InvalidArgumentError
    from proponents.report.analysis import (
        labels_of,
        pick_test_examples,
        predict,
        run_method,
    )
    from proponents.report.builder import build_report, remove_unwritten, write_whole
    from proponents.report.plot import format_detection, require_matplotlib

    require_matplotlib()
    options = task.options
    show = not args.quiet
    batch_size = args.batch_size or options.get("batch_size", 64)
    load_func: Callable[..., Any] = options.get("checkpoints_load_func", load_flexible_state_dict)
    n_train, n_test = len(task.train_dataset), len(task.test_dataset)
    if args.k > n_train:
        raise UsageError(f"--k {args.k} exceeds the {n_train} training examples")

    # The last checkpoint gives the predictions shown (and the similarity method's weights).
    load_func(task.model, checkpoints[-1])
    try:
        train_pred, train_loss = predict(
            task.model, task.train_dataset, task.loss_fn, batch_size, show, "predicting (train)"
        )
    except InvalidArgumentError as exc:  # a loss_fn that gives no loss per example
        raise UsageError(f"task file {task.path}: {exc}") from exc
    test_pred, _ = predict(
        task.model,
        task.test_dataset,
        task.loss_fn,  # how outputs are read; the test losses are not needed
        batch_size,
        show,
        "predicting (test)",
        with_losses=False,
    )
    mislabeled = _indices_option(task, "mislabeled", n_train, "training", allow_mask=True)
    if "test_indices" in options:
        test_indices = _indices_option(task, "test_indices", n_test, "test", allow_mask=False)
        assert test_indices is not None
        bad = [i for i in test_indices if not 0 <= i < n_test]
        if bad:
            raise UsageError(
                f"task file {task.path}: test_indices {bad} are outside the {n_test} test examples"
            )
    else:
        test_labels = labels_of(task.test_dataset)
        n_wrong = (args.examples + 1) // 2
        test_indices = list(
            pick_test_examples(test_labels, test_pred, n_wrong, args.examples - n_wrong)
        )
    try:
        analysis = run_method(
            args.method,
            task.model,
            task.train_dataset,
            task.test_dataset,
            checkpoints,
            task.loss_fn,
            test_indices,
            k=args.k,
            batch_size=batch_size,
            checkpoints_load_func=load_func,
            layers=options.get("layers"),
            final_fc_layer=options.get("final_fc_layer"),
            similarity_layer=options.get("similarity_layer"),
            projection_dim=args.projection_dim,
            sample_wise_grads_per_batch=options.get("sample_wise_grads_per_batch"),
            show_progress=show,
        )
    except (InvalidArgumentError, ArgumentTypeError) as exc:
        # The task's model, layers or loss do not fit the method: a usage problem.
        raise UsageError(f"{args.method} cannot run on this task: {exc}") from exc

    baselines = {"final loss": train_loss} if train_loss is not None else {}
    summary = {
        "task": str(task.path),
        "checkpoints": f"{len(checkpoints)} in {args.checkpoints}",
        "training examples": str(n_train),
        "test examples": str(n_test),
        "method": args.method,
        "k": str(args.k),
    }
    report = build_report(
        task.train_dataset,
        task.test_dataset,
        analysis.proponents,
        analysis.opponents,
        test_indices=test_indices,
        test_predictions=test_pred,  # one per test example, not per shown row
        test_predictions_for="all",
        train_predictions=train_pred,
        self_influence=analysis.suspicion,
        self_influence_name=analysis.suspicion_name,
        mislabeled=mislabeled,
        baselines=baselines if mislabeled is not None else None,
        label_names=options.get("label_names"),
        render=options.get("render"),
        title=f"Influence report: {task.path.name}",
        subtitle=_subtitle(args.method, analysis.uses_checkpoints, len(checkpoints)),
        summary=summary,
        notes=analysis.notes,
        proponents_title=analysis.proponents_title,
        opponents_title=analysis.opponents_title,
        ranking_note=analysis.ranking_note,
        examples_note=analysis.examples_note,
    )
    report_path = report.save(out / "report.html")
    figures = {
        "method": args.method,
        "test_indices": [int(i) for i in test_indices],
        "most_suspicious": report.figures.get("most_suspicious", []),
        "detection": {
            name: {f"{f:g}": v for f, v in values.items()}
            for name, values in report.figures.get("detection", {}).items()
        },
        "seconds": {name: round(v, 3) for name, v in analysis.seconds.items()},
    }
    write_whole(out / "summary.json", (json.dumps(figures, indent=2) + "\n").encode("utf-8"))
    written = {"report.html", "summary.json"}
    if report.figure_png is not None:
        written.add(report.figure_name)
    remove_unwritten(out, EXPLAIN_FILES, written)  # the other figure, of an earlier run

    top = ", ".join(f"#{i}" for i in report.figures.get("most_suspicious", [])[:5])
    print(f"Explained {len(test_indices)} test examples with {args.method} (k={args.k}).")
    print(f"Most suspicious training examples ({analysis.suspicion_name}): {top}")
    if report.figures.get("detection"):
        print("Known-bad labels found when inspecting the most suspicious training examples:")
        print(format_detection(report.figures["detection"]))
    print(f"Report: {report_path}")
    if report.figure_png is not None:
        print(f"Figure: {report_path.parent / report.figure_name}")
    print(f"Time: {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def _subtitle(method: str, uses_checkpoints: bool, n_checkpoints: int) -> str:
    """The report's line under its title: which weights the method read."""
    from proponents.errors import count

    if uses_checkpoints:
        return f"{method} over {count(n_checkpoints, 'checkpoint')}"
    return f"{method} at the final weights (the last of {count(n_checkpoints, 'checkpoint')})"


def _indices_option(task: Task, name: str, n: int, what: str, allow_mask: bool) -> list[int] | None:
    """A task option holding example indices, checked: a non-empty sequence of ints in
    ``[0, n)``, or (``allow_mask``) a possibly empty one or a boolean mask of ``n``
    entries. ``None`` if absent.

    Raises:
        UsageError: naming the option and what is wrong with it.
    """
    import numpy as np

    if name not in task.options:
        return None
    value = task.options[name]
    where = f"task file {task.path}: {name}"
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - described below
        array = np.asarray([None])
    if allow_mask and array.dtype == bool:
        if array.shape != (n,):
            raise UsageError(
                f"{where} is a boolean mask of shape {array.shape}; it must have one entry "
                f"per {what} example ({n})"
            )
        return [int(i) for i in np.flatnonzero(array)]
    if allow_mask and array.ndim == 1 and array.size == 0:
        return []  # NumPy reads [] as floats; no index is known to be bad
    if array.ndim != 1 or array.dtype.kind not in "iu" or (array.size == 0 and not allow_mask):
        kind = "a list of ints or a boolean mask" if allow_mask else "a non-empty list of ints"
        raise UsageError(
            f"{where} must be {kind} (positions of {what} examples), got {value!r:.80}"
        )
    out = [int(i) for i in array]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise UsageError(f"{where} {bad[:10]} are outside the {n} {what} examples")
    return out


def _import_torch_whole() -> None:
    """Import torch with Ctrl-C held back until it is done (POSIX).

    An interrupt in the middle of torch's native initialisation aborts the process
    (``terminate called ... KeyboardInterrupt``, exit 134) or leaves NumPy half imported;
    held back, it arrives right after the import, as a plain ``KeyboardInterrupt``.
    """
    import signal

    if "torch" in sys.modules or not hasattr(signal, "pthread_sigmask"):
        import torch  # noqa: F401

        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``proponents`` command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 1 runtime failure, 2 usage problem, 130 interrupted.
    """
    try:
        _import_torch_whole()
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("proponents: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        with _warnings_as_lines(args.command):
            return int(args.handler(args))
    except UsageError as exc:
        _report_error(args, exc, f"proponents {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("proponents: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and exit code 1
        from proponents.errors import ProponentsError

        plain = isinstance(exc, (ProponentsError, TaskFunctionError))
        kind = "" if plain else f"{type(exc).__name__}: "
        hint = "" if args.traceback else " (run with --traceback for details)"
        _report_error(args, exc, f"proponents {args.command}: failed: {kind}{exc}{hint}")
        return EXIT_FAILURE


@contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """Print each warning raised meanwhile as one ``proponents COMMAND: warning: ...``
    line on stderr, not as Python's ``file:line: Category: ...`` and source line (which
    names the console script, the only frame outside the library)."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        print(f"proponents {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # restores the filters and showwarning after
        warnings.showwarning = show
        yield


def _report_error(args: argparse.Namespace, exc: BaseException, message: str) -> None:
    if getattr(args, "traceback", False):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(message, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
