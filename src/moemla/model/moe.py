"""Fine-grained MoE (§3.1): router, routed experts by grouped matmul, shared experts, bias balancing."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from moemla.config import BalanceRule, ModelConfig


class MLP(nn.Module):
    """GELU feed-forward d -> hidden -> d; the dense FFN, and the fused shared experts."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Router(nn.Module):
    """Top-k gate over routed experts with a balancing bias b (a buffer, not a parameter)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.bias_in_gate = cfg.n_activated_experts, cfg.bias_in_gate
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # persistent: the bias is learned state that checkpoints must carry
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> gates (N, K) summing to 1, expert indices (N, K)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E); router math in fp32
        if self.bias_in_gate:
            # Algorithm 1 / Eq. 2: l = W_g x + b, TopK(softmax(l)), gates renormalized over the top-k
            gates, idx = torch.softmax(logits + self.bias, dim=-1).topk(self.top_k, dim=-1)
        else:
            # NOTE: DeepSeek-V3: b only decides *which* experts; gate values use the unbiased scores
            scores = torch.softmax(logits, dim=-1)
            idx = (scores + self.bias).topk(self.top_k, dim=-1).indices
            gates = scores.gather(-1, idx)
        return gates / gates.sum(dim=-1, keepdim=True), idx


# (device type, dtype, K, N) where torch._grouped_mm raised: e.g. fp32 on GPUs whose kernel wants bf16
_GROUPED_MM_UNSUPPORTED: set[tuple[str, torch.dtype, int, int]] = set()


def grouped_mm_supported(key: tuple[str, torch.dtype, int, int]) -> bool:
    return hasattr(torch, "_grouped_mm") and key not in _GROUPED_MM_UNSUPPORTED


def _native_or_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, K) rows grouped by the end offsets `offs` (G,) times w (G, K, N) -> (M, N), in eager mode."""
    key = (x.device.type, x.dtype, w.shape[1], w.shape[2])
    if grouped_mm_supported(key):
        try:
            # NOTE: its backward rejects stride-0 gradients (e.g. from .sum()); ours are dense
            return torch._grouped_mm(x, w, offs=offs)
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_UNSUPPORTED.add(key)
    # fallback: one host sync for all groups, then a matmul per group
    return torch.cat([xs @ w[g] for g, xs in enumerate(x.split(_group_sizes(offs)))])


def _group_sizes(offs: torch.Tensor) -> list[int]:
    """Rows per group from the end offsets (G,): one host sync."""
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


@torch.library.custom_op("moemla::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped matmul as one opaque op, so torch.compile traces any dtype without a graph break."""
    return _native_or_loop(x, w, offs)


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moemla::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    """dL/dw (G, K, N) of the grouped matmul: x_g^T dy_g per group."""
    if hasattr(torch, "_grouped_mm"):
        with contextlib.suppress(RuntimeError, NotImplementedError):  # else the loop below
            return torch._grouped_mm(x.t(), dy, offs=offs)  # (K, M) x (M, N) split along M -> (G, K, N)
    sizes = _group_sizes(offs)
    pairs = zip(x.split(sizes), dy.split(sizes), strict=True)
    return torch.stack([xs.t() @ ds for xs, ds in pairs])


@_weight_grad_op.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    return x.new_empty(groups, x.shape[1], dy.shape[1])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple:
    x, w, offs = ctx.saved_tensors  # type: ignore[attr-defined]
    dx = _grouped_mm_op(dy.contiguous(), w.transpose(1, 2).contiguous(), offs)
    return dx, _weight_grad_op(x, dy.contiguous(), offs, w.shape[0]), None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, K) sorted by group, group g of counts[g] rows times w[g] (G, K, N) -> (M, N)."""
    if x.shape[0] < w.shape[0] and not torch.compiler.is_compiling():
        # fewer rows than groups (decoding): run only the groups that have rows
        sizes = counts.tolist()  # one host sync
        pieces = x.split(sizes)
        return torch.cat([pieces[g] @ w[g] for g, n in enumerate(sizes) if n])
    offs = counts.cumsum(0).to(torch.int32)  # end offset of each group, no host sync
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        # NOTE: the native op's fake-tensor check wants bf16 on every device; other dtypes trace as our op
        return _grouped_mm_op(x, w, offs)
    return _native_or_loop(x, w, offs)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype where autocast is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class RoutedExperts(nn.Module):
    """E GELU experts with stacked weights; tokens are sorted by expert and run as grouped matmuls."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # (E, C, h)
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # (E, h, C)

    def forward(self, x: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, C), gates and idx (N, K), counts (E,) -> sum_k gates[:, k] * E_idx[:, k](x), (N, C). Dropless."""
        few = idx.numel() < self.n_experts
        # NOTE: a captured CUDA graph cannot hold the grouped path's host sync (its fallback reads group sizes)
        if (few or _capturing(x)) and self.w1.dtype == x.dtype and not torch.is_grad_enabled():
            return self.forward_gathered(x, gates, idx)
        n, k = idx.shape
        # NOTE: autocast does not cover torch._grouped_mm, so under bf16/fp16 autocast it would get the fp32
        # LayerNorm output and fp32 master weights and run every expert GEMM in fp32; cast both operands
        dtype = compute_dtype(x)
        order = idx.flatten().argsort(stable=True)  # assignment a belongs to token a // K; grouped by expert
        # index_select, not x[...]: its backward is a plain index_add, cheaper than index_put on CPU
        xs = x.to(dtype).index_select(0, order // k)  # (N*K, C) in expert order
        h = F.gelu(grouped_mm(xs, self.w1.to(dtype), counts))  # (N*K, h)
        y = grouped_mm(h, self.w2.to(dtype), counts)  # (N*K, C)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = y.index_select(0, inverse).view(n, k, -1)  # (N, K, C) back in token order
        # Eq. 2's gate-weighted sum over the K experts as one batched matmul: (N, 1, K) @ (N, K, C)
        return torch.bmm(gates.unsqueeze(1).to(y.dtype), y).squeeze(1)

    def forward_gathered(self, x: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Decode, fewer assignments than experts: copy each assignment's expert weights side by side, then
        one batched matmul per projection. Same result as forward, without sorting or a host sync."""
        # NOTE: measured on CPU (xs, one token, 6 experts): a matmul of one row waits on memory latency
        # (~8 GB/s from DRAM), while one index_select copies all six experts with both threads and the
        # matmuls then read them from cache: about 2x less time per MoE layer (BENCHMARKS.md).
        n, k = idx.shape
        flat = idx.flatten()  # (A,), A = N * K assignments in token order
        w1 = _gather(self.w1, flat, "w1")  # (A, C, h)
        h = F.gelu(torch.bmm(x.repeat_interleave(k, dim=0)[:, None], w1))  # (A, 1, h)
        w2 = _gather(self.w2, flat, "w2")  # (A, h, C)
        y = torch.bmm(h, w2).view(n, k, -1)  # (N, K, C)
        return torch.bmm(gates.unsqueeze(1).to(y.dtype), y).squeeze(1)


# Reused decode buffers for gathered expert weights, one per (name, shape, dtype, device): a buffer
# that stays allocated stays in cache, and a fresh MiB-sized tensor every layer costs page faults.
_SCRATCH: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}


def _gather(w: torch.Tensor, rows: torch.Tensor, name: str) -> torch.Tensor:
    """w[rows] along dim 0, written into the reused buffer `name` (a fresh tensor under torch.compile)."""
    if torch.compiler.is_compiling():  # the compiler plans its own buffers
        return w.index_select(0, rows)
    key = (name, (rows.numel(), *w.shape[1:]), w.dtype, w.device)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(key[1], dtype=w.dtype, device=w.device)
    return torch.index_select(w, 0, rows, out=_SCRATCH[key])


def _capturing(x: torch.Tensor) -> bool:
    # NOTE: a compiled step traces the grouped path, which is sync-free in bf16 (PyTorch's _grouped_mm)
    return x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) from indices (N, K): bincount with a fixed output size, which
    torch.compile traces without a graph break (bincount's size depends on the data)."""
    flat = idx.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


def _in_backward() -> bool:
    # Activation recomputation re-runs forward inside the backward pass; counting its routing
    # again would double every expert's load (and so the balancing step).
    # NOTE: a compiled graph is traced from the forward alone (its recomputation runs no Python), and
    # this private query would break the graph, so under torch.compile the answer is no
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Eq. 12's MoE: N_s always-active shared experts plus top-k of N_r routed experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.expert_inter_dim)
        # N_s shared experts with gate 1 are one MLP of N_s times the width: same math, one matmul
        hidden = cfg.n_shared_experts * cfg.expert_inter_dim
        self.shared = MLP(cfg.dim, hidden, bias=False) if hidden else None
        # routed assignments per expert since the last balancing update (train) / reset (eval)
        self.register_buffer("train_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("eval_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C), N = B * T
        gates, idx = self.router(x)  # (N, K) each
        counts = expert_counts(idx, self.experts.n_experts)  # (E,) assignments
        if not _in_backward():
            (self.train_load if self.training else self.eval_load).add_(counts)
        y = self.experts(x, gates, idx, counts)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)

    @torch.no_grad()
    def update_bias(self, rate: float, rule: BalanceRule) -> torch.Tensor:
        """Algorithm 1 step on the accumulated train loads; returns those loads and clears them."""
        load = self.train_load.clone()
        # no step without loads (Algorithm 1's shares are 0/0 then), chosen on the device: no host sync
        self.router.bias += torch.where(load.sum() > 0, balance_delta(load, rate, rule), 0.0)
        self.train_load.zero_()
        return load


def balance_delta(load: torch.Tensor, rate: float, rule: BalanceRule) -> torch.Tensor:
    """Bias change for per-expert assignment counts (E,): Algorithm 1, or the sign rule."""
    if rule == "sign":
        # torchtitan / Megatron-LM: b_i += gamma * sign(mean load - load_i)
        return rate * torch.sign(load.mean() - load)
    # Algorithm 1, line 6: b_i <- b_i - gamma * (f_i - 1/N_r), f_i = expert i's share of assignments
    f = load / load.sum()
    return -rate * (f - 1.0 / load.numel())


def load_cv(load: torch.Tensor) -> float:
    """Coefficient of variation of expert loads (population std / mean); 0 is perfectly balanced."""
    return float(load_cvs(load[None])[0])


def load_cvs(loads: torch.Tensor) -> torch.Tensor:
    """load_cv of each row of loads (L, E), as a float64 tensor (L,) on their device: no host sync."""
    loads = loads.double()
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, loads.std(dim=-1, unbiased=False) / mean, 0.0)
