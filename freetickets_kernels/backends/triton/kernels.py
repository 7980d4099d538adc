"""The three Triton kernels behind every op: implicit-GEMM conv2d with a block-sparse weight.

A linear layer is the 1x1 convolution of 1x1 images (``M`` = tokens), so the
same kernels serve both; Triton specializes the integer arguments equal to 1
and the index arithmetic folds away.  Activations are addressed through their
four strides, so NCHW, channels_last and other strided inputs are read in
place: nothing is im2col'ed or copied.

GEMM view (see layout.py): output pixel ``m`` is a row, output channel a
column of ``Y [M, Cout]``; column block ``c`` of the weight is ``Bi`` input
channels (channel block ``c % BLOCKS_PER_TAP``) at tap ``c // BLOCKS_PER_TAP``.
Blocks are padded to ``PBO x PBI`` (powers of two, at least 16, as ``tl.dot``
needs) with masked loads, so ragged channel edges and odd block sizes need no
special case.  Accumulation is fp32.

The geometry arguments are passed by name (``ConvProblem.kernel_args``, the
vocabulary of backends/implicit_gemm.py); ``sx*`` are the (n, c, h, w) strides
of the input-side activation (x, dx) and ``sy*`` those of the output side (y, dy).
Element offsets are int64 (a channel index times a large stride passes 2**31
first: a column-major linear input's channel stride is the token count).

Grids are one-dimensional (no 65,535 limit on block rows), the block (or
channel-block) index varying fastest: consecutive programs read the same pixel
tile of the activation, which stays in L2 while they go through their weights.

Autotuning is keyed on ``TUNE_KEY``: ``M_BUCKET`` (pixels rounded up to a power
of two), channels, kernel size, stride, ``CHANNELS_INNER`` (the activation's
channel stride is 1: NHWC or a row-major linear input), block and bias, so a
new batch size of a shape does not tune again and NCHW / NHWC or 1x1 / 3x3
problems of equal size do not share a tile.
"""

import triton
import triton.language as tl

from .tuning import forward_configs, grad_blocks_configs, grad_input_configs, prune

TUNE_KEY = ["M_BUCKET", "CIN", "COUT", "KH", "KW", "SH", "SW", "CHANNELS_INNER", "BO", "BI"]


@triton.jit
def _pixel_coords(offs, OH, OW):
    """(image, row, column) of flat pixel indices ``offs`` of an ``[N, OH, OW]`` grid."""
    n = offs // (OH * OW)
    rem = offs % (OH * OW)
    return n.to(tl.int64), rem // OW, rem % OW


@triton.jit
def _offsets(n, c, h, w, sn, sc, sh, sw):
    """int64 element offsets ``[rows, cols]`` of pixels (n, h, w: one per row) and channels (c: one
    per column) in an activation of (n, c, h, w) strides ``sn, sc, sh, sw``."""
    return (n.to(tl.int64)[:, None] * sn + c.to(tl.int64)[None, :] * sc + h.to(tl.int64)[:, None] * sh
            + w.to(tl.int64)[:, None] * sw)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on tensor cores.  UPCAST (set only for bf16 under
    TRITON_INTERPRET, whose bf16 ``tl.dot`` returns garbage in Triton 3.8)
    multiplies in fp32 instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.autotune(configs=forward_configs(), key=TUNE_KEY + ["HAS_BIAS"],
                 prune_configs_by={"early_config_prune": prune}, cache_results=True)
@triton.jit
def forward_kernel(
    x, values, row_ptr, col_idx, slot, bias, y, M_BUCKET, CHANNELS_INNER, ROWS,
    M, CIN, H, W, COUT, OH, OW, KH, KW, BLOCKS_PER_TAP, SH, SW, PH, PW, DH, DW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    BO: tl.constexpr, BI: tl.constexpr, PBO: tl.constexpr, PBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``y[m, r-block] = sum over live (r, c) of x_tap(c)[m, cb(c)] @ values[slot].T``.

    Grid: pixel tiles x ``ROWS`` block rows, the block row fastest.  Dead blocks are never visited.
    """
    pid = tl.program_id(0)
    pid_m = pid // ROWS
    r = pid % ROWS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, oh, ow = _pixel_coords(offs_m, OH, OW)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    offs_o = tl.arange(0, PBO)
    offs_i = tl.arange(0, PBI)
    # values[s] is [BO, BI] row-major; read it transposed as [PBI, PBO]
    w_offs = offs_o[None, :] * BI + offs_i[:, None]
    w_ok = (offs_o[None, :] < BO) & (offs_i[:, None] < BI)
    acc = tl.zeros((BLOCK_M, PBO), dtype=tl.float32)
    for p in range(tl.load(row_ptr + r), tl.load(row_ptr + r + 1)):
        c = tl.load(col_idx + p)
        s = tl.load(slot + p).to(tl.int64)
        tap = c // BLOCKS_PER_TAP
        ch = (c % BLOCKS_PER_TAP) * BI + offs_i
        ih = ih0 + (tap // KW) * DH
        iw = iw0 + (tap % KW) * DW
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_ptrs = x + _offsets(n, ch, ih, iw, sxn, sxc, sxh, sxw)
        xt = tl.load(x_ptrs, mask=pix_ok[:, None] & ((offs_i < BI) & (ch < CIN))[None, :], other=0.0)
        wt = tl.load(values + s * (BO * BI) + w_offs, mask=w_ok, other=0.0)
        acc = _dot(xt, wt, acc, PRECISION, UPCAST)
    co = r * BO + offs_o
    co_ok = (offs_o < BO) & (co < COUT)
    if HAS_BIAS:
        acc += tl.load(bias + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y + _offsets(n, co, oh, ow, syn, syc, syh, syw)
    tl.store(y_ptrs, acc.to(y.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


@triton.autotune(configs=grad_input_configs(), key=TUNE_KEY,
                 prune_configs_by={"early_config_prune": prune}, cache_results=True)
@triton.jit
def grad_input_kernel(
    dy, values, col_ptr, row_idx, tslot, dx, M_BUCKET, CHANNELS_INNER,
    M, CIN, H, W, COUT, OH, OW, KH, KW, BLOCKS_PER_TAP, SH, SW, PH, PW, DH, DW,
    syn, syc, syh, syw, sxn, sxc, sxh, sxw,
    BO: tl.constexpr, BI: tl.constexpr, PBO: tl.constexpr, PBI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``dx[m, cb] = sum over taps t, live (r, t*BLOCKS_PER_TAP+cb) of dy_t[m, r-block] @ values[tslot]``.

    ``M`` counts *input* pixels.  Grid: input-pixel tiles x ``BLOCKS_PER_TAP`` channel blocks, the
    channel block fastest.  The column-major indices give, per column block, its live block rows.
    """
    pid = tl.program_id(0)
    pid_m = pid // BLOCKS_PER_TAP
    cb = pid % BLOCKS_PER_TAP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, ih, iw = _pixel_coords(offs_m, H, W)
    offs_o = tl.arange(0, PBO)
    offs_i = tl.arange(0, PBI)
    w_offs = offs_o[:, None] * BI + offs_i[None, :]
    w_ok = (offs_o[:, None] < BO) & (offs_i[None, :] < BI)
    acc = tl.zeros((BLOCK_M, PBI), dtype=tl.float32)
    for tap in range(KH * KW):
        # output pixel that read input (ih, iw) through this tap, if any
        th = ih + PH - (tap // KW) * DH
        tw = iw + PW - (tap % KW) * DW
        th_c = tl.maximum(th, 0)
        tw_c = tl.maximum(tw, 0)
        oh = th_c // SH
        ow = tw_c // SW
        pix_ok = (m_ok & (th >= 0) & (tw >= 0) & (th_c % SH == 0) & (tw_c % SW == 0)
                  & (oh < OH) & (ow < OW))
        col = tap * BLOCKS_PER_TAP + cb
        for q in range(tl.load(col_ptr + col), tl.load(col_ptr + col + 1)):
            r = tl.load(row_idx + q)
            s = tl.load(tslot + q).to(tl.int64)
            co = r * BO + offs_o
            dy_ptrs = dy + _offsets(n, co, oh, ow, syn, syc, syh, syw)
            dyt = tl.load(dy_ptrs, mask=pix_ok[:, None] & ((offs_o < BO) & (co < COUT))[None, :], other=0.0)
            wt = tl.load(values + s * (BO * BI) + w_offs, mask=w_ok, other=0.0)
            acc = _dot(dyt, wt, acc, PRECISION, UPCAST)
    ch = cb * BI + offs_i
    dx_ptrs = dx + _offsets(n, ch, ih, iw, sxn, sxc, sxh, sxw)
    tl.store(dx_ptrs, acc.to(dx.dtype.element_ty),
             mask=m_ok[:, None] & ((offs_i < BI) & (ch < CIN))[None, :])


@triton.autotune(configs=grad_blocks_configs(), key=TUNE_KEY + ["SPLIT", "SQUARED_NORM"],
                 prune_configs_by={"early_config_prune": prune}, cache_results=True)
@triton.jit
def grad_blocks_kernel(
    dy, x, ent_row, ent_col, ent_out, out, M_BUCKET, CHANNELS_INNER,
    M, CHUNK, NB, CIN, H, W, COUT, OH, OW, KH, KW, BLOCKS_PER_TAP, SH, SW, PH, PW, DH, DW,
    syn, syc, syh, syw, sxn, sxc, sxh, sxw,
    BO: tl.constexpr, BI: tl.constexpr, PBO: tl.constexpr, PBI: tl.constexpr,
    SPLIT: tl.constexpr, SQUARED_NORM: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Blocks ``(ent_row[e], ent_col[e])`` of the dense weight gradient ``dy.T @ x_tap``.

    Only the listed blocks are computed (the live ones for grad-values: a
    sampled dense-dense product; all of them for RigL's block norms).  Grid:
    (entries, SPLIT); split ``k`` sums output pixels ``[k*CHUNK, (k+1)*CHUNK)``.
    Block ``ent_out[e]`` of ``out`` receives the fp32 partial block (SPLIT > 1),
    the block itself (SPLIT == 1), or its squared L2 norm (SQUARED_NORM).
    """
    e = tl.program_id(0)
    k = tl.program_id(1)
    r = tl.load(ent_row + e)
    c = tl.load(ent_col + e)
    o = tl.load(ent_out + e).to(tl.int64)
    tap = c // BLOCKS_PER_TAP
    ki = tap // KW
    kj = tap % KW
    offs_o = tl.arange(0, PBO)
    offs_i = tl.arange(0, PBI)
    co = r * BO + offs_o
    ch = (c % BLOCKS_PER_TAP) * BI + offs_i
    co_ok = (offs_o < BO) & (co < COUT)
    ch_ok = (offs_i < BI) & (ch < CIN)
    acc = tl.zeros((PBO, PBI), dtype=tl.float32)
    start = k * CHUNK
    stop = tl.minimum(start + CHUNK, M)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < stop
        n, oh, ow = _pixel_coords(offs_m, OH, OW)
        ih = oh * SH - PH + ki * DH
        iw = ow * SW - PW + kj * DW
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dy_ptrs = dy + _offsets(n, co, oh, ow, syn, syc, syh, syw)
        dyt = tl.load(dy_ptrs, mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        x_ptrs = x + _offsets(n, ch, ih, iw, sxn, sxc, sxh, sxw)
        xt = tl.load(x_ptrs, mask=pix_ok[:, None] & ch_ok[None, :], other=0.0)
        acc = _dot(tl.trans(dyt), xt, acc, PRECISION, UPCAST)
    if SQUARED_NORM and SPLIT == 1:
        tl.store(out + o, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    else:
        dst = out + (k * NB + o) * (BO * BI) + offs_o[:, None] * BI + offs_i[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=(offs_o[:, None] < BO) & (offs_i[None, :] < BI))
