"""Models and a flat-vector view of their parameters.

The image models are those of the 3SFC code (Zhou et al., "Communication-Efficient
Federated Learning with Single-Step Synthetic Features Compressor for Faster
Convergence", ICCV 2023; ``Soptq/iccv23-3sfc``, ``models/*.py``), which removes every
BatchNorm and Dropout layer; all convolutions and linear layers carry a bias. Parameter
counts are pinned by the tests (docs/algorithms.md section 2.4).

* ``mlp``: ``Linear(D_in, 200) - ReLU - Linear(200, 200) - ReLU - Linear(200, C)`` on the
  flattened input (``model.hidden`` = 200): 199,210 parameters on MNIST, 209,662 on
  EMNIST-byclass. D_in comes from the dataset (the 3SFC code fixes 784).
* ``logreg``: multinomial logistic regression, the model of FedProx's Synthetic(a, b).
* ``mnistnet``: ``Conv(1,16,3) - ReLU - Conv(16,32,3) - MaxPool2 - Linear(4608,64) - ReLU -
  Linear(64,C)``; 1x28x28 inputs only. 300,426 parameters on MNIST, 303,806 on EMNIST.
* ``convnet``: 4 x [Conv3x3(->32, padding 2) -> GroupNorm(32, 32) -> ReLU -> MaxPool2] with
  *one* GroupNorm module shared by the four blocks, then ``Linear(288, C)``. The input
  channels come from the dataset (the 3SFC factory passes 3; the class takes any), and
  the input must end as 32x3x3 (true for 28x28 and 32x32). 31,594 parameters on CIFAR-10.
* ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2,2,2,2] of
  widths 64-128-256-512, 1x1 conv projection shortcuts, 4x4 average pool,
  ``Linear(512, C)``) with all BatchNorm removed; 3x32x32 inputs. 11,169,162 parameters
  on CIFAR-10, 11,215,332 on CIFAR-100.
* ``regnetx_200mf``: RegNetX-200MF (stem Conv3x3(3->64); stages of depths [1,1,4,7],
  widths [24,56,152,368], strides [1,1,2,2]; X blocks 1x1 -> grouped 3x3 (group width 8)
  -> 1x1, bottleneck ratio 1, no SE), no BatchNorm except GroupNorm(8) after the 1x1 conv
  of each projection shortcut; global average pool, ``Linear(368, C)``; 3-channel inputs.
  2,312,690 parameters on CIFAR-10.
* ``vgg11star``: "VGG11*" of the 3SFC code: conv3x3 widths
  [32,M,64,M,128,128,M,256,256,M,256,256,M] (M = MaxPool2) with ReLU, then
  ``Linear(256,256) - ReLU - Linear(256,256) - ReLU - Linear(256,C)``; convolution weights
  drawn from N(0, 2 / (9 * out_channels)) with zero bias as in that code; 3x32x32 inputs.
  2,440,394 parameters on CIFAR-10.
* ``lenet5``: the 3-channel LeNet-5 of the 3SFC code: ``Conv(3,6,5) - ReLU - MaxPool2 -
  Conv(6,16,5) - ReLU - MaxPool2 - Linear(400,120) - ReLU - Linear(120,84) - ReLU -
  Linear(84,C)``; 3x32x32 inputs.

Every model takes its input shape and class count from the dataset; :func:`fit_error`
says (by shape arithmetic, building nothing) whether a model accepts a dataset's input
shape, and the config check turns a mismatch into a ``ConfigError`` on ``model.name``.

:class:`FlatModel` re-seats every parameter (and its gradient) as a view into one
contiguous fp32 vector, so "load the global model", "compute the update" and "take an SGD
step" are single vector operations, and the flat order is the order of
``module.parameters()``. :meth:`FlatModel.loss_grad` is the one place a minibatch's
cross-entropy gradient is taken (local training, SAM's ascent): by autograd, or for a
chain of dense layers (``mlp``, ``logreg``) by hand (:class:`DenseBackprop`,
``client.backprop``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmpi import registry
from fedmpi.config import ModelConfig
from fedmpi.optim import descend_, descend_product_


def mlp(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    d_in = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, num_classes),
    )


def logreg(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))


def mnistnet(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 12 * 12, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


class ConvNet(nn.Module):
    """Four conv blocks sharing one GroupNorm/ReLU/MaxPool module, then one linear layer."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=2) for i in range(4))
        self.norm_act_pool = nn.Sequential(nn.GroupNorm(width, width), nn.ReLU(),
                                           nn.MaxPool2d(2))
        self.fc = nn.Linear(width * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.norm_act_pool(conv(x))
        return self.fc(x.flatten(1))


def convnet(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"convnet needs CxHxW images, not inputs of shape {input_shape}")
    return ConvNet(input_shape[0], num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block without BatchNorm: relu(conv2(relu(conv1 x)) + shortcut x)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride=stride)
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(F.avg_pool2d(x, 4).flatten(1))


def resnet18(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    return ResNet18(num_classes)


class XBlock(nn.Module):
    """RegNetX block without BatchNorm (bottleneck ratio 1, no squeeze-excitation)."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1,
                               groups=c_out // group_width)
        self.conv3 = nn.Conv2d(c_out, c_out, 1)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride),
                                       nn.GroupNorm(8, c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RegNetX200MF(nn.Module):
    DEPTHS, WIDTHS, STRIDES, GROUP_WIDTH = (1, 1, 4, 7), (24, 56, 152, 368), (1, 1, 2, 2), 8

    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        blocks, c_in = [], 64
        for depth, width, stride in zip(self.DEPTHS, self.WIDTHS, self.STRIDES, strict=True):
            for i in range(depth):
                blocks.append(XBlock(c_in, width, stride if i == 0 else 1, self.GROUP_WIDTH))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(self.WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def regnetx_200mf(input_shape: tuple[int, ...], num_classes: int,
                  cfg: ModelConfig) -> nn.Module:
    return RegNetX200MF(num_classes)


VGG11STAR = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")


def vgg11star(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG11STAR:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            conv = nn.Conv2d(c_in, v, 3, padding=1)
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (9 * v)))
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers, nn.Flatten(),
                         nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, num_classes))


def lenet5(input_shape: tuple[int, ...], num_classes: int, cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


ModelFactory = Callable[[tuple[int, ...], int, ModelConfig], nn.Module]
MODELS: dict[str, ModelFactory] = {
    "mlp": mlp, "logreg": logreg, "mnistnet": mnistnet, "convnet": convnet,
    "resnet18": resnet18, "regnetx_200mf": regnetx_200mf, "vgg11star": vgg11star,
    "lenet5": lenet5,
}

def _image(shape: tuple[int, ...], channels: int | None = None) -> bool:
    return len(shape) == 3 and min(shape) >= 1 and (channels is None or shape[0] == channels)


def _side(s: int, stages: list[tuple[int, int, int]]) -> int:
    """Side of a feature map after (kernel, stride, padding) stages; pools are (2, 2, 0)."""
    for k, stride, pad in stages:
        s = (s + 2 * pad - k) // stride + 1
        if s < 1:
            return 0
    return s


def _sides(shape: tuple[int, ...], stages: list[tuple[int, int, int]]) -> tuple[int, int]:
    return _side(shape[1], stages), _side(shape[2], stages)


POOL = (2, 2, 0)
#: per model: what it accepts (for the message) and the test on an input shape. The tests
#: check these against real forward passes.
INPUTS: dict[str, tuple[str, Callable[[tuple[int, ...]], bool]]] = {
    "mlp": ("any input (flattened)", lambda s: len(s) >= 1),
    "logreg": ("any input (flattened)", lambda s: len(s) >= 1),
    "mnistnet": ("1x28x28 images", lambda s: _image(s, 1) and _sides(
        s, [(3, 1, 0), (3, 1, 0), POOL]) == (12, 12)),
    "convnet": ("CxHxW images that end as 3x3 maps (28x28, 32x32)", lambda s: _image(s) and
                _sides(s, [(3, 1, 2), POOL] * 4) == (3, 3)),
    "resnet18": ("3x32x32 images", lambda s: _image(s, 3) and _sides(
        s, [(3, 1, 1)] + [(3, 2, 1)] * 3 + [(4, 4, 0)]) == (1, 1)),
    "regnetx_200mf": ("3-channel images", lambda s: _image(s, 3)),
    "vgg11star": ("3x32x32 images", lambda s: _image(s, 3) and _sides(s, [POOL] * 5) == (1, 1)),
    "lenet5": ("3x32x32 images", lambda s: _image(s, 3) and _sides(
        s, [(5, 1, 0), POOL, (5, 1, 0), POOL]) == (5, 5)),
}


def fit_error(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> str | None:
    """None if ``cfg.name`` accepts inputs of ``input_shape`` (every model sizes its output
    layer to ``num_classes``), else why not. Shape arithmetic only: nothing is built."""
    shape = tuple(int(s) for s in input_shape)
    what, accepts = INPUTS[cfg.name]
    if num_classes >= 1 and accepts(shape):
        return None
    return (f"{cfg.name} takes {what}, not inputs of shape {'x'.join(map(str, shape))}"
            + ("" if num_classes >= 1 else f" and {num_classes} classes"))


def build_module(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int,
                 seed: int) -> nn.Module:
    """Instantiate ``cfg.name`` with its default init drawn from a private seeded stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[cfg.name](tuple(input_shape), num_classes, cfg)


def flops_per_sample(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of one forward pass (Linear and Conv layers), by tracing shapes."""
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            total += 2 * k * output[0].numel()

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            p = next(module.parameters())
            module(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
    return total


#: models that are chains of dense layers (:func:`dense_layers`)
DENSE = ("mlp", "logreg")

# the names fedmpi.config accepts, and its check that a model fits a dataset
registry.provide(models=MODELS, dense=DENSE, model_fit_error=fit_error)


def dense_layers(module: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``Sequential([Flatten,] Linear, ReLU, Linear, ..., ReLU,
    Linear)`` with biases and no other parameters, in order; None for any other module."""
    mods = list(module.children()) if isinstance(module, nn.Sequential) else []
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    linears, acts = mods[0::2], mods[1::2]
    params = list(module.parameters())
    ok = (bool(linears) and len(linears) == len(acts) + 1
          and all(type(m) is nn.Linear and m.bias is not None for m in linears)
          and all(type(a) is nn.ReLU for a in acts)
          and len(params) == 2 * len(linears)
          and all(p is q for p, q in zip(
              params, [t for m in linears for t in (m.weight, m.bias)], strict=True)))
    return linears if ok else None


class DenseBackprop:
    """Mean cross-entropy of a minibatch and its gradient for a chain of dense layers
    (:func:`dense_layers`), written by hand into the gradient buffer, without autograd:

        a_0 = flatten(x),  h_l = a_{l-1} W_l^T + b_l,  a_l = relu(h_l),  z = h_L
        loss = mean_n(-log_softmax(z)[n, y_n]),  e_L = (softmax(z) - onehot(y)) / N
        dW_l = e_l^T a_{l-1},  db_l = sum_n e_l,  e_{l-1} = (e_l W_l) * [a_{l-1} > 0]

    The same matrix products autograd runs (no input gradient for the first layer), minus
    the graph: on this machine's CPU an MNIST MLP step at batch 64 takes about two
    thirds of the autograd step's time (``python -m fedmpi.bench perf``). Equal to
    autograd's loss and gradient up to float rounding (``tests/test_models.py``).
    """

    def __init__(self, linears: list[nn.Linear]):
        self.weights = [m.weight.data for m in linears]
        self.biases = [m.bias.data for m in linears]
        self.weight_grads = [m.weight.grad for m in linears]
        self.bias_grads = [m.bias.grad for m in linears]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float | None = None
                 ) -> torch.Tensor:
        """The loss; the gradient goes into the gradient buffer, or with ``lr`` straight
        into the weights as a plain SGD step (:mod:`fedmpi.optim`: W_l -= lr dW_l inside
        the product that forms dW_l, b_l -= lr db_l; the gradient buffer is left
        alone): 4-6% of an MNIST MLP step saved, one pass over the d weights fewer.
        Equal to the gradient followed by ``params -= lr grad`` up to float rounding."""
        n = x.shape[0]
        acts = [x.reshape(n, -1)]
        last = len(self.weights) - 1
        for w, b in zip(self.weights[:last], self.biases[:last], strict=True):
            acts.append(torch.addmm(b, acts[-1], w.t()).relu_())
        logp = torch.log_softmax(torch.addmm(self.biases[last], acts[-1],
                                             self.weights[last].t()), 1)
        picked = logp.gather(1, y.view(-1, 1))
        loss = picked.mean().neg()
        e = logp.exp_()  # softmax
        e.scatter_add_(1, y.view(-1, 1), torch.full_like(picked, -1.0)).div_(n)
        for i in range(last, -1, -1):
            # e_{l-1} from W_l before any step changes it
            back = (torch.ops.aten.threshold_backward(e.mm(self.weights[i]), acts[i], 0)
                    if i else None)
            if lr is None:
                torch.mm(e.t(), acts[i], out=self.weight_grads[i])
                torch.sum(e, 0, out=self.bias_grads[i])
            else:  # the plain step of fedmpi.optim, fused
                descend_product_(self.weights[i], e.t(), acts[i], lr)
                descend_(self.biases[i], e.sum(0), lr)
            e = back
        return loss


class FlatModel:
    """A module whose parameters and gradients are views into two flat fp32 vectors."""

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu"):
        self.module = module.to(device)
        self.device = torch.device(device)
        params = list(self.module.parameters())
        self.shapes = [tuple(p.shape) for p in params]
        self.d = sum(p.numel() for p in params)
        self.params = torch.empty(self.d, dtype=torch.float32, device=self.device)
        self.grad = torch.zeros(self.d, dtype=torch.float32, device=self.device)
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n
        self.dense: DenseBackprop | None = None  # set by use_backprop

    def use_backprop(self, mode: str) -> None:
        """``client.backprop``: ``autograd``; ``dense`` (:class:`DenseBackprop`; the model
        must be a dense chain); ``auto`` = dense where the model is one."""
        if mode not in ("auto", "autograd", "dense"):
            raise ValueError(f"unknown backprop mode {mode!r}")
        linears = dense_layers(self.module) if mode != "autograd" else None
        if mode == "dense" and linears is None:
            raise ValueError("backprop 'dense' needs a chain of Linear / ReLU layers "
                             f"({', '.join(DENSE)})")
        self.dense = DenseBackprop(linears) if linears is not None else None

    def loss_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (x, y) at the current weights; its gradient is left in
        :attr:`grad` (overwritten). Returns the loss, detached."""
        if self.dense is not None:
            return self.dense(x, y)
        self.grad.zero_()
        loss = F.cross_entropy(self.module(x), y)
        loss.backward()
        return loss.detach()

    def sgd_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One plain SGD step on (x, y) (``params -= lr * grad``); returns the loss. With
        the hand-written backprop the step is fused into the backward pass
        (:class:`DenseBackprop`; :attr:`grad` is then not written), else it is
        :meth:`loss_grad` and the update."""
        if self.dense is not None:
            return self.dense(x, y, lr)
        loss = self.loss_grad(x, y)
        with torch.no_grad():
            descend_(self.params, self.grad, lr)
        return loss

    def load(self, flat: torch.Tensor) -> None:
        self.params.copy_(flat)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
