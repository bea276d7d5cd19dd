"""Models: parameter counts of docs/algorithms.md section 2.4, forward/backward for every model x
dataset pair, no BatchNorm/Dropout, model/dataset mismatches as config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedmpi import config, data, models
from fedmpi.config import ConfigError, DataConfig, ModelConfig

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


@pytest.mark.parametrize("name, shape, classes, count", [
    ("mlp", MNIST, 10, 199_210),            # MNIST / FMNIST
    ("mlp", MNIST, 62, 209_662),            # EMNIST byclass
    ("mnistnet", MNIST, 10, 300_426),
    ("mnistnet", MNIST, 62, 303_806),
    ("convnet", CIFAR, 10, 31_594),
    ("resnet18", CIFAR, 10, 11_169_162),
    ("resnet18", CIFAR, 100, 11_215_332),
    ("regnetx_200mf", CIFAR, 10, 2_312_690),
    ("vgg11star", CIFAR, 10, 2_440_394),
    # not in the table: LeNet-5 by hand, 450+6 + 2400+16 + 48000+120 + 10080+84 + 840+10
    ("lenet5", CIFAR, 10, 62_006),
    # ConvNet on 1-channel inputs: the first conv has 1*32*9+32 instead of 3*32*9+32
    ("convnet", MNIST, 10, 31_594 - 576),
])
def test_parameter_counts(name, shape, classes, count):
    module = models.build_module(ModelConfig(name=name), shape, classes, seed=0)
    assert sum(p.numel() for p in module.parameters()) == count
    assert models.FlatModel(module).d == count


DATASET_CFGS = {
    "mnist": DataConfig(dataset="mnist", partition="iid"),
    "fmnist": DataConfig(dataset="fmnist", partition="iid"),
    "emnist": DataConfig(dataset="emnist", partition="iid"),
    "emnist-letters": DataConfig(dataset="emnist", partition="iid", emnist_split="letters"),
    "cifar10": DataConfig(dataset="cifar10", partition="iid"),
    "cifar100": DataConfig(dataset="cifar100", partition="iid"),
    "synthetic": DataConfig(),
}


def _fits(name: str, info: data.DatasetInfo) -> bool:
    return models.fit_error(ModelConfig(name=name), info.input_shape, info.num_classes) is None


ALL_PAIRS = [(m, d) for m in models.MODELS for d in DATASET_CFGS]


@pytest.mark.parametrize("name, ds", ALL_PAIRS, ids=[f"{m}-{d}" for m, d in ALL_PAIRS])
def test_forward_backward_or_clear_mismatch(name, ds):
    """Every pair either trains one step (finite loss, a gradient on every parameter) or
    fit_error says why not, and fit_error agrees with a real forward pass."""
    info = data.info(DATASET_CFGS[ds])
    x = torch.randn(3, *info.input_shape)
    if not _fits(name, info):
        with pytest.raises((RuntimeError, ValueError)):
            models.build_module(ModelConfig(name=name), info.input_shape, info.num_classes,
                                1)(x)
        return
    module = models.build_module(ModelConfig(name=name), info.input_shape, info.num_classes, 1)
    flat = models.FlatModel(module)
    out = flat(x)
    assert out.shape == (3, info.num_classes)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, info.num_classes - 1]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(flat.grad).all()
    for pname, p in module.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), pname


@pytest.mark.parametrize("name, ds", [
    ("mlp", "mnist"), ("mnistnet", "mnist"), ("mnistnet", "fmnist"), ("mnistnet", "emnist"),
    ("convnet", "mnist"), ("convnet", "cifar10"), ("convnet", "cifar100"),
    ("resnet18", "cifar10"), ("resnet18", "cifar100"), ("regnetx_200mf", "cifar10"),
    ("regnetx_200mf", "cifar100"), ("vgg11star", "cifar10"), ("lenet5", "cifar10"),
    ("logreg", "synthetic"), ("mlp", "synthetic"),
])
def test_paper_pairs_fit(name, ds):
    assert _fits(name, data.info(DATASET_CFGS[ds]))


@pytest.mark.parametrize("name, ds, shape", [
    ("mnistnet", "cifar10", "3x32x32"), ("resnet18", "mnist", "1x28x28"),
    ("regnetx_200mf", "fmnist", "1x28x28"), ("vgg11star", "emnist", "1x28x28"),
    ("lenet5", "mnist", "1x28x28"), ("convnet", "synthetic", "60"),
    ("mnistnet", "synthetic", "60"),
])
def test_mismatch_is_a_config_error_on_model_name(name, ds, shape):
    overrides = [f"model.name={name}", f"data.dataset={ds}"]
    if ds != "synthetic":
        overrides.append("data.partition=iid")
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert err.value.key == "model.name"
    assert name in str(err.value) and shape in str(err.value) and ds in str(err.value)


def test_no_batchnorm_no_dropout_anywhere():
    for name in models.MODELS:
        shape = MNIST if name in ("mnistnet",) else CIFAR
        module = models.build_module(ModelConfig(name=name), shape, 10, 0)
        kinds = {type(m) for m in module.modules()}
        assert not any(issubclass(k, (nn.modules.batchnorm._BatchNorm, nn.Dropout,
                                      nn.LayerNorm)) for k in kinds), name
        if name == "regnetx_200mf":  # GroupNorm(8) in each projection shortcut only
            norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
            assert len(norms) == 4 and all(m.num_groups == 8 for m in norms)
        elif name == "convnet":
            norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
            assert len(norms) == 1 and norms[0].num_groups == 32
        else:
            assert nn.GroupNorm not in kinds, name


def test_convnet_shares_one_groupnorm_across_its_four_blocks():
    module = models.build_module(ModelConfig(name="convnet"), CIFAR, 10, 0)
    calls = []
    norm = next(m for m in module.modules() if isinstance(m, nn.GroupNorm))
    norm.register_forward_hook(lambda *a: calls.append(1))
    module(torch.zeros(1, *CIFAR))
    assert len(calls) == 4


def test_every_conv_and_linear_has_a_bias():
    for name in ("mnistnet", "convnet", "resnet18", "regnetx_200mf", "vgg11star", "lenet5"):
        shape = MNIST if name == "mnistnet" else CIFAR
        for m in models.build_module(ModelConfig(name=name), shape, 10, 0).modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                assert m.bias is not None, name


def test_vgg11star_init_as_in_the_3sfc_code():
    module = models.build_module(ModelConfig(name="vgg11star"), CIFAR, 10, 3)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    big = convs[-1]  # 256 -> 256: 589,824 weights, std sqrt(2 / (9 * 256))
    assert float(big.weight.detach().std()) == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in convs)


def test_build_is_seeded_and_leaves_the_global_stream_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.FlatModel(models.build_module(ModelConfig(name="lenet5"), CIFAR, 10, 7))
    after = torch.rand(1)
    b = models.FlatModel(models.build_module(ModelConfig(name="lenet5"), CIFAR, 10, 7))
    c = models.FlatModel(models.build_module(ModelConfig(name="lenet5"), CIFAR, 10, 8))
    assert torch.equal(before, after)
    assert torch.equal(a.params, b.params) and not torch.equal(a.params, c.params)


def test_flops_of_mnistnet_by_hand():
    module = models.build_module(ModelConfig(name="mnistnet"), MNIST, 10, 0)
    conv1 = 2 * 9 * 1 * 16 * 26 * 26
    conv2 = 2 * 9 * 16 * 32 * 24 * 24
    fc = 2 * (4608 * 64 + 64 * 10)
    assert models.flops_per_sample(module, MNIST) == conv1 + conv2 + fc


SHAPES = [(1, 28, 28), (3, 32, 32), (60,), (3, 28, 28), (1, 32, 32), (3, 64, 64), (3, 36, 36),
          (3, 16, 16), (1, 29, 29), (3, 33, 33), (2, 30, 30), (3, 7, 7)]


@pytest.mark.parametrize("name", list(models.MODELS))
def test_fit_error_agrees_with_a_real_forward_pass(name):
    """fit_error is shape arithmetic; it must say yes exactly where a forward pass works."""
    shared = None
    for shape in SHAPES:
        try:
            if name in ("mlp", "logreg", "convnet"):  # their layers depend on the shape
                module = models.build_module(ModelConfig(name=name), shape, 7, 0)
            else:
                shared = shared or models.build_module(ModelConfig(name=name), shape, 7, 0)
                module = shared
            with torch.no_grad():
                works = tuple(module(torch.zeros(2, *shape)).shape) == (2, 7)
        except (RuntimeError, ValueError):
            works = False
        assert (models.fit_error(ModelConfig(name=name), shape, 7) is None) == works, shape


def test_fit_error_names_the_model_and_the_shape():
    msg = models.fit_error(ModelConfig(name="resnet18"), (1, 28, 28), 10)
    assert msg is not None and "resnet18" in msg and "1x28x28" in msg
    assert models.fit_error(ModelConfig(name="resnet18"), (3, 32, 32), 100) is None


# ------------------------------------------------------------- hand-written backprop


def _flat(name: str, shape: tuple[int, ...], classes: int, hidden: int = 200
          ) -> models.FlatModel:
    cfg = ModelConfig(name=name, hidden=hidden)
    return models.FlatModel(models.build_module(cfg, shape, classes, seed=3))


@pytest.mark.parametrize("name, shape, classes", [
    ("mlp", (1, 28, 28), 10), ("mlp", (60,), 10), ("logreg", (60,), 10),
    ("logreg", (3, 32, 32), 100), ("mlp", (3, 32, 32), 100)])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dense_backprop_equals_autograd(name, shape, classes, batch):
    model = _flat(name, shape, classes)
    g = torch.Generator().manual_seed(batch)
    model.params.add_(0.05 * torch.randn(model.d, generator=g))  # not just the init
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    model.use_backprop("autograd")
    assert model.dense is None
    model.grad.fill_(7.0)  # loss_grad overwrites, it does not accumulate
    want_loss = model.loss_grad(x, y)
    want = model.grad.clone()
    model.use_backprop("dense")
    assert model.dense is not None
    model.grad.fill_(7.0)
    loss = model.loss_grad(x, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.grad, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert float(want.abs().max()) > 0


def test_dense_backprop_follows_the_weights_it_views():
    """The hand-written path reads the flat parameter vector (``load`` and in-place SGD
    steps move it) and writes the flat gradient vector."""
    model = _flat("mlp", (12,), 4, hidden=8)
    model.use_backprop("dense")
    x, y = torch.randn(5, 12), torch.tensor([0, 1, 2, 3, 0])
    model.loss_grad(x, y)
    first = model.grad.clone()
    model.load(model.params * 2.0)
    model.loss_grad(x, y)
    dense = model.grad.clone()
    model.use_backprop("autograd")
    model.loss_grad(x, y)
    torch.testing.assert_close(dense, model.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(first, dense)


@pytest.mark.parametrize("name, shape", [("mlp", (1, 28, 28)), ("logreg", (60,))])
def test_sgd_step_fused_into_the_dense_backward_equals_a_gradient_step(name, shape):
    """sgd_step: with the hand-written backprop, 30 fused steps (each layer's weights
    stepped inside the product that forms its gradient, after the error below it is
    taken) track loss_grad + params -= lr grad to float rounding, and leave the gradient
    buffer alone; with autograd it is exactly loss_grad and the update."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 16, *shape, generator=g)
    y = torch.randint(0, 10, (30, 16), generator=g)
    lr = 0.3
    fused, stepped = _flat(name, shape, 10, hidden=32), _flat(name, shape, 10, hidden=32)
    fused.use_backprop("dense")
    stepped.use_backprop("dense")
    fused.grad.fill_(7.0)
    for k in range(30):
        loss = fused.sgd_step(x[k], y[k], lr)
        want = stepped.loss_grad(x[k], y[k])
        stepped.params.add_(stepped.grad, alpha=-lr)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.params, stepped.params, rtol=1e-4, atol=1e-6)
    assert not torch.equal(fused.params, _flat(name, shape, 10, hidden=32).params)  # moved
    assert bool((fused.grad == 7.0).all())
    auto, ref = _flat(name, shape, 10, hidden=32), _flat(name, shape, 10, hidden=32)
    auto.use_backprop("autograd")
    ref.use_backprop("autograd")
    for k in range(3):
        auto.sgd_step(x[k], y[k], lr)
        ref.loss_grad(x[k], y[k])
        with torch.no_grad():
            ref.params.add_(ref.grad, alpha=-lr)
    assert torch.equal(auto.params, ref.params)


@pytest.mark.parametrize("name, dense", [("mlp", True), ("logreg", True), ("mnistnet", False),
                                         ("convnet", False), ("lenet5", False)])
def test_auto_backprop_is_dense_exactly_for_dense_chains(name, dense):
    shape = (3, 32, 32) if name == "lenet5" else (1, 28, 28)
    model = _flat(name, shape, 10)
    assert (models.dense_layers(model.module) is not None) == dense
    assert name in models.DENSE if dense else name not in models.DENSE
    model.use_backprop("auto")
    assert (model.dense is not None) == dense
    if not dense:
        with pytest.raises(ValueError, match="dense"):
            model.use_backprop("dense")
    with pytest.raises(ValueError, match="unknown backprop"):
        model.use_backprop("fast")


@pytest.mark.parametrize("module", [
    nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),  # not ReLU
    nn.Sequential(nn.Linear(4, 3, bias=False)),  # no bias
    nn.Sequential(nn.Linear(4, 3), nn.ReLU()),  # ends in an activation
    nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Dropout(), nn.Linear(3, 2)),
    nn.Linear(4, 3),  # not a Sequential
])
def test_dense_layers_refuses_other_modules(module):
    assert models.dense_layers(module) is None


def test_backprop_dense_on_a_convolutional_model_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        config.load(None, ["data.dataset=mnist", "data.partition=dirichlet",
                           "model.name=mnistnet", "client.backprop=dense"])
    assert err.value.key == "client.backprop"
    cfg = config.load(None, ["data.dataset=mnist", "data.partition=dirichlet",
                             "model.name=mnistnet", "client.backprop=auto"])
    assert cfg.client.backprop == "auto"
