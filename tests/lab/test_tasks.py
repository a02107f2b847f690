"""The lab's tasks: MNIST-1D generated offline and per seed, its reference models, and plug-in
tasks ``module:function`` with clear errors for bad ones."""

from __future__ import annotations

import json
import random
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lab.tasks as tasks
from lab.cli import main
from lab.tasks import Task, check_task_model, load_task, resolve_task
from lab.train import TrainConfig, train

mnist1d_data = pytest.importorskip("mnist1d.data")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no download helper, and an empty current directory to check for files."""

    def refuse(*args, **kwargs):
        raise AssertionError("network or download helper used")

    import requests

    monkeypatch.setattr(mnist1d_data, "get_dataset", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    tasks._mnist1d.cache_clear()  # generate for real inside the test
    yield tmp_path
    tasks._mnist1d.cache_clear()


def test_mnist1d_is_generated_offline_and_deterministic_per_seed(offline):
    numpy_state, python_state = np.random.get_state(), random.getstate()
    first = load_task("mnist1d@200", seed=3)
    tasks._mnist1d.cache_clear()
    again = load_task("mnist1d@200", seed=3)
    other = load_task("mnist1d@200", seed=4)
    assert list(offline.iterdir()) == []  # nothing cached on disk
    # The caller's global generators are left as they were (the package reseeds them).
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))

    assert first.x_train.shape == (160, 40) and first.x_test.shape == (40, 40)
    assert first.x_train.dtype == torch.float32 and first.y_train.dtype == torch.int64
    assert set(first.y_train.tolist()) | set(first.y_test.tolist()) == set(range(10))
    assert first.num_classes == 10 and first.name == "mnist1d@200"
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, key), getattr(again, key))
    assert not torch.equal(first.x_train, other.x_train)  # the seed reaches the generator

    # The package's own generator with the same arguments gives the same data.
    args = mnist1d_data.get_dataset_args()
    args.num_samples, args.seed, args.train_split = 200, 3, 0.8
    reference = mnist1d_data.make_dataset(args)
    assert torch.equal(first.x_train, torch.tensor(reference["x"], dtype=torch.float32))
    assert torch.equal(first.y_test, torch.tensor(reference["y_test"]))


def test_mnist1d_default_size_and_bad_sizes():
    assert tasks._mnist1d_samples("mnist1d") == 5000
    assert tasks._mnist1d_samples("mnist1d@1200") == 1200
    for spec, message in (("mnist1d@ten", "must be an integer"), ("mnist1d@5", ">= 20")):
        with pytest.raises(ValueError, match=message):
            load_task(spec, 0)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mnist1d_reference_models():
    """Sizes from the paper's definitions: MLP 40·100+100 + 100·100+100 + 100·10+10 = 15,210;
    CNN 1·25·5+25 + 2·(25·25·3+25) + 25·5·10+10 = 5,210 (length 40 → 19 → 10 → 5)."""
    task = load_task("mnist1d@100", 0)
    torch.manual_seed(0)
    mlp, cnn = task.make_model("mlp"), task.make_model("cnn")
    assert _count(mlp) == 15210
    assert _count(cnn) == 5210
    assert cnn(task.x_test).shape == (20, 10)
    # The MLP's second hidden layer is residual: h2 = h1 + relu(W2 h1 + b2), in float64.
    x = task.x_test.double()
    weights = {name: p.detach().double() for name, p in mlp.named_parameters()}
    h1 = torch.relu(x @ weights["linear1.weight"].T + weights["linear1.bias"])
    h2 = h1 + torch.relu(h1 @ weights["linear2.weight"].T + weights["linear2.bias"])
    expected = h2 @ weights["linear3.weight"].T + weights["linear3.bias"]
    torch.testing.assert_close(mlp.double()(x), expected, rtol=1e-12, atol=1e-12)


def test_mnist1d_cnn_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "m1d"
    code = main(["compare", "--task", "mnist1d@300", "--model", "cnn", "--epochs", "2",
                 "--seeds", "1", "--batch-size", "100", "--optimizers", "adamw,e-adamw",
                 "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 240
    assert summary["runs"][0]["steps"] == 2 * (240 // 100)


def test_digits_and_synthetic_unchanged():
    digits = load_task("digits", 0)
    assert digits.x_train.shape == (1437, 64) and digits.image_shape == (8, 8)
    assert load_task("synthetic", 1).x_train.shape == (4000, 32)
    assert resolve_task("digits", 0).y_test.equal(digits.y_test)
    with pytest.raises(ValueError, match="image task"):
        check_task_model("synthetic", "cnn")
    check_task_model("mnist1d", "cnn")
    check_task_model("mnist1d@400", "mlp")


# -- plug-ins -----------------------------------------------------------------------------------


def test_the_example_plugin(monkeypatch):
    monkeypatch.chdir(ROOT)
    for spec in ("examples/custom_task.py:make_task", "examples.custom_task:make_task"):
        task = load_task(spec, seed=5)
        assert isinstance(task, Task) and task.name == "spirals"
        assert task.x_train.shape == (1600, 2) and task.y_test.shape == (400,)
        assert task.model_names() == ["polar", "tiny_mlp", "mlp"]
        again = load_task(spec, seed=5)
        assert torch.equal(task.x_train, again.x_train)
        assert not torch.equal(task.x_train, load_task(spec, seed=6).x_train)
    result = train("adamw", TrainConfig(task="examples/custom_task.py:make_task", model="polar",
                                        epochs=2, batch_size=512, warmup_epochs=0), seed=0)
    assert result.steps == 2 * (1600 // 512)


def test_plugin_through_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "plug"
    code = main(["compare", "--task", "examples.custom_task:make_task", "--model", "tiny_mlp",
                 "--epochs", "1", "--seeds", "1", "--optimizers", "sgd", "--quiet",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["n_train"] == 1600


PLUGINS = '''
import torch
from lab.tasks import Task

def as_dict(seed):
    return {"x": torch.zeros(4, 2)}

def bad_labels(seed):
    x = torch.zeros(6, 2)
    return Task("bad", x, torch.tensor([0, 1, 2, 0, 1, 5]), x, torch.zeros(6, dtype=torch.long),
                num_classes=3)

def float_labels(seed):
    x = torch.zeros(6, 2)
    return Task("bad", x, torch.zeros(6), x, torch.zeros(6, dtype=torch.long), num_classes=3)

def good(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return Task("good", x[:30], y[:30], x[30:], y[30:], num_classes=2,
                models={"lin": lambda: torch.nn.Linear(3, 2), "broken": lambda: 3})

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(textwrap.dedent(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


BAD_SPECS = [
    (["--task", "no_such_module_xyz:make"], "argument --task: task 'no_such_module_xyz:make': "
                                            "cannot import module 'no_such_module_xyz'"),
    (["--task", "my_plugins:missing"], "argument --task: task 'my_plugins:missing': module "
                                       "'my_plugins' has no attribute 'missing'"),
    (["--task", "my_plugins:NOT_A_FUNCTION"], "argument --task: task "
                                              "'my_plugins:NOT_A_FUNCTION': "
                                              "my_plugins:NOT_A_FUNCTION is a int, not a function"),
    (["--task", "nofile.py:make"], "argument --task: task 'nofile.py:make': no such file"),
    (["--task", "my_plugins:"], "a plug-in task is module:function"),
    (["--task", "my_plugins:as_dict"], "task 'my_plugins:as_dict': as_dict(seed=0) returned "
                                       "dict, expected lab.tasks.Task"),
    (["--task", "my_plugins:bad_labels"], "y_train must lie in 0 … 2, got 0 … 5"),
    (["--task", "my_plugins:float_labels"], "y_train must be int64 class labels"),
    (["--task", "my_plugins:good", "--model", "nope"], "unknown model 'nope' for task 'good'"),
    (["--task", "my_plugins:good", "--model", "broken"], "models['broken']() returned int"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_SPECS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_bad_plugin_is_one_line(plugins, argv, message, capsys):
    code = main(["compare", "--epochs", "1", "--seeds", "1", "--quiet", *argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("explore: error: ")
    assert message in lines[0]


def test_good_plugin_with_its_own_model(plugins):
    task = load_task("my_plugins:good", 2)
    assert task.model_names() == ["lin", "broken", "mlp"]
    result = train("sgd", TrainConfig(task="my_plugins:good", model="lin", epochs=1,
                                      batch_size=100, warmup_epochs=0), seed=2)
    assert result.steps == 1 and result.batch_size == 30
