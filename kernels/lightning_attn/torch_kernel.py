"""Chunked causal linear attention in plain torch, with a hand-written backward (the CPU backend).

Layout: q, k ``[B, S, H, Dk]``, v ``[B, S, H, Dv]``; state fp32 (fp64 for fp64 inputs) ``[B, H, Dk, Dv]``;
per-token log gate a_t = decay_h + g_t (``decay`` ``[H]`` <= 0, not differentiated; ``g`` ``[B, S, H]``
<= 0, differentiated); ``cu_seqlens`` local document offsets ``[0, ..., S]`` (state reset to 0 before
every interior start; empty documents change nothing)::

    S_t = exp(a_t) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t

The sequence is cut into N chunks of C = 64 tokens (the last one zero padded, with a = 0 on padding so
the chunk's last cumulative gate is that of its last real token). Inside chunk n, with local index
i, j in [0, C), cumulative log gate G_i = sum_{t<=i} a_t, document id seg_i and S_n the state entering::

    D[i, j] = exp(G_i - G_j) [j <= i, seg_i = seg_j]         (exponent masked before exp: never overflows)
    Q~_i    = exp(G_i) [no start in 0..i] q_i                 (the entering state survives to i)
    K~_j    = exp(G_{C-1} - G_j) [seg_j = seg_{C-1}] k_j      (k_j survives to the chunk end)
    A_n     = exp(G_{C-1}) [no start in the chunk]
    O_n     = scale * [ (Q K^T ⊙ D) V + Q~ S_n ]
    S_{n+1} = A_n S_n + K~^T V

Only exponents <= 0 (differences G_i - G_j for j <= i, or G itself) are ever exponentiated, and
nothing is divided by an exp, so strong gates underflow to exact zeros instead of producing inf/NaN.

Backward, with R_n = dLoss/dS_{n+1} (R_{N-1} = dfinal)::

    R_{n-1} = A_n R_n + scale * Q~_n^T dO_n               (dinitial = the same expression for n = 0)
    dQ      = scale * [ (dO V^T ⊙ D) K + Q~/q ⊙ (dO S_n^T) ]
    dK      = scale * (V dO^T ⊙ D^T) Q + K~/k ⊙ (V R_n^T)
    dV      = scale * (K Q^T ⊙ D^T) dO + K~ R_n

Gate gradient. Every term of out and final_state carries a factor exp(Gamma_i - Gamma_j) with Gamma the
cumulative gate over the call and j <= i in one document (the initial state counts as j = -1, the final
state as a query at i = S-1), whose derivative in a_t is [j < t <= i] = [t <= i] - [t <= j]. Summing
term values weighted by their upstream gradients: q_i . dq_i collects every term of row i, k_j . dk_j
every term of key j, so::

    dg_t = sum_{i >= t, i in doc(t)} (q_i . dq_i - k_i . dk_i)  +  [t in the last document] <S_final, dfinal>

(later documents cancel exactly); dg_t = 0 at an interior start (a_t multiplies a reset state). Inside
a chunk q_i . dq_i - k_i . dk_i is summed as rowsum - colsum of the pair terms without the diagonal
(i = j appears in both and cancels exactly). The document-limited reverse cumsum runs as a [C x C]
masked matmul inside chunks plus a scalar carry across chunks (no subtraction of long prefix sums).
"""
from __future__ import annotations

import numbers

import torch

CHUNK = 64


def _value_checks_enabled(t: torch.Tensor) -> bool:
    """Checks that read tensor values sync a GPU: run them on CPU tensors or in anomaly mode only."""
    return t.device.type == "cpu" or torch.is_anomaly_enabled()


def _fail(op, expected, got, fix):
    raise ValueError(f"{op}: {expected}, got {got}. Fix: {fix}")


def check_inputs(q, k, v, decay, initial_state, scale, *, dtypes, op, check_values=True, g=None,
                 cu_seqlens=None):
    """Raise ``ValueError`` (expected / got / fix) for user mistakes shared by both backends.

    ``check_values`` also checks that ``decay`` and ``g`` are finite and <= 0 and that ``cu_seqlens``
    runs from 0 to S without decreasing; these value checks read device data, so they run only for
    CPU tensors or under ``torch.is_anomaly_enabled()`` (no host sync on GPU)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            _fail(op, f"{name} expected a 4-D tensor [B, S, H, D]", got, "reshape to [batch, seq, heads, head_dim].")
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]):
        _fail(op, "q, k, v expected the same [B, S, H]",
              f"{tuple(q.shape[:3])}, {tuple(k.shape[:3])}, {tuple(v.shape[:3])}",
              "repeat KV heads (GQA) before calling, and pass the same batch and sequence.")
    if q.shape[3] != k.shape[3]:
        _fail(op, "q and k expected the same head dim Dk", f"{q.shape[3]} and {k.shape[3]}",
              "project q and k to the same Dk.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, f"q, k, v expected one dtype among ({names})", f"{q.dtype}, {k.dtype}, {v.dtype}",
              "cast all three to one supported dtype.")
    b, s, h, dk = q.shape
    dv = v.shape[3]
    others = [t for t in (k, v, decay, initial_state, g) if isinstance(t, torch.Tensor)]
    if any(t.device != q.device for t in others):
        _fail(op, "q, k, v, decay, initial_state, g expected on one device",
              f"{[str(t.device) for t in [q] + others]}", "move them with .to(q.device).")
    check_values = check_values and _value_checks_enabled(q)
    if decay is not None:
        if not isinstance(decay, torch.Tensor) or tuple(decay.shape) != (h,) or not decay.is_floating_point():
            got = f"shape {tuple(decay.shape)}" if isinstance(decay, torch.Tensor) else type(decay).__name__
            _fail(op, f"decay expected a float tensor of shape [H] = [{h}] (per-head log-decay)", got,
                  "pass torch.full((H,), g) or None for no decay.")
        if check_values and not bool(torch.all(torch.isfinite(decay) & (decay <= 0))):
            _fail(op, "decay expected finite log-decays g <= 0 (lambda = exp(g) in (0, 1])",
                  f"max {decay.max().item():.4g}, min {decay.min().item():.4g}",
                  "pass log(lambda), e.g. -F.softplus(x), not lambda itself.")
    if g is not None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (b, s, h) or not g.is_floating_point():
            got = f"shape {tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            _fail(op, f"g expected a float tensor [B, S, H] = [{b}, {s}, {h}] (per-token log gate)", got,
                  "pass one log gate per token and head, e.g. -F.softplus(x) of shape [B, S, H].")
        if check_values and not bool(torch.all(torch.isfinite(g) & (g <= 0))):
            _fail(op, "g expected finite log gates <= 0", f"max {g.max().item():.4g}",
                  "pass log of the gate, e.g. F.logsigmoid(x), not the gate itself.")
    if cu_seqlens is not None:
        check_local_cu_seqlens(cu_seqlens, s, q.device, op, check_values)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or \
                tuple(initial_state.shape) != (b, h, dk, dv) or not initial_state.is_floating_point():
            got = (f"shape {tuple(initial_state.shape)}" if isinstance(initial_state, torch.Tensor)
                   else type(initial_state).__name__)
            _fail(op, f"initial_state expected a float tensor [B, H, Dk, Dv] = [{b}, {h}, {dk}, {dv}]", got,
                  "pass the final_state of the previous segment, or None.")
    if not isinstance(scale, numbers.Real):
        _fail(op, "scale expected a Python number", type(scale).__name__, "pass a float such as Dk ** -0.5.")


def check_local_cu_seqlens(cu, s, device, op, check_values=True):
    """``cu`` a 1-D int32/int64 tensor [0, ..., S] on the CPU or ``device``; values checked on CPU only."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) \
            or cu.numel() < 2:
        got = (f"{cu.dim()}-D {cu.dtype} of {cu.numel()} entries" if isinstance(cu, torch.Tensor)
               else type(cu).__name__)
        _fail(op, "cu_seqlens expected a 1-D int32/int64 tensor [0, ..., S] of document offsets", got,
              "pass torch.tensor([0, e_1, ..., S], dtype=torch.int32).")
    if cu.device.type != "cpu" and cu.device != device:
        _fail(op, f"cu_seqlens expected on the CPU or on {device}", str(cu.device), "move it to q's device.")
    if check_values and (cu.device.type == "cpu" or torch.is_anomaly_enabled()):
        if int(cu[0]) != 0 or int(cu[-1]) != s or bool((cu[1:] < cu[:-1]).any()):
            _fail(op, f"cu_seqlens expected non-decreasing offsets from 0 to S = {s}",
                  f"{cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''} (last {int(cu[-1])})",
                  "give document offsets of this call's sequence, starting at 0 and ending at its length.")


def _chunked(x, n, acc):
    """[B, S, H, D] -> [B, H, N, C, D] in ``acc``, zero padded to N * C tokens."""
    b, s, h, d = x.shape
    x = x.to(acc).permute(0, 2, 1, 3)  # (B, H, S, D)
    x = torch.nn.functional.pad(x, (0, 0, 0, n * CHUNK - s))
    return x.reshape(b, h, n, CHUNK, d)


def _unchunked(x, s, dtype):
    """[B, H, N, C, D] -> [B, S, H, D] in ``dtype``, padding dropped."""
    b, h, n, c, d = x.shape
    return x.reshape(b, h, n * c, d)[:, :, :s].permute(0, 2, 1, 3).to(dtype).contiguous()


def _documents(cu, s, n, device):
    """Interior starts ``st`` [N, C] (bool, 0 < t < S) and document ids ``seg`` [N, C] (padding joins
    the last document). Built with index_fill on the device: no host sync."""
    marks = torch.zeros(n * CHUNK + 1, dtype=torch.bool, device=device)
    marks.index_fill_(0, cu.to(device=device, dtype=torch.long), True)
    marks[0] = False
    marks[s:] = False  # offsets == S (and padding) start no token
    st = marks[:n * CHUNK].view(n, CHUNK)
    return st, torch.cumsum(st.flatten().long(), 0).view(n, CHUNK)


class _Factors:
    """The gate and document factors of one call (see the module docstring), broadcastable to
    [B, H, N, C(, C)]: ``D``, ``qw`` = Q~/q, ``kw`` = K~/k, ``A`` [B|1, H, N]; ``st``/``seg`` or None."""

    def __init__(self, decay, g, cu, b, s, h, n, device, acc):
        # gates in fp64: a cumulative sum of ~C·|a| carries ~C·|a|·eps error into every exponent
        # difference G_i - G_j, which fp32 would turn into a relative error of the decay weights
        a = torch.zeros(1, h, s, device=device, dtype=torch.float64)
        if decay is not None:
            a = a + decay.detach().double()[:, None]
        if g is not None:
            a = a + g.detach().double().permute(0, 2, 1)  # (B, H, S)
        a = torch.nn.functional.pad(a, (0, n * CHUNK - s)).view(a.shape[0], h, n, CHUNK)
        G = torch.cumsum(a, -1)  # (B|1, H, N, C)
        valid = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=device).tril()  # j <= i
        self.st = self.seg = None
        if cu is None:
            first = last = None
        else:
            self.st, self.seg = _documents(cu, s, n, device)
            seg_in = self.seg[:, :1] - self.st[:, :1].long()  # document of the token before the chunk
            first = self.seg == seg_in  # no start in 0..i: the entering state reaches token i
            last = self.seg == self.seg[:, -1:]  # token j's document reaches the chunk end
            valid = valid & (self.seg[:, :, None] == self.seg[:, None, :])  # (N, C, C)
        diff = (G[..., :, None] - G[..., None, :]).to(acc)  # exact in fp64, then rounded once
        self.D = torch.exp(diff.masked_fill(~valid, float("-inf")))
        self.qw = torch.exp(G).to(acc)
        self.kw = torch.exp(G[..., -1:] - G).to(acc)
        self.A = torch.exp(G[..., -1]).to(acc)
        if cu is not None:
            self.qw, self.kw, self.A = self.qw * first, self.kw * last, self.A * first[:, -1]


def _entering_states(kc, vc, f, s0):
    """S_n for every chunk [B, H, N, Dk, Dv] and the final state, by the chunk-level recurrence."""
    delta = torch.matmul((kc * f.kw[..., None]).transpose(-1, -2), vc)  # K~^T V, (B, H, N, Dk, Dv)
    states = torch.empty_like(delta)
    s = s0
    for n in range(delta.shape[2]):
        states[:, :, n] = s
        s = f.A[:, :, n, None, None] * s + delta[:, :, n]
    return states, s


def _setup(q, k, v, decay, initial_state, g, cu_seqlens):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    n = max(1, -(-s // CHUNK))
    qc, kc, vc = (_chunked(t, n, acc) for t in (q, k, v))
    f = _Factors(decay, g, cu_seqlens, b, s, h, n, q.device, acc)
    s0 = (torch.zeros(b, h, dk, dv, device=q.device, dtype=acc) if initial_state is None
          else initial_state.detach().to(acc))
    return acc, n, qc, kc, vc, f, s0


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_OP = "lightning_attn[torch]"


def lightning_fwd(q, k, v, *, decay=None, initial_state=None, scale=None, g=None, cu_seqlens=None):
    """Forward. Returns ``(out [B,S,H,Dv] in v.dtype, final_state [B,H,Dk,Dv] fp32, fp64 for fp64)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op=_OP, g=g, cu_seqlens=cu_seqlens)
    acc, n, qc, kc, vc, f, s0 = _setup(q, k, v, decay, initial_state, g, cu_seqlens)
    states, final = _entering_states(kc, vc, f, s0)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * f.D  # (B, H, N, C, C)
    out = torch.matmul(scores, vc) + torch.matmul(qc * f.qw[..., None], states)
    return _unchunked(scale * out, q.shape[1], v.dtype), final


def _doc_reverse_cumsum(x, f):
    """y_t = sum_{i >= t, i in doc(t)} x_i for x [B, H, N, C] (chunk-local masked matmul + carry)."""
    n = x.shape[2]
    rev = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=x.device).triu()  # [t, i]: i >= t
    if f.seg is not None:
        rev = rev & (f.seg[:, :, None] == f.seg[:, None, :])  # (N, C, C)
    local = torch.matmul(rev.to(x.dtype), x[..., None])[..., 0]  # (B, H, N, C)
    if n == 1:
        return local
    # carry[n]: the sum over later chunks of the document that is open at the end of chunk n
    carry = torch.zeros_like(local[:, :, :, 0])
    for c in range(n - 2, -1, -1):
        nxt = local[:, :, c + 1, 0]
        if f.seg is None:
            carry[:, :, c] = nxt + carry[:, :, c + 1]
        else:  # continues iff chunk c+1 opens without a start; passes on iff its first doc spans it
            span = f.seg[c + 1, 0] == f.seg[c + 1, -1]
            carry[:, :, c] = (~f.st[c + 1, 0]) * (nxt + span * carry[:, :, c + 1])
    last = 1.0 if f.seg is None else (f.seg == f.seg[:, -1:])
    return local + carry[..., None] * last


def lightning_bwd(dout, dfinal_state, q, k, v, *, decay=None, initial_state=None, scale=None, g=None,
                  cu_seqlens=None):
    """Backward. Returns ``(dq, dk, dv, dinitial_state, dg)``; ``dinitial_state`` is None without an
    ``initial_state`` (else in its dtype), ``dg`` None without ``g`` (else [B, S, H] in g's dtype).
    ``dfinal_state`` may be None (no gradient)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_inputs(q, k, v, decay, initial_state, scale, dtypes=_DTYPES, op=_OP, check_values=False, g=g,
                 cu_seqlens=cu_seqlens)
    assert dout.shape == v.shape, f"dout {tuple(dout.shape)} != v {tuple(v.shape)}"
    acc, n, qc, kc, vc, f, s0 = _setup(q, k, v, decay, initial_state, g, cu_seqlens)
    doc = _chunked(dout, n, acc)
    states, final = _entering_states(kc, vc, f, s0)
    qt = qc * f.qw[..., None]  # Q~ (B, H, N, C, Dk)
    kt = kc * f.kw[..., None]  # K~
    # reverse chunk recurrence: R_{n-1} = A_n R_n + scale * Q~_n^T dO_n
    u = scale * torch.matmul(qt.transpose(-1, -2), doc)  # (B, H, N, Dk, Dv)
    grads = torch.empty_like(u)
    rs = (torch.zeros_like(s0) if dfinal_state is None else dfinal_state.to(acc))
    for c in range(n - 1, -1, -1):
        grads[:, :, c] = rs
        rs = f.A[:, :, c, None, None] * rs + u[:, :, c]
    do_v = torch.matmul(doc, vc.transpose(-1, -2))  # dO V^T
    d_scores = do_v * f.D  # (dO V^T ⊙ D)[i, j]
    dq_state = scale * f.qw[..., None] * torch.matmul(doc, states.transpose(-1, -2))
    dk_state = f.kw[..., None] * torch.matmul(vc, grads.transpose(-1, -2))
    dq = scale * torch.matmul(d_scores, kc) + dq_state
    dk = scale * torch.matmul(d_scores.transpose(-1, -2), qc) + dk_state
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * f.D
    dv = scale * torch.matmul(scores.transpose(-1, -2), doc) + torch.matmul(kt, grads)
    s = q.shape[1]
    dg = None
    if g is not None:
        # x_t = q_t . dq_t - k_t . dk_t; the intra part as rowsum - colsum of the pair terms
        # P[i, j] = scale (q_i . k_j) D[i, j] (dO_i . v_j) with the diagonal (in both, cancelling) left
        # out, so strong gates (pairs tiny next to i = j) keep their relative accuracy
        pairs = scores * do_v
        pairs.diagonal(dim1=-2, dim2=-1).zero_()
        x = scale * (pairs.sum(-1) - pairs.sum(-2)) + (qc * dq_state).sum(-1) - (kc * dk_state).sum(-1)
        if dfinal_state is not None and s > 0:  # <S_final, dfinal> joins the last document (at its last token)
            x = x.flatten(2)
            x[:, :, s - 1] += (final * dfinal_state.to(acc)).sum((-1, -2))
            x = x.view(*x.shape[:2], n, CHUNK)
        dg = _doc_reverse_cumsum(x, f)
        if f.st is not None:
            dg = dg.masked_fill(f.st, 0.0)  # a_t at a start multiplies a reset state
        dg = dg.flatten(2)[:, :, :s].permute(0, 2, 1).to(g.dtype).contiguous()
    dinit = None if initial_state is None else rs.to(initial_state.dtype)
    return _unchunked(dq, s, q.dtype), _unchunked(dk, s, k.dtype), _unchunked(dv, s, v.dtype), dinit, dg
