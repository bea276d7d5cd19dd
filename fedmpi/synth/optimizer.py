"""Batched optimisers of B independent problems in lockstep: :func:`lbfgs` (torch's
LBFGS without line search, compact inverse-Hessian form) and :func:`gradient_descent`."""

from __future__ import annotations

import math

import torch

from fedmpi.synth.objective import BatchedFn, _padded
from fedmpi.synth.options import FitOptions


class _History:
    """LBFGS memory of B problems in lockstep, applied in the compact form.

    Row b keeps its last ``size`` entries (s_i, y_i) in a ring of slots: entry number n
    (counting from 0) of row b sits in slot n mod size, whatever the other rows hold;
    unused slots are zero. ``direction`` returns -H g for the LBFGS inverse-Hessian
    approximation H of each row's history with H0 = h_diag I, in the compact
    representation of Byrd, Nocedal and Schnabel ("Representations of quasi-Newton
    matrices and their use in limited memory methods", Math. Prog. 63, 1994, eq. 3.1):

        H g = h g + S q - h Y p,   p = R^-1 S^T g,   q = R^-T ((D + h Y^T Y) p - h Y^T g)

    with the entries in age order, R the upper triangle of S^T Y and D its diagonal. That
    is the H of torch.optim.LBFGS's two-loop recursion (equal in exact arithmetic) in a
    fixed dozen batched operations instead of four per entry and problem: two passes over
    the stored vectors (S^T g and Y^T g, then the combination) and k x k float64 algebra
    on the dot products, permuted into age order. An unused slot gets R_ii = 1, which
    makes its p_i and q_i exact zeros. Buffers are padded (P to 16 floats, slots to 8)
    and every product is a row-vector x matrix ``bmm``, so a problem's numbers do not
    depend on the batch it is in.
    """

    def __init__(self, size: int, batch: int, device: torch.device):
        self.size = size
        self.total = torch.zeros(batch, dtype=torch.int64, device=device)  # entries added
        self.cap = 0
        self.buf: torch.Tensor | None = None  # (B, cap, 2, P'): s_i, y_i
        self.sy = self.yy = torch.zeros((batch, 0, 0), dtype=torch.float64, device=device)

    @property
    def count(self) -> torch.Tensor:
        """Entries held per row."""
        return torch.clamp(self.total, max=self.size)

    def _grow(self, p: int, dtype: torch.dtype, device: torch.device) -> None:
        b, old = self.total.shape[0], self.cap
        cap = min(max(8, 2 * old), -(-self.size // 8) * 8)
        buf = torch.zeros((b, cap, 2, _padded(p)), dtype=dtype, device=device)
        sy = torch.zeros((b, cap, cap), dtype=torch.float64, device=device)
        yy = torch.zeros_like(sy)
        if old:
            buf[:, :old] = self.buf
            sy[:, :old, :old] = self.sy
            yy[:, :old, :old] = self.yy
        self.buf, self.sy, self.yy, self.cap = buf, sy, yy, cap

    def add(self, y: torch.Tensor, s: torch.Tensor, ys: torch.Tensor,
            mask: torch.Tensor) -> None:
        b, p = y.shape
        rows = torch.nonzero(mask).flatten()
        if not rows.numel():
            return
        if min(int(self.total.max()) + 1, self.size) > self.cap:
            self._grow(p, y.dtype, y.device)
        every = len(rows) == b
        slot = self.total[rows] % self.size  # a full row overwrites its oldest entry
        self.buf[rows, slot, 0, :p] = s[rows]
        self.buf[rows, slot, 1, :p] = y[rows]
        self.total[rows] += 1
        k = min(-(-int(self.count.max()) // 8) * 8, self.cap)
        hist = (self.buf[:, :k] if every else self.buf[rows, :k]).reshape(len(rows), 2 * k, -1)
        new = self.buf[rows, slot]  # (R, 2, P'): s_new, y_new
        # one pass over the history; row-vector x matrix products (as everywhere here):
        # bmm's matrix x column-vector kernels round differently for different batch sizes
        dots = torch.bmm(new, hist.transpose(1, 2)).double().view(len(rows), 2, k, 2)
        # dots[r, a, i, c] = new_a . slot i's (s, y)[c]; a, c: 0 = s, 1 = y
        self.sy[rows, :k, slot] = dots[:, 1, :, 0]  # s_i . y_new
        self.sy[rows, slot, :k] = dots[:, 0, :, 1]  # y_i . s_new (s_new . y_new twice)
        self.yy[rows, :k, slot] = dots[:, 1, :, 1]  # y_i . y_new
        self.yy[rows, slot, :k] = dots[:, 1, :, 1]

    def direction(self, g: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor:
        """-H g per row, H from that row's history (see the class docstring)."""
        b, p = g.shape
        count = self.count
        top = int(count.max())
        if top == 0:
            return -(g * h_diag[:, None])
        k = min(-(-top // 8) * 8, self.cap)  # slots in play (padded; unused ones drop out)
        hist = self.buf[:, :k].reshape(b, 2 * k, -1)
        gp = g.new_zeros((b, 1, hist.shape[2]))
        gp[:, 0, :p] = g
        dots = torch.bmm(gp, hist.transpose(1, 2)).double().view(b, k, 2)  # first pass
        # age order: position j of row b is slot (oldest + j) mod size, then unused slots;
        # until some row's ring wraps that is slot order (the gathers would copy as is)
        ar = torch.arange(k, device=g.device)
        wrapped = int(self.total.max()) > self.size
        if wrapped:
            oldest = (self.total - count) % self.size
            age = torch.where(ar[None, :] < count[:, None],
                              (oldest[:, None] + ar) % self.size, ar[None, :])
            sg = dots[:, :, 0].gather(1, age)
            yg = dots[:, :, 1].gather(1, age)
            rows_of = age[:, :, None].expand(-1, -1, k)
            cols_of = age[:, None, :].expand(-1, k, -1)
            sy = self.sy[:, :k, :k].gather(1, rows_of).gather(2, cols_of)
            yy = self.yy[:, :k, :k].gather(1, rows_of).gather(2, cols_of)
        else:
            sg, yg = dots[:, :, 0], dots[:, :, 1]
            sy, yy = self.sy[:, :k, :k], self.yy[:, :k, :k]
        used = ar[None, :] < count[:, None]
        h = h_diag.double()[:, None]
        r = torch.triu(sy) + torch.diag_embed((~used).double())
        pv = torch.linalg.solve_triangular(r, sg[..., None], upper=True)[..., 0]
        ypv = torch.bmm(pv[:, None, :], yy)[:, 0]  # YY is symmetric
        rhs = torch.diagonal(sy, dim1=1, dim2=2) * pv + h * (ypv - yg)
        qv = torch.linalg.solve_triangular(r.transpose(1, 2), rhs[..., None], upper=False)
        coef = torch.stack([qv[..., 0], -h * pv], 2)
        if wrapped:  # back to slot order
            coef = torch.zeros_like(coef).scatter_(1, age[..., None].expand(-1, -1, 2), coef)
        hg = torch.bmm(coef.to(g.dtype).view(b, 1, 2 * k), hist)[:, 0, :p]  # second pass
        return -(h_diag[:, None] * g + hg)


def _evaluate(fn: BatchedFn, z: torch.Tensor, mask: torch.Tensor | None = None,
              j: torch.Tensor | None = None, g: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, dJ/dz) of the rows in ``mask`` (all if None), written into copies of ``j``, ``g``
    (other rows keep their values there)."""
    b = z.shape[0]
    rows = (torch.arange(b, device=z.device) if mask is None
            else torch.nonzero(mask).flatten())
    j_out = torch.full((b,), math.nan, dtype=z.dtype, device=z.device) if j is None else j.clone()
    g_out = torch.zeros_like(z) if g is None else g.clone()
    if rows.numel():
        j_rows, g_rows = fn(z[rows], rows)
        j_out[rows] = j_rows.to(z.dtype)
        g_out[rows] = g_rows.to(z.dtype)
    return j_out, g_out


def lbfgs(fn: BatchedFn, z0: torch.Tensor, steps: int, lr: float = 1.0, max_iter: int = 20,
          history_size: int = 100, tolerance_grad: float = 1e-7,
          tolerance_change: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` calls of torch.optim.LBFGS.step (no line search) on each row of ``z0``,
    all rows in lockstep, keeping per row the point of the smallest finite J seen after
    a step. Returns (best z, its J as float64; inf where no step gave a finite J)."""
    b, _ = z0.shape
    dev = z0.device
    max_eval = max_iter * 5 // 4
    z = z0.detach().clone()
    best_z = z.clone()
    best = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
    hist = _History(history_size, b, dev)
    n_total = torch.zeros(b, dtype=torch.int64, device=dev)
    d = torch.zeros_like(z)
    t = torch.zeros(b, dtype=z.dtype, device=dev)
    h_diag = torch.ones(b, dtype=z.dtype, device=dev)
    prev_g = torch.zeros_like(z)
    prev_loss = torch.zeros(b, dtype=torch.float64, device=dev)
    j, g = _evaluate(fn, z)
    for _ in range(steps):
        loss = j.double()
        running = ~(g.abs().amax(1) <= tolerance_grad)
        evals = torch.ones(b, dtype=torch.int64, device=dev)
        n_iter = 0
        while n_iter < max_iter and bool(running.any()):
            n_iter += 1
            n_total += running.long()
            first = running & (n_total == 1)
            later = running & (n_total > 1)
            if bool(later.any()):
                y = g - prev_g
                s = d * t[:, None]
                ys = torch.linalg.vecdot(y, s)
                add = later & (ys > 1e-10)
                if bool(add.any()):
                    hist.add(y, s, ys, add)
                    h_diag = torch.where(add, ys / torch.linalg.vecdot(y, y), h_diag)
                d = torch.where(later[:, None], hist.direction(g, h_diag), d)
            d = torch.where(first[:, None], -g, d)
            prev_g = torch.where(running[:, None], g, prev_g)
            prev_loss = torch.where(running, loss, prev_loss)
            t0 = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * lr
            t = torch.where(running, torch.where(first, t0, torch.full_like(t, lr)), t)
            gtd = torch.linalg.vecdot(g, d)
            running = running & ~(gtd > -tolerance_change)
            z = torch.where(running[:, None], z + d * t[:, None], z)
            opt_cond = torch.zeros_like(running)
            if n_iter != max_iter:
                j, g = _evaluate(fn, z, running, j, g)
                loss = torch.where(running, j.double(), loss)
                opt_cond = g.abs().amax(1) <= tolerance_grad
                evals += running.long()
            stop = (opt_cond | (evals >= max_eval) | (n_iter == max_iter)
                    | ((d * t[:, None]).abs().amax(1) <= tolerance_change)
                    | ((loss - prev_loss).abs() < tolerance_change))
            running = running & ~stop
        j, g = _evaluate(fn, z)  # J after the step; also the next step's start
        cur = j.double()
        better = torch.isfinite(cur) & (cur < best)
        best = torch.where(better, cur, best)
        best_z = torch.where(better[:, None], z, best_z)
    return best_z, best


def gradient_descent(fn: BatchedFn, z0: torch.Tensor, steps: int,
                     lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` plain steps z <- z - lr dJ/dz per row, keeping the best point after a step."""
    z = z0.detach().clone()
    best_z = z.clone()
    best = torch.full((z.shape[0],), math.inf, dtype=torch.float64, device=z.device)
    _, g = _evaluate(fn, z)
    for _ in range(steps):
        z = z - lr * g
        j, g = _evaluate(fn, z)
        cur = j.double()
        better = torch.isfinite(cur) & (cur < best)
        best = torch.where(better, cur, best)
        best_z = torch.where(better[:, None], z, best_z)
    return best_z, best


def optimise(fn: BatchedFn, z0: torch.Tensor, opts: FitOptions
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if opts.optimizer == "gd":
        return gradient_descent(fn, z0, opts.steps, opts.lr)
    return lbfgs(fn, z0, opts.steps, lr=opts.lr, max_iter=opts.max_iter,
                 history_size=opts.history_size)
