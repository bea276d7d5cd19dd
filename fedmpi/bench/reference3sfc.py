"""The official 3SFC code's round loop, rebuilt as the baseline of ``python -m fedmpi.bench perf``.

3SFC: Zhou, Shi, Li, Sun, Ye, Lv, "Communication-Efficient Federated Learning with
Single-Step Synthetic Features Compressor for Faster Convergence", ICCV 2023 (arXiv
2302.13562); official code ``Soptq/iccv23-3sfc`` (``main.py``, ``fl_devices.py``,
``data_utils.py``). This module is written from that code's structure, not copied from
it. Payload per client: X* (M x 784 fp32), Y* (M x 10 fp32) and the scale (1 fp32), i.e.
``4 (M (D_in + C) + 1)`` bytes, the same as :mod:`fedmpi.compress.sfc3`. Nothing goes over
a wire here: one process holds every client and the server, as the official code does.

One round, as the official loop runs it (``method = "ours"``):

1. every client copies the server's weights (``synchronize_with_server``);
2. client by client: the learning rate is set, then ``local_epochs`` passes over the
   client's data through a ``torch.utils.data.DataLoader`` over a ``torchvision``
   ``MNIST`` dataset with a per-sample ``transforms.ToTensor()`` (uint8 -> PIL image ->
   float tensor for every sample, then ``default_collate``), plain SGD (momentum 0)
   with ``loss.item()`` after every step; the update dW = W - W_old; the weights go back
   to W_old (``reset``);
3. the same client fits its synthetic sample at w^t: X ~ N(0, 1) of shape
   [M] + the shape of one loader sample (read with ``next(iter(loader))``), Y ~ N(0, 1)
   (M x C), ``torch.optim.LBFGS([X, Y])`` with torch's defaults (lr 1, ``max_iter`` 20,
   history 100, no line search) for S ``step`` calls on a deep copy of the model in eval
   mode; each closure is a double backward of 1 - |cos(grad_w CE(f(X), Y), target)| (the
   official 1e-12 guard); after each step the closure is evaluated once more and the
   (X, Y) of the smallest value kept; then the "replay" gradient g* at (X*, Y*) and the
   scale cos |target| / |g*| (0 if NaN);
4. the server replays every payload on a deep copy of its model
   (``torch.autograd.grad(..., create_graph=True)`` as the official code), scales it,
   stacks the clients' gradients and adds their mean to its weights;
5. the server evaluates on the test set through a DataLoader (batch 128, per-sample
   ``ToTensor``).

Deliberate differences, each making the baseline compute exactly what fedmpi computes (so
that a test can compare the two) without making it slower than the official code:

* clients train on the same shards as fedmpi (``fedmpi.data.partition`` of the same
  ``fedmpi.data.resplit``), mapped back to indices of the torchvision dataset; the
  official code keeps 20% of each shard for a per-client evaluation it runs every round,
  which is left out here (it would only make the baseline slower);
* the batches are fedmpi's (:func:`fedmpi.client.batch_schedule`: one permutation per
  epoch, batches of ``batch_size``), fed to the DataLoader as its ``batch_sampler``; this
  is what ``shuffle=True`` does, with another random stream;
* the learning rate of a client's n-th round is ``lr * lr_decay^n`` (the official code
  multiplies by 0.99 before the first round too);
* the start (X0, Y0) of a fit is drawn from fedmpi's stream for that client and round
  (:meth:`fedmpi.compress.Context.torch_generator` with the 3SFC tag), X first;
* the initial model is fedmpi's w^0 (``init_seed``);
* with ``ef`` (fedmpi's default for 3SFC, as in the paper and E-3SFC's code) the target
  is the residual dW_res += dW and the residual loses scale * g* afterwards; the ICCV
  code fits dW itself and leaves that line commented out (``ef = False`` here);
* the reported training loss is the mean over all of a round's batches (fedmpi's
  ``train_loss``), not the last epoch's, and the evaluation also sums the test loss.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from fedmpi import data
from fedmpi.client import batch_schedule
from fedmpi.compress import Context
from fedmpi.compress.sfc3 import TAG_SFC3
from fedmpi.config import Config
from fedmpi.models import build_module

#: random-stream tag of w^0 in ``fedmpi.train`` (``TAG_INIT``); not imported from there,
#: because importing ``fedmpi.train`` initialises MPI in the benchmark's own process
TAG_INIT = 401


def init_seed(seed: int) -> int:
    """The seed fedmpi builds w^0 from (every rank the same)."""
    return int(np.random.default_rng([seed, TAG_INIT]).integers(2**31))


class Subset(Dataset):
    """``indices`` of a torchvision dataset, ``transform`` applied per sample (as the
    official ``CustomSubset``)."""

    def __init__(self, dataset, indices: np.ndarray, transform):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.dataset[self.indices[i]]
        return self.transform(x), y


class EpochBatches(Sampler):
    """A DataLoader ``batch_sampler`` whose iteration is the batches of ``epoch``."""

    def __init__(self):
        self.epochs: list[list[list[int]]] = [[]]
        self.epoch = 0

    def set_round(self, batches: list[np.ndarray], per_epoch: int) -> None:
        lists = [b.tolist() for b in batches]
        self.epochs = [lists[i:i + per_epoch] for i in range(0, len(lists), per_epoch)]
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epochs[self.epoch])

    def __len__(self) -> int:
        return len(self.epochs[self.epoch])


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class Client:
    """One client: its own model, SGD optimiser and DataLoader, as in the official code."""

    def __init__(self, cid: int, model: torch.nn.Module, dataset: Subset, cfg: Config,
                 ef: bool):
        self.cid = cid
        self.cfg = cfg
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.client.lr, momentum=0.0)
        self.sampler = EpochBatches()
        self.loader = DataLoader(dataset, batch_sampler=self.sampler)
        self.n = len(dataset)
        self.ef = ef
        self.rounds_trained = 0
        self.W = dict(model.named_parameters())
        self.W_old = {k: torch.zeros_like(v) for k, v in self.W.items()}
        self.dW = {k: torch.zeros_like(v) for k, v in self.W.items()}
        self.residual = {k: torch.zeros_like(v) for k, v in self.W.items()}

    def synchronize(self, server: Server) -> None:
        for k in self.W:
            self.W[k].data = server.W[k].data.clone()

    def train(self, round_: int) -> float:
        """Local epochs from w^t; sets dW (and the residual); returns the mean loss."""
        c = self.cfg.client
        for k in self.W:
            self.W_old[k].data = self.W[k].data.clone()
        self.optimizer.param_groups[0]["lr"] = c.lr * c.lr_decay ** self.rounds_trained
        batches = batch_schedule(self.n, self.cfg, round_, self.cid)
        self.sampler.set_round(batches, -(-self.n // min(c.batch_size, self.n)))
        self.model.train()
        loss_sum, steps = 0.0, 0
        for epoch in range(len(self.sampler.epochs)):
            self.sampler.epoch = epoch
            for x, y in self.loader:
                self.optimizer.zero_grad()
                loss = F.cross_entropy(self.model(x), y)
                loss_sum += loss.item()
                steps += 1
                loss.backward()
                self.optimizer.step()
        self.sampler.epoch = 0
        self.rounds_trained += 1
        for k in self.W:
            self.dW[k].data = self.W[k].data.clone() - self.W_old[k].data.clone()
            self.residual[k].data = self.residual[k].data + self.dW[k].data
        return loss_sum / max(1, steps)

    def reset(self) -> None:
        for k in self.W:
            self.W[k].data = self.W_old[k].data.clone()

    def synthesize(self, round_: int, m: int, num_classes: int, s_steps: int, max_iter: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """LBFGS fit of (X, Y) at w^t; returns (X*, Y*, scale, cos(g*, target))."""
        shape = [m, *next(iter(self.loader))[0].shape[1:]]
        gen = Context(round=round_, client=self.cid, seed=self.cfg.run.seed,
                      spec=None).torch_generator(TAG_SFC3)
        x = torch.randn(shape, generator=gen).requires_grad_(True)
        y = torch.randn((m, num_classes), generator=gen).requires_grad_(True)
        model = copy.deepcopy(self.model)
        model.eval()
        params = list(model.parameters())
        source = self.residual if self.ef else self.dW
        target = _flat(v.detach().clone() for v in source.values())
        target_norm = torch.norm(target)
        optimizer = torch.optim.LBFGS([x, y], max_iter=max_iter)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            g = _flat(torch.autograd.grad(loss, params, create_graph=True))
            j = 1.0 - torch.abs(torch.sum(g * target) / (torch.norm(g) * target_norm + 1e-12))
            j.backward()
            return j

        best_x, best_y, best = x.detach().clone(), y.detach().clone(), math.inf
        for _ in range(s_steps):
            optimizer.step(closure)
            current = closure().item()
            if 0 <= current < best:
                best_x, best_y, best = x.detach().clone(), y.detach().clone(), current
        loss = F.cross_entropy(model(best_x), best_y)
        g = _flat(v.detach() for v in torch.autograd.grad(loss, params, create_graph=True))
        cos = torch.sum(g * target) / (torch.norm(g) * target_norm + 1e-12)
        scale = cos * target_norm / torch.norm(g)
        scale = 0.0 if torch.isnan(scale) else scale.item()
        if self.ef:
            offset = 0
            for v in self.residual.values():
                part = g[offset:offset + v.numel()].view_as(v)
                v.data = v.data - scale * part
                offset += v.numel()
        return best_x, best_y, scale, float(cos)


class Server:
    def __init__(self, model: torch.nn.Module, test: Subset, batch_size: int = 128):
        self.model = model
        self.W = dict(model.named_parameters())
        self.loader = DataLoader(test, batch_size=batch_size, shuffle=False)

    def aggregate(self, synthetics: list[tuple[torch.Tensor, torch.Tensor]],
                  scales: list[float]) -> None:
        """Replay every payload at w^t, scale it, add the clients' mean to W."""
        model = copy.deepcopy(self.model)
        params = list(model.parameters())
        decoded = []
        for (x, y), s in zip(synthetics, scales, strict=True):
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            decoded.append([s * g.clone().detach() for g in grads])
        for i, name in enumerate(self.W):
            mean = torch.mean(torch.stack([d[i] for d in decoded]), dim=0)
            self.W[name].data += mean

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on the test set."""
        self.model.train()  # as the official eval_op (no dropout or BN in these models)
        correct, loss_sum, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in self.loader:
                out = self.model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
                n += int(y.shape[0])
        return correct / n, loss_sum / n


@dataclass
class RoundResult:
    round: int
    seconds: float
    test_acc: float
    test_loss: float
    train_loss: list[float]  #: per client, in client-id order
    cos: list[float]  #: |cos(g*, target)| per client
    time_train: float = 0.0  #: seconds of local training (data loading included)
    time_fit: float = 0.0  #: seconds of the synthetic-sample fits
    time_decode: float = 0.0  #: seconds of the server's replay and mean
    time_eval: float = 0.0


def source_indices(cfg: Config, train_targets: np.ndarray, test_targets: np.ndarray
                   ) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """Indices into the torchvision splits of fedmpi's client shards and test set for
    ``cfg``: (per-client train-split indices, test indices, test drawn from the train
    split). Found by running fedmpi's own resplit and partition on index arrays."""
    info = data.info(cfg.data)
    index = data.LoadedData(info, data.ArrayDataset(np.arange(len(train_targets)),
                                                    np.array(train_targets, np.int64)),
                            data.ArrayDataset(np.arange(len(test_targets)),
                                              np.array(test_targets, np.int64)))
    mapped = data.resplit(index, cfg.data, cfg.run.seed)  # (it consumes index's copies)
    parts = data.partition(mapped, cfg)
    return ([mapped.train.x[p] for p in parts], mapped.test.x, cfg.data.train_frac < 1.0)


class Reference:
    """The whole official-style federation in this process (MNIST only)."""

    def __init__(self, cfg: Config, ef: bool | None = None):
        import torchvision
        from torchvision import transforms

        if cfg.data.dataset != "mnist" or cfg.compressor.name != "3sfc":
            raise ValueError("the reference runs MNIST with the 3sfc compressor only")
        if cfg.client.local_epochs <= 0 or cfg.client.momentum or cfg.sam.name != "none":
            raise ValueError("the reference trains local epochs of plain SGD only")
        p = cfg.compressor.params
        if p.optimizer != "lbfgs" or p.lambd != 0 or p.budget or p.budget_bytes:
            raise ValueError("the reference fits M = compressor.m samples with LBFGS and "
                             "lambda = 0 only")
        self.cfg = cfg
        self.m, self.s_steps, self.max_iter = p.m, p.s_steps, p.max_iter
        self.ef = cfg.compressor.ef if ef is None else ef
        root = data.data_root(cfg.data)
        train = torchvision.datasets.MNIST(root, train=True, download=False)
        test = torchvision.datasets.MNIST(root, train=False, download=False)
        shards, test_idx, test_from_train = source_indices(cfg, train.targets.numpy(),
                                                           test.targets.numpy())
        info = data.info(cfg.data)
        self.num_classes = info.num_classes
        seed = init_seed(cfg.run.seed)

        def model_fn():
            return build_module(cfg.model, info.input_shape, info.num_classes, seed)

        to_tensor = transforms.Compose([transforms.ToTensor()])
        self.clients = [Client(i, model_fn(), Subset(train, idx, to_tensor), cfg, self.ef)
                        for i, idx in enumerate(shards)]
        self.server = Server(model_fn(), Subset(train if test_from_train else test,
                                                test_idx, to_tensor))
        self.shards = shards
        self.test_indices = test_idx

    def round(self, round_: int) -> RoundResult:
        t0 = time.perf_counter()
        for client in self.clients:
            client.synchronize(self.server)
        synthetics, scales, losses, coss = [], [], [], []
        t_train = t_fit = 0.0
        for client in self.clients:  # participation 1.0: every client, in id order
            t1 = time.perf_counter()
            losses.append(client.train(round_))
            client.reset()
            t2 = time.perf_counter()
            x, y, s, cos = client.synthesize(round_, self.m, self.num_classes, self.s_steps,
                                             self.max_iter)
            t_train += t2 - t1
            t_fit += time.perf_counter() - t2
            synthetics.append((x, y))
            scales.append(s)
            coss.append(abs(cos))
        t3 = time.perf_counter()
        self.server.aggregate(synthetics, scales)
        t4 = time.perf_counter()
        acc, loss = self.server.evaluate()
        t5 = time.perf_counter()
        return RoundResult(round_, t5 - t0, acc, loss, losses, coss, t_train, t_fit, t4 - t3,
                           t5 - t4)

    def params(self) -> torch.Tensor:
        return _flat(p.detach() for p in self.server.model.parameters())
