"""The book's LeNet-5 (sigmoid, average pooling) as Triton kernels, for the step on a GPU.

On a GPU at batch 128, cuDNN and cuBLAS spend ~360 µs on a LeNet step. That is launch and
latency, not arithmetic: ~60 kernels, one weight gradient alone a single 80 µs kernel
(benchmarks/gpu_speed.py --only profile). Here the whole network is one autograd op, and
each image is one Triton program that keeps its image's work together (SPREAD "image"):
- forward: one kernel computes both convolutions with their sigmoid and pooling, and the
  three dense layers;
- backward: one kernel computes every per-image gradient: the dense layers' deltas, and the
  convolutions' weight and bias gradients;
- then four small launches sum the per-image gradients over the batch, in image order.
So the step is six kernels plus the loss's few, and it is deterministic. SPREAD "split" (the
default: 1.6x faster on an H100) computes the same with each image's convolutions also
spread over channels, the sums in one launch, and the loss in the forward's kernels (see
SPREADS).

Activations are kept in padded per-image scratch buffers. The convolutions are computed
in "pooled layout": [channel, cell of the 2x2 window, pooled position]. Pooling is then a
sum over one axis, and its backward a broadcast.

Triton compiles the kernels on first use on the GPU (seconds, cached on disk). Tests run
the same kernels on a CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lenet.errors import ConfigError

# Per-image floats of each scratch buffer (padded to powers of two where a tile reads it).
S1, P1, S2, P2, H, DP2 = 8 * 4 * 256, 8 * 256, 16 * 4 * 32, 400, 128, 512
E = 32 * 128  # per image and channel (SPREAD "split"): conv2's input gradient by tap
# Per-image partial gradients of the convolutions, in the parameters' own order and layout
# (constexpr: the only kind of global a Triton kernel may read).
W1_AT, B1_AT, W2_AT, B2_AT = (tl.constexpr(k) for k in (0, 150, 156, 2556))
PARTS = 2572


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _conv1_forward(x_ptr, w1, b1, s1_ptr, p1_ptr, c0, C: tl.constexpr):
    """conv1 (1 -> 6 channels, 5x5, padding 2, on 28x28), sigmoid and 2x2 average (-> 14x14)
    for the C channels from c0 of one image (channels past 6 are padding)."""
    cell = tl.arange(0, 4)[None, :, None]
    c = c0 + tl.arange(0, C)[:, None, None]
    q = tl.arange(0, 256)[None, None, :]
    oy = 2 * (q // 14) + cell // 2
    ox = 2 * (q % 14) + cell % 2
    acc = tl.zeros((C, 4, 256), tl.float32)
    for t in tl.static_range(25):  # (unrolled loops' names outlive them: each loop its own)
        iy1 = oy + t // 5 - 2
        ix1 = ox + t % 5 - 2
        ok1 = (q < 196) & (iy1 >= 0) & (iy1 < 28) & (ix1 >= 0) & (ix1 < 28)
        x1 = tl.load(x_ptr + iy1 * 28 + ix1, mask=ok1, other=0.0)
        acc += tl.load(w1 + c * 25 + t, mask=c < 6, other=0.0) * x1
    a1 = _sigmoid(acc + tl.load(b1 + c, mask=c < 6, other=0.0))
    tl.store(s1_ptr + c * 1024 + cell * 256 + q, a1)
    c2 = c0 + tl.arange(0, C)[:, None]
    q2 = tl.arange(0, 256)[None, :]
    tl.store(p1_ptr + c2 * 256 + q2, tl.sum(a1, axis=1) * 0.25)


@triton.jit
def _conv2_forward(p1_ptr, w2, b2, s2_ptr, p2_ptr, co0, CO: tl.constexpr):
    """conv2 (6 -> 16 channels, 5x5, no padding, on 14x14), sigmoid and 2x2 average (-> 5x5)
    for the CO output channels from co0 of one image."""
    cell = tl.arange(0, 4)[None, :, None]
    co = co0 + tl.arange(0, CO)[:, None, None]
    q = tl.arange(0, 32)[None, None, :]
    oy = 2 * (q // 5) + cell // 2
    ox = 2 * (q % 5) + cell % 2
    acc2 = tl.zeros((CO, 4, 32), tl.float32)
    for ci in range(6):
        for t in tl.static_range(25):
            x2 = tl.load(p1_ptr + ci * 256 + (oy + t // 5) * 14 + ox + t % 5, mask=q < 25,
                         other=0.0)
            acc2 += tl.load(w2 + co * 150 + ci * 25 + t) * x2
    a2 = _sigmoid(acc2 + tl.load(b2 + co))
    tl.store(s2_ptr + co * 128 + cell * 32 + q, a2)
    co2 = co0 + tl.arange(0, CO)[:, None]
    q2 = tl.arange(0, 32)[None, :]
    tl.store(p2_ptr + co2 * 25 + q2, tl.sum(a2, axis=1) * 0.25, mask=q2 < 25)


@triton.jit
def _dense_forward(n, p2_ptr, w3, b3, w4, b4, w5, b5, h3_ptr, h4_ptr, out_ptr):
    """Image n's dense layers from its flattened 400 values (p2_ptr offset to the image):
    400 -> 120, sigmoid; 120 -> 84, sigmoid; 84 -> 10. Returns the logits (16, the last 6
    padding)."""
    r = tl.arange(0, 128)
    acc3 = tl.zeros((128,), tl.float32)
    for k0 in range(0, 400, 128):
        k = k0 + tl.arange(0, 128)
        v = tl.load(p2_ptr + k, mask=k < 400, other=0.0)
        w = tl.load(w3 + r[:, None] * 400 + k[None, :],
                    mask=(r[:, None] < 120) & (k[None, :] < 400), other=0.0)
        acc3 += tl.sum(w * v[None, :], axis=1)
    h3 = tl.where(r < 120, _sigmoid(acc3 + tl.load(b3 + r, mask=r < 120, other=0.0)), 0.0)
    tl.store(h3_ptr + n * 128 + r, h3)
    j = tl.arange(0, 128)
    w = tl.load(w4 + j[None, :] * 120 + r[:, None], mask=(r[:, None] < 120) & (j[None, :] < 84),
                other=0.0)
    h4 = _sigmoid(tl.sum(w * h3[:, None], axis=0) + tl.load(b4 + j, mask=j < 84, other=0.0))
    h4 = tl.where(j < 84, h4, 0.0)
    tl.store(h4_ptr + n * 128 + j, h4)
    o = tl.arange(0, 16)
    w = tl.load(w5 + o[:, None] * 84 + j[None, :], mask=(o[:, None] < 10) & (j[None, :] < 84),
                other=0.0)
    logits = tl.sum(w * h4[None, :], axis=1) + tl.load(b5 + o, mask=o < 10, other=0.0)
    tl.store(out_ptr + n * 10 + o, logits, mask=o < 10)
    return logits


@triton.jit
def _forward(x_ptr, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5,
             s1_ptr, p1_ptr, s2_ptr, p2_ptr, h3_ptr, h4_ptr, out_ptr):
    """SPREAD "image": the whole forward, one program per image."""
    n = tl.program_id(0)
    _conv1_forward(x_ptr + n * 784, w1, b1, s1_ptr + n * 8192, p1_ptr + n * 2048, 0, 8)
    tl.debug_barrier()  # conv2 reads other threads' pooled values
    _conv2_forward(p1_ptr + n * 2048, w2, b2, s2_ptr + n * 2048, p2_ptr + n * 400, 0, 16)
    tl.debug_barrier()  # the dense layer reads the flattened 400 values
    _dense_forward(n, p2_ptr + n * 400, w3, b3, w4, b4, w5, b5, h3_ptr, h4_ptr, out_ptr)


@triton.jit
def _forward_conv1(x_ptr, w1, b1, s1_ptr, p1_ptr):
    """SPREAD "split", first forward kernel: one program per image and pair of channels."""
    n = tl.program_id(0)
    _conv1_forward(x_ptr + n * 784, w1, b1, s1_ptr + n * 8192, p1_ptr + n * 2048,
                   2 * tl.program_id(1), 2)


@triton.jit
def _forward_conv2(p1_ptr, w2, b2, s2_ptr, p2_ptr):
    """SPREAD "split", second forward kernel: one program per image and four channels."""
    n = tl.program_id(0)
    _conv2_forward(p1_ptr + n * 2048, w2, b2, s2_ptr + n * 2048, p2_ptr + n * 400,
                   4 * tl.program_id(1), 4)


@triton.jit
def _softmax_loss(n, logits, y_ptr, g_ptr, loss_ptr, right_ptr, smoothing):
    """Image n's cross-entropy with label smoothing (as F.cross_entropy), its gradient with
    respect to the logits (softmax minus the smoothed one-hot target) and whether the
    largest logit is the label's (the first of equal ones, as argmax)."""
    o = tl.arange(0, 16)
    z = tl.where(o < 10, logits, -float("inf"))
    z = z - tl.max(z, axis=0)
    e = tl.exp(z)
    total = tl.sum(e, axis=0)
    logp = z - tl.log(total)
    label = tl.load(y_ptr + n).to(tl.int32)
    hit = o == label
    loss = (-(1.0 - smoothing) * tl.sum(tl.where(hit, logp, 0.0), axis=0)
            - smoothing / 10 * tl.sum(tl.where(o < 10, logp, 0.0), axis=0))
    tl.store(loss_ptr + n, loss)
    tl.store(g_ptr + n * 10 + o, e / total - tl.where(hit, 1.0 - smoothing, 0.0) - smoothing / 10,
             mask=o < 10)
    tl.store(right_ptr + n, (tl.argmax(z, axis=0, tie_break_left=True) == label).to(tl.int64))


@triton.jit
def _forward_dense(p2_ptr, w3, b3, w4, b4, w5, b5, h3_ptr, h4_ptr, out_ptr, y_ptr, g_ptr,
                   loss_ptr, right_ptr, smoothing, LOSS: tl.constexpr):
    """SPREAD "split", third forward kernel: one program per image. With LOSS, also the
    image's loss, its gradient and whether it is right (`_softmax_loss`)."""
    n = tl.program_id(0)
    logits = _dense_forward(n, p2_ptr + n * 400, w3, b3, w4, b4, w5, b5, h3_ptr, h4_ptr,
                            out_ptr)
    if LOSS:
        _softmax_loss(n, logits, y_ptr, g_ptr, loss_ptr, right_ptr, smoothing)


@triton.jit
def _output_deltas(n, g_ptr, w3, w4, w5, s2_ptr, h3_ptr, h4_ptr, d3_ptr, d4_ptr, dp2_ptr,
                   ds2_ptr, part_ptr):
    """Image n's backward as far as conv2's output: the dense layers' deltas from the loss's
    gradient g = dL/dlogits, then through the average pool and the sigmoid to conv2's output
    gradient ds2 (stored as 16 10x10 maps, and returned in pooled layout), with conv2's bias
    gradient. The per-image pointers are already offset to image n."""
    o = tl.arange(0, 16)
    j = tl.arange(0, 128)
    r = tl.arange(0, 128)
    g = tl.load(g_ptr + n * 10 + o, mask=o < 10, other=0.0)
    h4 = tl.load(h4_ptr + n * 128 + j)
    w = tl.load(w5 + o[:, None] * 84 + j[None, :], mask=(o[:, None] < 10) & (j[None, :] < 84),
                other=0.0)
    d4 = tl.sum(w * g[:, None], axis=0) * h4 * (1.0 - h4)
    tl.store(d4_ptr + n * 128 + j, d4)
    h3 = tl.load(h3_ptr + n * 128 + r)
    w = tl.load(w4 + j[None, :] * 120 + r[:, None], mask=(r[:, None] < 120) & (j[None, :] < 84),
                other=0.0)
    d3 = tl.sum(w * d4[None, :], axis=1) * h3 * (1.0 - h3)
    tl.store(d3_ptr + n * 128 + r, d3)
    for i0 in range(0, 400, 128):
        i = i0 + tl.arange(0, 128)
        w = tl.load(w3 + r[:, None] * 400 + i[None, :],
                    mask=(r[:, None] < 120) & (i[None, :] < 400), other=0.0)
        tl.store(dp2_ptr + i, tl.sum(w * d3[:, None], axis=0), mask=i < 400)
    tl.debug_barrier()

    cell = tl.arange(0, 4)[None, :, None]
    co = tl.arange(0, 16)[:, None, None]
    q = tl.arange(0, 32)[None, None, :]
    oy = 2 * (q // 5) + cell // 2
    ox = 2 * (q % 5) + cell % 2
    a2 = tl.load(s2_ptr + co * 128 + cell * 32 + q)
    ds2 = tl.load(dp2_ptr + co * 25 + q, mask=q < 25, other=0.0) * 0.25 * a2 * (1.0 - a2)
    tl.store(ds2_ptr + co * 128 + oy * 10 + ox, ds2, mask=q < 25)  # as a 10x10 map
    tl.store(part_ptr + B2_AT + tl.arange(0, 16), tl.sum(tl.sum(ds2, axis=2), axis=1))
    return ds2


@triton.jit
def _backward(x_ptr, g_ptr, w2, w3, w4, w5, s1_ptr, p1_ptr, s2_ptr, h3_ptr, h4_ptr,
              d3_ptr, d4_ptr, dp2_ptr, ds2_ptr, part_ptr):
    n = tl.program_id(0)
    x_ptr += n * 784
    s1_ptr += n * 8192
    p1_ptr += n * 2048
    s2_ptr += n * 2048
    dp2_ptr += n * 512
    ds2_ptr += n * 2048
    part_ptr += n * 2572
    cell = tl.arange(0, 4)[None, :, None]

    ds2 = _output_deltas(n, g_ptr, w3, w4, w5, s2_ptr, h3_ptr, h4_ptr, d3_ptr, d4_ptr,
                         dp2_ptr, ds2_ptr, part_ptr)
    q = tl.arange(0, 32)[None, None, :]
    oy = 2 * (q // 5) + cell // 2
    ox = 2 * (q % 5) + cell % 2
    c16 = tl.arange(0, 16)
    for ci in range(6):
        for t in tl.static_range(25):
            x2 = tl.load(p1_ptr + ci * 256 + (oy + t // 5) * 14 + ox + t % 5, mask=q < 25,
                         other=0.0)
            tl.store(part_ptr + W2_AT + c16 * 150 + ci * 25 + t,
                     tl.sum(tl.sum(ds2 * x2, axis=2), axis=1))
    tl.debug_barrier()  # the next loop reads other threads' 10x10 maps

    # conv2's input gradient (a full correlation with the kernels), on the 14x14 maps
    c = tl.arange(0, 8)[:, None]
    q = tl.arange(0, 256)[None, :]
    y = q // 14
    x = q % 14
    dp1 = tl.zeros((8, 256), tl.float32)
    for o2 in range(16):
        for t in tl.static_range(25):
            yy = y - t // 5
            xx = x - t % 5
            ok = (q < 196) & (yy >= 0) & (yy < 10) & (xx >= 0) & (xx < 10)
            d = tl.load(ds2_ptr + o2 * 128 + yy * 10 + xx, mask=ok, other=0.0)
            dp1 += tl.load(w2 + o2 * 150 + c * 25 + t, mask=c < 6, other=0.0) * d

    # conv1's output gradient, then its weight and bias gradients
    c = tl.arange(0, 8)[:, None, None]
    q = tl.arange(0, 256)[None, None, :]
    a1 = tl.load(s1_ptr + c * 1024 + cell * 256 + q)
    ds1 = tl.where((c < 6) & (q < 196), dp1[:, None, :] * 0.25 * a1 * (1.0 - a1), 0.0)
    c8 = tl.arange(0, 8)
    tl.store(part_ptr + B1_AT + c8, tl.sum(tl.sum(ds1, axis=2), axis=1), mask=c8 < 6)
    oy = 2 * (q // 14) + cell // 2
    ox = 2 * (q % 14) + cell % 2
    for t in tl.static_range(25):
        iy1 = oy + t // 5 - 2
        ix1 = ox + t % 5 - 2
        ok1 = (q < 196) & (iy1 >= 0) & (iy1 < 28) & (ix1 >= 0) & (ix1 < 28)
        x1 = tl.load(x_ptr + iy1 * 28 + ix1, mask=ok1, other=0.0)
        tl.store(part_ptr + W1_AT + c8 * 25 + t, tl.sum(tl.sum(ds1 * x1, axis=2), axis=1),
                 mask=c8 < 6)


@triton.jit
def _backward_dense(g_ptr, w3, w4, w5, s2_ptr, h3_ptr, h4_ptr, d3_ptr, d4_ptr, dp2_ptr,
                    ds2_ptr, part_ptr):
    """SPREAD "split", first backward kernel: `_output_deltas`, one program per image."""
    n = tl.program_id(0)
    _output_deltas(n, g_ptr, w3, w4, w5, s2_ptr + n * 2048, h3_ptr, h4_ptr, d3_ptr, d4_ptr,
                   dp2_ptr + n * 512, ds2_ptr + n * 2048, part_ptr + n * 2572)


@triton.jit
def _backward_conv(x_ptr, w2, s1_ptr, p1_ptr, ds2_ptr, e_ptr, part_ptr):
    """SPREAD "split", second backward kernel: one program per image and input channel ci
    of conv2 (so six per image): conv2's weight gradient from ci, conv2's input gradient on
    ci's 14x14 map, and conv1's gradients for its channel ci.

    Laid out so that no sum runs across threads inside a loop: the two sums over conv2's 16
    output channels are fp32 matrix products (`tl.dot`: each thread runs its own sums), and
    the rest are each thread's own until one sum across the program at the end."""
    n = tl.program_id(0)
    ci = tl.program_id(1)
    x_ptr += n * 784
    s1_ptr += n * 8192 + ci * 1024
    p1_ptr += n * 2048 + ci * 256
    ds2_ptr += n * 2048
    e_ptr += (n * 6 + ci) * 4096
    part_ptr += n * 2572
    tap = tl.arange(0, 32)
    t = tap[None, :]
    ty = t // 5
    tx = t % 5
    co = tl.arange(0, 16)[:, None]
    m = tl.arange(0, 128)[None, :]  # a position of the 10x10 map, y * 10 + x
    ds2 = tl.load(ds2_ptr + co * 128 + m, mask=m < 100, other=0.0)

    # conv2's weight gradient w2[:, ci]: ds2 [16 x 100] times ci's map under each tap [100 x 25]
    mk = tl.arange(0, 128)[:, None]
    x2 = tl.load(p1_ptr + (mk // 10 + ty) * 14 + mk % 10 + tx, mask=(mk < 100) & (t < 25),
                 other=0.0)
    tl.store(part_ptr + W2_AT + co * 150 + ci * 25 + t, tl.dot(ds2, x2, input_precision="ieee"),
             mask=t < 25)

    # conv2's input gradient on ci's 14x14 map: first e[tap, m] = the sum over the 16 output
    # channels of w2[:, ci, tap] * ds2[:, m] [25 x 16 times 16 x 100], then each position's
    # sum of the 25 taps that reach it, e[tap, position - tap]
    k = tl.arange(0, 32)[:, None]
    w = tl.load(w2 + tl.arange(0, 16)[None, :] * 150 + ci * 25 + k, mask=k < 25, other=0.0)
    tl.store(e_ptr + k * 128 + m, tl.dot(w, ds2, input_precision="ieee"))
    tl.debug_barrier()  # the sums below read other threads' e

    # conv1's output gradient for channel ci (through the pool and the sigmoid), and its
    # weight gradient (the 25 taps across the tile), half the 14x14 map at a time
    dw1 = tl.zeros((128, 32), tl.float32)
    db1 = tl.zeros((128, 1), tl.float32)
    for half in range(2):
        q = half * 128 + tl.arange(0, 128)[:, None]
        yy = q // 14 - ty
        xx = q % 14 - tx
        ok = (q < 196) & (t < 25) & (yy >= 0) & (yy < 10) & (xx >= 0) & (xx < 10)
        dp1 = tl.sum(tl.load(e_ptr + t * 128 + yy * 10 + xx, mask=ok, other=0.0), axis=1)
        dp1 = dp1[:, None]
        for cell in range(4):
            a1 = tl.load(s1_ptr + cell * 256 + q)
            ds1 = tl.where(q < 196, dp1 * 0.25 * a1 * (1.0 - a1), 0.0)
            iy1 = 2 * (q // 14) + cell // 2 + ty - 2
            ix1 = 2 * (q % 14) + cell % 2 + tx - 2
            ok1 = (q < 196) & (t < 25) & (iy1 >= 0) & (iy1 < 28) & (ix1 >= 0) & (ix1 < 28)
            dw1 += ds1 * tl.load(x_ptr + iy1 * 28 + ix1, mask=ok1, other=0.0)
            db1 += ds1
    tl.store(part_ptr + W1_AT + ci * 25 + tap, tl.sum(dw1, axis=0), mask=tap < 25)
    tl.store(part_ptr + B1_AT + ci, tl.sum(tl.sum(db1, axis=1), axis=0))


@triton.jit
def _sum_block(part_ptr, out_ptr, pid, IMAGES: tl.constexpr, width, BLOCK: tl.constexpr,
               BN: tl.constexpr):
    """out[k] = sum over images of part[image, k] for block `pid` of BLOCK k's, BN images at a
    time (a fixed order)."""
    k = pid * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for n0 in range(0, IMAGES, BN):
        n = n0 + tl.arange(0, BN)
        acc += tl.sum(tl.load(part_ptr + n[:, None] * width + k[None, :],
                              mask=(n[:, None] < IMAGES) & (k[None, :] < width), other=0.0),
                      axis=0)
    tl.store(out_ptr + k, acc, mask=k < width)


@triton.jit
def _outer_tile(a_ptr, a_stride, b_ptr, b_stride, w_ptr, bias_ptr, IMAGES: tl.constexpr, rows,
                cols, pi, pj, BR: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """Tile (pi, pj) of w[i, j] = sum over images of a[image, i] * b[image, j] (a dense
    layer's weight gradient: a^T b, as an fp32 matrix product over BN images at a time), and
    with pj == 0, bias[i] = sum over images of a[image, i]."""
    i = pi * BR + tl.arange(0, BR)
    j = pj * BC + tl.arange(0, BC)
    acc = tl.zeros((BR, BC), tl.float32)
    bias = tl.zeros((BR,), tl.float32)
    for n0 in range(0, IMAGES, BN):
        n = n0 + tl.arange(0, BN)
        a = tl.load(a_ptr + n[None, :] * a_stride + i[:, None],
                    mask=(n[None, :] < IMAGES) & (i[:, None] < rows), other=0.0)
        b = tl.load(b_ptr + n[:, None] * b_stride + j[None, :],
                    mask=(n[:, None] < IMAGES) & (j[None, :] < cols), other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        bias += tl.sum(a, axis=1)
    tl.store(w_ptr + i[:, None] * cols + j[None, :], acc,
             mask=(i[:, None] < rows) & (j[None, :] < cols))
    if pj == 0:
        tl.store(bias_ptr + i, bias, mask=i < rows)


@triton.jit
def _sum_images(part_ptr, out_ptr, IMAGES: tl.constexpr, width, BLOCK: tl.constexpr,
                BN: tl.constexpr):
    """SPREAD "image": the convolutions' per-image gradients summed (`_sum_block`)."""
    _sum_block(part_ptr, out_ptr, tl.program_id(0), IMAGES, width, BLOCK, BN)


@triton.jit
def _outer_sum(a_ptr, a_stride, b_ptr, b_stride, w_ptr, bias_ptr, IMAGES: tl.constexpr, rows,
               cols, BR: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr):
    """SPREAD "image": one dense layer's weight and bias gradients (`_outer_tile`), a tile per
    program."""
    _outer_tile(a_ptr, a_stride, b_ptr, b_stride, w_ptr, bias_ptr, IMAGES, rows, cols,
                tl.program_id(0), tl.program_id(1), BR, BC, BN)


# SPREAD "split" sums the batch in one launch of SUMS programs: the blocks of 64 that
# `_sum_block` sums PARTS in, then the 32x32 tiles of fc1's, fc2's and fc3's weight
# gradients, as many as the default's four launches have. Each part starts at its _FROM.
_PROGRAMS = (triton.cdiv(PARTS, 64), *(triton.cdiv(rows, 32) * triton.cdiv(cols, 32)
                                       for rows, cols in ((120, 400), (84, 120), (10, 84))))
_FC1_FROM, _FC2_FROM, _FC3_FROM = (tl.constexpr(sum(_PROGRAMS[:i])) for i in (1, 2, 3))
_FC1_COLS, _FC2_COLS = tl.constexpr(triton.cdiv(400, 32)), tl.constexpr(triton.cdiv(120, 32))
SUMS = sum(_PROGRAMS)


@triton.jit
def _batch_sums(part_ptr, conv_ptr, d3_ptr, p2_ptr, w3_ptr, b3_ptr, d4_ptr, h3_ptr, w4_ptr,
                b4_ptr, g_ptr, h4_ptr, w5_ptr, b5_ptr, IMAGES: tl.constexpr):
    """SPREAD "split": every sum over the batch as one launch of independent programs (the
    same programs as `_sum_images` and the three `_outer_sum`s, which run one after
    another)."""
    pid = tl.program_id(0)
    if pid < _FC1_FROM:
        _sum_block(part_ptr, conv_ptr, pid, IMAGES, 2572, 64, 32)
    elif pid < _FC2_FROM:
        tile = pid - _FC1_FROM
        _outer_tile(d3_ptr, 128, p2_ptr, 400, w3_ptr, b3_ptr, IMAGES, 120, 400,
                    tile // _FC1_COLS, tile % _FC1_COLS, 32, 32, 32)
    elif pid < _FC3_FROM:
        tile = pid - _FC2_FROM
        _outer_tile(d4_ptr, 128, h3_ptr, 128, w4_ptr, b4_ptr, IMAGES, 84, 120,
                    tile // _FC2_COLS, tile % _FC2_COLS, 32, 32, 32)
    else:
        _outer_tile(g_ptr, 10, h4_ptr, 128, w5_ptr, b5_ptr, IMAGES, 10, 84, 0,
                    pid - _FC3_FROM, 32, 32, 32)


PROGRAM_WARPS = 8  # per image: 256 threads over tiles of up to 8x4x256
SPLIT_WARPS = 4  # per image and a few channels: 128 threads over tiles of up to 16x256

# How a step's work is spread over the GPU's programs (a batch of 128 is only 128 programs
# for the 132 multiprocessors of an H100 or H200: one each, 8 warps of the 64 it can hold):
#   "image"  one program per image: `_forward`, then `_backward`. Measured on an H200: the
#            backward 100 µs and the forward 25 µs of a 176 µs step; on an H100, 101 and
#            26 of 178.
#   "split"  the convolutions also over channels: forward `_forward_conv1` (3 programs per
#            image), `_forward_conv2` (4), `_forward_dense` (1); backward `_backward_dense`
#            (1), `_backward_conv` (6); then every sum over the batch as one launch,
#            `_batch_sums`, where "image" makes four in a row. As many launches, and more
#            programs, each with less serial work. `_backward_conv` sums within threads
#            (matrix products) where `_backward` sums across them
#            (benchmarks/triton_resources.py compares their code without a GPU). Checked
#            against float64 like "image". The default: on an H100 its graph replays in
#            110 µs where "image" takes 178 (`python benchmarks/gpu_speed.py --only
#            steps-book,profile,profile-split`): backward 45 + 14, forward 11 + 7 + 6.
#            In a training step (lenet.cuda_graph.GraphStep) its forward also computes the
#            loss and dL/dlogits (`BookForward.fused_loss`), saving PyTorch's loss kernels.
SPREADS = ("image", "split")
SPREAD = "split"


def chosen_spread(spread: str | None = None) -> str:
    """`spread`, else $LENET_TRITON_SPREAD (to time whole runs either way), else SPREAD."""
    name, said = ((spread, "spread") if spread else
                  (os.environ.get("LENET_TRITON_SPREAD", "").strip(), "LENET_TRITON_SPREAD"))
    if not name:
        return SPREAD
    if name not in SPREADS:
        raise ConfigError(f"{said}={name!r}: expected one of {', '.join(SPREADS)}")
    return name


def _run_forward(spread: str, x, params, y=None, smoothing: float = 0.0):
    """The forward kernels: (logits, what the backward needs, and with labels y (spread
    "split" only) each image's loss, its gradient dL/dlogits and whether it is right)."""
    w1, b1, w2, b2, w3, b3, w4, b4, w5, b5 = params
    n = x.shape[0]
    new = x.new_empty
    s1, p1, s2, p2 = new(n, S1), new(n, P1), new(n, S2), new(n, P2)
    h3, h4, logits = new(n, H), new(n, H), new(n, 10)
    losses = g = right = None
    if spread == "split":
        _forward_conv1[(n, 3)](x, w1, b1, s1, p1, num_warps=SPLIT_WARPS)
        _forward_conv2[(n, 4)](p1, w2, b2, s2, p2, num_warps=SPLIT_WARPS)
        if y is not None:
            losses, g, right = new(n), new(n, 10), y.new_empty(n)
        _forward_dense[(n,)](p2, w3, b3, w4, b4, w5, b5, h3, h4, logits,
                             *((y, g, losses, right) if y is not None else (logits,) * 4),
                             smoothing, LOSS=y is not None, num_warps=PROGRAM_WARPS)
    else:
        _forward[(n,)](x, w1, b1, w2, b2, w3, b3, w4, b4, w5, b5,
                       s1, p1, s2, p2, h3, h4, logits, num_warps=PROGRAM_WARPS)
    return logits, (x, w2, w3, w4, w5, s1, p1, s2, p2, h3, h4), (losses, g, right)


def _run_backward(spread: str, saved, g) -> list:
    """The backward kernels from g = dL/dlogits [n, 10]: the ten parameters' gradients."""
    x, w2, w3, w4, w5, s1, p1, s2, p2, h3, h4 = saved
    n = x.shape[0]
    new = x.new_empty
    d3, d4, dp2, ds2, part = new(n, H), new(n, H), new(n, DP2), new(n, S2), new(n, PARTS)
    if spread == "split":
        _backward_dense[(n,)](g, w3, w4, w5, s2, h3, h4, d3, d4, dp2, ds2, part,
                              num_warps=PROGRAM_WARPS)
        e = new(n, 6, E)
        _backward_conv[(n, 6)](x, w2, s1, p1, ds2, e, part, num_warps=SPLIT_WARPS)
    else:
        _backward[(n,)](x, g, w2, w3, w4, w5, s1, p1, s2, h3, h4, d3, d4, dp2, ds2, part,
                        num_warps=PROGRAM_WARPS)
    conv = new(PARTS)
    dense = [new(shape) for shape in PARAM_SHAPES[4:]]
    # The batch size is a compile-time constant of the sums (a batch of 128 and an epoch's
    # last, smaller batch: two compilations).
    if spread == "split":
        _batch_sums[(SUMS,)](part, conv, d3, p2, *dense[0:2], d4, h3, *dense[2:4], g, h4,
                             *dense[4:6], n)
    else:
        _sum_images[(triton.cdiv(PARTS, 64),)](part, conv, n, PARTS, BLOCK=64, BN=32)
        for a, a_stride, b, b_stride, w, bias in ((d3, H, p2, P2, *dense[0:2]),
                                                  (d4, H, h3, H, *dense[2:4]),
                                                  (g, 10, h4, H, *dense[4:6])):
            rows, cols = w.shape
            _outer_sum[(triton.cdiv(rows, 32), triton.cdiv(cols, 32))](
                a, a_stride, b, b_stride, w, bias, n, rows, cols, BR=32, BC=32, BN=32)
    w1, b1, w2, b2 = (k.value for k in (W1_AT, B1_AT, W2_AT, B2_AT))
    return [conv[w1:b1].view(6, 1, 5, 5), conv[b1:w2], conv[w2:b2].view(16, 6, 5, 5),
            conv[b2:PARTS], *dense]


class _BookLeNet(torch.autograd.Function):
    """The network: logits from x."""

    @staticmethod
    def forward(ctx, spread, x, *params):
        ctx.spread = spread
        logits, saved, _ = _run_forward(spread, x, params)
        ctx.save_for_backward(*saved)
        return logits

    @staticmethod
    def backward(ctx, g):
        return None, None, *_run_backward(ctx.spread, ctx.saved_tensors, g.contiguous())


class _BookLeNetLoss(torch.autograd.Function):
    """The network and its loss in the same kernels (spread "split"): the batch's summed
    cross-entropy (with label smoothing) and its count of right answers, from x and y.
    Saves the loss's own launches: PyTorch's cross-entropy, its backward and the argmax
    are some eight small kernels of a step."""

    @staticmethod
    def forward(ctx, smoothing, x, y, *params):
        _, saved, (losses, g, right) = _run_forward("split", x, params, y, smoothing)
        ctx.save_for_backward(*saved, g)
        right = right.sum()
        ctx.mark_non_differentiable(right)
        return losses.sum(), right

    @staticmethod
    def backward(ctx, d_total, _):
        *saved, g = ctx.saved_tensors
        return None, None, None, *_run_backward("split", saved, g * d_total)


PARAM_SHAPES = ((6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,),
                (10, 84), (10,))


def self_check(device: torch.device, batch: int) -> str | None:
    """None when the kernels compile and run on `device`: a forward and backward of `batch`
    zero images (compiling them, as the first training step would: seconds the first time on
    a machine, then Triton's disk cache), and for the split kernels with their loss too.
    Else why not, in one line: a GPU or a tool chain that Triton cannot build for (it needs
    a C compiler, for one)."""
    spread = chosen_spread()  # a bad $LENET_TRITON_SPREAD is the user's error, not the GPU's
    try:
        params = [torch.zeros(shape, device=device, requires_grad=True)
                  for shape in PARAM_SHAPES]
        x = torch.zeros(batch, 1, 28, 28, device=device)
        logits = _BookLeNet.apply(spread, x, *params)
        torch.autograd.grad(logits.sum(), params)
        if spread == "split":  # the training step's own kernels: with the loss
            y = torch.zeros(batch, dtype=torch.int64, device=device)
            total, _ = _BookLeNetLoss.apply(0.0, x, y, *params)
            torch.autograd.grad(total, params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # whatever Triton or the driver raise: the cuDNN graph still runs
        said = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        return f"they do not run here ({type(e).__name__}: {said[:160]})"
    return None


class BookForward:
    """model(x) for the book's LeNet-5 (a `lenet.models.build` network with the `book`
    preset's shapes, sigmoid and average pooling), through the Triton kernels, with the
    work spread over the GPU as `spread` says (one of SPREADS; `chosen_spread` when None)."""

    def __init__(self, model: torch.nn.Module, spread: str | None = None):
        self.spread = chosen_spread(spread)
        self.params = [model.conv1.weight, model.conv1.bias, model.conv2.weight,
                       model.conv2.bias, model.fc1.weight, model.fc1.bias, model.fc2.weight,
                       model.fc2.bias, model.fc3.weight, model.fc3.bias]
        # The split kernels compute the loss too: lenet.cuda_graph.GraphStep uses this then.
        self.fused_loss = self._loss if self.spread == "split" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _BookLeNet.apply(self.spread, x.contiguous(), *self.params)

    def _loss(self, x: torch.Tensor, y: torch.Tensor,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch's summed cross-entropy, its number of right answers), as
        F.cross_entropy(self(x), y, reduction="sum", label_smoothing=...) and
        (self(x).argmax(1) == y).sum() give them."""
        return _BookLeNetLoss.apply(float(label_smoothing), x.contiguous(), y.contiguous(),
                                    *self.params)
