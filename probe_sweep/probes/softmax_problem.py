"""The softmax probe's objective as a problem a solver works on: passes over the rows (loss,
gradient, per-class curvature), exact Hessian-vector products at the last pass's point, and the
certificate on f - f* (``solver.py`` holds the objective's statement and the solvers).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from probe_sweep.probes.rows import Rows

log = logging.getLogger(__name__)

Params = tuple[torch.Tensor, torch.Tensor]  # weight (classes x d), bias (classes), float64
Chunk = tuple[torch.Tensor, torch.Tensor]  # standardised inputs, labels
Scored = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, probabilities, logsumexp


def chunk_rows(chunk_mb: int, d: int, n_classes: int) -> int:
    """Rows per chunk so that one chunk's inputs, probabilities and a temporary of their size
    take about ``chunk_mb`` MiB."""
    return max(64, chunk_mb * 2**20 // (4 * (2 * n_classes + d)))


@dataclass
class Pass:
    """One pass over the rows at (W, b): the objective, its gradient and what the Newton step
    and the certificate need (all sums over rows, float64)."""

    value: float  # f(W, b), penalty included
    grad_w: torch.Tensor
    grad_b: torch.Tensor
    prob_x: torch.Tensor  # A = mean_i p_i x_i'  (classes x d)
    prob_mean: torch.Tensor  # mean_i p_i
    lse_mean: float  # mean_i logsumexp(z_i)
    curvature: torch.Tensor  # c_k = mean_i p_ik (1 - p_ik)
    curvature_x: torch.Tensor  # mean_i p_ik (1 - p_ik) x_i'
    probs: torch.Tensor | None = None  # the kept chunks' rows, one block, for H v
    point: Params | None = None  # (W, b) in the Hessian's precision, for the other chunks' p


@dataclass
class SoftmaxProblem:
    """Mean cross-entropy + penalty over the rows ``rows`` (labels 0..n_classes-1, every class
    present), inputs ``(x - mean) / scale``."""

    rows: Rows
    n_classes: int
    mean: torch.Tensor
    scale: float
    l2: float
    l1: float
    chunk: int
    memory_mb: int = 4096

    def __post_init__(self) -> None:
        self.started = time.perf_counter()  # set-up (a pass, the eigendecomposition) counts
        self.device = self.mean.device
        self.dtype = self.mean.dtype
        self.n = len(self.rows)
        d, k = self.rows.d, self.n_classes
        n_chunks = max(1, math.ceil(self.n / self.chunk))
        budget = self.memory_mb * 2**20
        row_bytes = (d + k) * self.mean.element_size()
        self.held: list[Chunk] | None = [] if self.n * row_bytes <= budget else None
        # chunks whose probabilities a pass keeps for Hessian-vector products: all that fit in
        # half the budget, as a Newton step holds two passes' (the current point's and the
        # trial's); products recompute the other chunks' probabilities
        kept = max(1, min(n_chunks, budget // 2 // max(self.chunk * row_bytes, 1)))
        self.kept_chunks = set(torch.linspace(0, n_chunks - 1, kept).round().long().tolist())
        if kept < n_chunks:
            log.info(
                "Hessian products recompute the probabilities of %d of %d chunks of rows "
                "(probe.memory_mb=%d keeps %d), which makes each up to half again as slow; "
                "probe.memory_mb=%d keeps every row's",
                n_chunks - kept, n_chunks, self.memory_mb, kept,
                math.ceil(2 * n_chunks * self.chunk * row_bytes / 2**20),
            )  # fmt: skip
        class_x = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        total = torch.zeros(d, dtype=torch.float64, device=self.device)
        gram = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.kept_rows = 0
        for i, (x, y) in enumerate(self._stream()):
            if self.held is not None:
                self.held.append((x, y))
            if i in self.kept_chunks:
                self.kept_rows += len(y)
            xd = x.double()
            class_x.index_add_(0, y, xd)
            counts += torch.bincount(y, minlength=k).double()
            total += xd.sum(0)
            gram += xd.T @ xd
        n = max(self.n, 1)
        self.class_x, self.freq, self.x_mean = class_x / n, counts / n, total / n
        covariance = gram / n - torch.outer(self.x_mean, self.x_mean)
        self.eigvals, self.eigvecs = torch.linalg.eigh(covariance)
        self.eigvals.clamp_(min=0)
        self.passes = self.products = 0

    @property
    def hessian_dtype(self) -> torch.dtype:
        """The rows' precision: passes move to float64 near the optimum, Hessian products
        do not."""
        return self.mean.dtype

    def snapshot(
        self, iteration: int, value: float, gap_rel: float | None
    ) -> dict[str, float | None]:
        """One row of a fit's history: the objective, the relative gap (estimated during the
        fit), the passes and Hessian products so far and the seconds since the problem was set
        up (the bench reads the time to a given gap from it)."""
        return {
            "iteration": iteration,
            "objective": value,
            "gap_rel": gap_rel,
            "passes": self.passes,
            "hessian_products": self.products,
            "seconds": time.perf_counter() - self.started,
        }

    @property
    def holds_float64(self) -> bool:
        """Whether the certificate's float64 probabilities fit in ``memory_mb`` (else each
        step of the bias polish is a pass)."""
        return self.n * (self.n_classes + self.rows.d) * 8 <= self.memory_mb * 2**20

    def _stream(self) -> Iterator[Chunk]:
        """Standardised in the rows' precision, not the passes' (which turns float64 near the
        optimum): every pass must see the inputs the class sums were taken from."""
        dtype = self.mean.dtype
        for x, y in self.rows.chunks(self.chunk):
            yield ((x.to(self.device, dtype) - self.mean) / self.scale, y.to(self.device))

    def chunks(self) -> Iterator[Chunk]:
        """Standardised inputs and labels, chunk by chunk, from memory when they fit."""
        return iter(self.held) if self.held is not None else self._stream()

    def start(self) -> Params:
        """Weight 0, bias log(class frequency): the best probe that ignores the input."""
        weight = torch.zeros(self.n_classes, self.rows.d, dtype=torch.float64, device=self.device)
        return weight, self.freq.log()

    def penalty(self, weight: torch.Tensor) -> float:
        return self.l2 * weight.pow(2).sum().item() + self.l1 * weight.abs().sum().item()

    @staticmethod
    def _softmax(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Scored:
        """Inputs, softmax probabilities and logsumexp of one chunk at (w, b)."""
        p = torch.addmm(b, x, w.T)
        top = p.max(1, keepdim=True).values
        p.sub_(top).exp_()
        total = p.sum(1, keepdim=True)
        p.div_(total)
        return x, p, total.log_().add_(top).squeeze(1)

    def _probabilities(self, params: Params, dtype: torch.dtype) -> Iterator[Scored]:
        """Each chunk's inputs, softmax probabilities and logsumexp at ``params``."""
        w, b = (t.to(dtype) for t in params)
        for x, _ in self.chunks():
            yield self._softmax(x.to(dtype), w, b)

    def _pass(self, params: Params, scored: Iterable[Scored], keep: bool, curvature: bool) -> Pass:
        """The sums over rows that make a ``Pass``, from each chunk's probabilities."""
        weight, bias = params
        k, d = weight.shape
        prob_x = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        curv_x = torch.zeros_like(prob_x)
        prob_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        curv_sum = torch.zeros_like(prob_sum)
        lse_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # one block, not a tensor per chunk: freed chunks between kept ones fragment the heap
        probs = (
            torch.empty(self.kept_rows, k, dtype=self.hessian_dtype, device=self.device)
            if keep
            else None
        )
        row = 0
        for i, (x, p, lse) in enumerate(scored):
            lse_sum += lse.sum(dtype=torch.float64)
            prob_x += (p.T @ x).double()
            prob_sum += p.sum(0, dtype=torch.float64)
            if curvature:
                curv = p * (1 - p)
                curv_sum += curv.sum(0, dtype=torch.float64)
                curv_x += (curv.T @ x).double()
            if probs is not None and i in self.kept_chunks:
                probs[row : row + len(p)].copy_(p)
                row += len(p)
        n = max(self.n, 1)
        prob_x, prob_mean = prob_x / n, prob_sum / n
        lse_mean = lse_sum.item() / n
        value = lse_mean - (self.class_x * weight).sum().item() - (self.freq * bias).sum().item()
        grad_w = prob_x - self.class_x
        if self.l2:
            grad_w = grad_w + 2 * self.l2 * weight
        return Pass(
            value=value + self.penalty(weight),
            grad_w=grad_w,
            grad_b=prob_mean - self.freq,
            prob_x=prob_x,
            prob_mean=prob_mean,
            lse_mean=lse_mean,
            curvature=curv_sum / n,
            curvature_x=curv_x / n,
            probs=probs,
            point=(weight.to(self.hessian_dtype), bias.to(self.hessian_dtype)) if keep else None,
        )

    @torch.no_grad()
    def evaluate(self, params: Params, keep: bool = True) -> Pass:
        """The objective and its gradient at ``params`` in one pass over the rows; ``keep``
        the point and the kept chunks' probabilities for ``hessian_product`` and the curvature
        sums its preconditioner needs (FISTA uses neither)."""
        self.passes += 1
        return self._pass(params, self._probabilities(params, self.dtype), keep, keep)

    @torch.no_grad()
    def certify(
        self, params: Params, tol: float, value_hint: float
    ) -> tuple[Params, Pass, float | None]:
        """``params`` with the bias polished to its exact optimum for the weight, their pass
        and their gap bound, all in float64. The polish makes the dual point feasible, so the
        bound is ||grad_W||^2 / (4 l2) to second order; without it the mixture that restores
        feasibility costs about t x (a mean logit), t the worst class's relative excess of
        predicted mass, which float32 leaves near 1e-6; the polish stops when t is small
        against ``tol`` x ``value_hint`` (the objective). The float64 probabilities are held
        and tilted by each shift of the bias when they fit in ``memory_mb``, else recomputed,
        one pass per step of the polish."""
        weight, bias = params
        held = None
        if self.holds_float64:
            self.passes += 1
            held = list(self._probabilities(params, torch.float64))

        def shifted(shift: torch.Tensor) -> Iterator[Scored]:
            """Inputs, probabilities and logsumexp at the bias ``bias + shift``."""
            if held is None:
                self.passes += 1
                yield from self._probabilities((weight, bias + shift), torch.float64)
                return
            factor = shift.exp()
            for x, p, lse in held:
                q = p * factor
                total = q.sum(1, keepdim=True)
                yield x, q.div_(total), lse + total.squeeze(1).log()

        shift, curvature = torch.zeros_like(self.freq), None
        target = 0.05 * tol * abs(value_hint)  # the mixture's cost is about t x a mean logit
        for _ in range(50):  # Jacobi-Newton: the curvature of the first pass, held
            mean = torch.zeros_like(shift)
            first = curvature is None
            curvature = torch.zeros_like(shift) if first else curvature
            for _, q, _ in shifted(shift):
                mean += q.sum(0)
                if first:
                    curvature += q.sum(0) - q.pow(2).sum(0)
            excess = mean / max(self.n, 1) - self.freq
            if (excess / mean.clamp_min(1e-300) * self.n).max().item() <= target:
                break
            shift -= excess / (curvature / max(self.n, 1)).clamp_min(1e-300)
        polished = (weight, bias + shift)
        at = self._pass(polished, shifted(shift), False, False)
        return polished, at, self.gap(polished, at)

    @torch.no_grad()
    def hessian_product(self, at: Pass, vector: Params) -> Params:
        """H v of the cross-entropy part at ``at`` over every row (the kept chunks' probabilities
        reused, the others' recomputed at ``at.point``), plus the l2 term. In the rows' precision
        in either stage: the product only shapes the step, which a pass then accepts or
        rejects, while the gradient and the certificate keep the pass's precision."""
        self.products += 1
        v_w, v_b = vector
        dtype = self.hessian_dtype
        vw, vb = v_w.to(dtype), v_b.to(dtype)
        out_w = torch.zeros_like(v_w)
        out_b = torch.zeros_like(v_b)
        assert at.probs is not None and at.point is not None, "a pass evaluated with keep=True"
        row = 0
        for i, (x, _) in enumerate(self.chunks()):
            x = x.to(dtype)
            if i in self.kept_chunks:
                p = at.probs[row : row + len(x)]
                row += len(x)
            else:
                p = self._softmax(x, *at.point)[1]
            r = torch.addmm(vb, x, vw.T).mul_(p)
            r.addcmul_(p, r.sum(1, keepdim=True), value=-1)
            out_w += (r.T @ x).double()
            out_b += r.sum(0, dtype=torch.float64)
        n = max(self.n, 1)
        out_w, out_b = out_w / n, out_b / n
        if self.l2:
            out_w += 2 * self.l2 * v_w
        return out_w, out_b

    def logit_metric(self, vector: Params) -> Params:
        """M1 v: the metric of the logits' change, mean_i ||dW x_i + db||^2 = <v, M1 v>."""
        v_w, v_b = vector
        rotated = (v_w @ self.eigvecs) * self.eigvals
        return rotated @ self.eigvecs.T, v_b

    @torch.no_grad()
    def gap(self, params: Params, at: Pass) -> float | None:
        """An upper bound on f(params) - f*: the duality gap P - D(U) at the dual point U made
        from the probabilities of ``params``, mixed with a fixed distribution m by the least
        weight t that makes U feasible for the unpenalised bias (sum_i u_i = 0). Written so
        that no two large terms cancel: for l2 it is ||grad_W||^2 / (4 l2) + <grad_b, b> plus
        terms in t. None without a penalty (no dual bound exists)."""
        if not (self.l2 or self.l1):
            return None
        weight, bias = params
        excess = at.grad_b  # mean p - class frequency: zero at a dual-feasible point
        t = max(0.0, (excess / at.prob_mean).max().item())
        mixture = (self.freq - (1 - t) / t * excess).clamp_min(0) if t > 0 else self.freq
        mix_neg_entropy = (mixture * mixture.clamp_min(1e-300).log()).sum().item()
        # E_i sum_k p_ik log p_ik, with z = W x + b: <A, W> + <mean p, b> - mean logsumexp
        neg_entropy = (
            (at.prob_x * weight).sum().item() + (at.prob_mean * bias).sum().item() - at.lse_mean
        )
        towards = torch.outer(mixture, self.x_mean) - at.prob_x  # d(dual gradient) / dt
        bias_term = (excess * bias).sum().item()
        if self.l2:
            g = at.grad_w
            return max(
                g.pow(2).sum().item() / (4 * self.l2)
                + bias_term
                + t * (mix_neg_entropy - neg_entropy)
                + t * (g * towards).sum().item() / (2 * self.l2)
                - t * (weight * towards).sum().item()
                + t * t * towards.pow(2).sum().item() / (4 * self.l2),
                0.0,
            )
        dual_grad = at.prob_x - self.class_x + t * towards
        shrink = min(1.0, self.l1 / max(dual_grad.abs().max().item(), 1e-300))
        # <grad_W, W> + l1 ||W||_1 summed term by term: each is small near the optimum
        complementarity = ((at.grad_w + self.l1 * weight.sign()) * weight).sum().item()
        return max(
            complementarity
            + bias_term
            + (shrink * (1 - t) - 1) * neg_entropy
            + shrink * t * mix_neg_entropy,
            0.0,
        )
