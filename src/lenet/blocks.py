"""BatchNorm -> ReLU -> 2x2 max-pool, the block a BatchNorm network (the `best` preset)
repeats after every convolution, as one C++ autograd op for training on the CPU, and a
first convolution of one input channel as another; the other convolutions, the dense layers
and the optimizer stay PyTorch's.

Why: autograd runs the block as batch_norm, relu and max_pool2d, their three backwards and a
zero fill, each a full pass over the conv output, and oneDNN runs the first convolution (one
input channel) at ~8 GFLOP/s: together about half of a `best` step on 2 cores. The ops
(csrc/blocks.cpp, built into the fused kernel's extension) work an image at a time while it
is in cache, the block's backward from a byte per output and the input at each window's
maximum (benchmarks/step_speed.py: the `best` step 1.46x faster at 2 threads, 1.76x at 1;
evaluation 3.3x).

    forward = BlockForward(model)   # model: a channels-last nn.Sequential from models.build
    logits = forward(x)             # training mode: autograd ops; eval: running statistics

It computes what the modules compute, with their own parameters and buffers: batch
statistics (biased variance) for the normalisation, running_mean / running_var (unbiased)
and num_batches_tracked updated as BatchNorm2d does, ReLU, and the max-pool's gradient at
each window's first maximum. Against float64 its outputs and gradients are closer than
torch's own fp32 (tests/test_blocks.py: e.g. the weight gradient of a 16@28x28 block of 128
images 4e-5 from float64 vs autograd's 1.4e-3), since its batch sums are per image and then
in double. Sums are added in image order, so the result does not depend on the thread count.
"""
from __future__ import annotations

import torch
from torch import nn

from lenet import fused
from lenet.config import ModelSpec
from lenet.errors import ConfigError, LenetError
from lenet.fused import pair


def supports(model_spec: ModelSpec, device: torch.device | str) -> str | None:
    """None when BlockForward fuses every conv block of this spec's network here, else
    why not. A pure check: never builds anything."""
    m = model_spec
    kind = fused.device_kind(device)
    checks = [
        (kind != "cpu", f"device {kind}"),
        (not m.batch_norm, "no batch norm"),
        (m.activation != "relu", f"activation {m.activation}"),
        (m.pooling != "max", f"pooling {m.pooling}"),
        (m.pool != 2, f"pool size {m.pool}"),
        (any(c.channels % 8 for c in m.convs), "conv channels not multiples of 8"),
    ]
    reasons = [why for failed, why in checks if failed]
    return ", ".join(reasons) if reasons else None


class BlockForward:
    """`model`'s forward with each (BatchNorm2d, ReLU, MaxPool2d 2x2) run of layers as one
    C++ op, and a first convolution of one input channel as another: in training mode as
    autograd ops (batch statistics), in eval mode without autograd (running statistics; with
    gradients enabled in eval mode it is `model(x)` itself)."""

    def __init__(self, model: nn.Sequential):
        self._ext = fused.load()
        if self._ext is None:
            raise LenetError("fused blocks: the C++ kernel is not available: "
                             f"{fused.why_unavailable()}")
        self.model = model
        layers = list(model.children())
        # (how, layer): "block" runs a BatchNorm2d and the ReLU and pool after it as one op;
        # "conv1x" the C++ convolution of a single-channel input; "torch" the layer itself.
        self.plan: list[tuple[str, nn.Module]] = []
        i = 0
        while i < len(layers):
            if _is_block(layers[i:i + 3]):
                self.plan.append(("block", layers[i]))
                i += 3
            else:
                how = "conv1x" if _is_single_channel_conv(layers[i]) else "torch"
                self.plan.append((how, layers[i]))
                i += 1
        if not any(how == "block" for how, _ in self.plan):
            raise ConfigError("fused blocks: the model has no BatchNorm2d -> ReLU -> 2x2 "
                              "max-pool block with a multiple of 8 channels")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.model.training:
            return self._infer(x) if not torch.is_grad_enabled() else self.model(x)
        for how, layer in self.plan:
            if how == "block":
                x = _BnReluPool.apply(x.contiguous(memory_format=torch.channels_last),
                                      layer.weight, layer.bias, layer, self._ext)
                layer.num_batches_tracked.add_(1)
            elif how == "conv1x" and not x.requires_grad:  # the data: no input gradient
                x = _Conv1x.apply(x.contiguous(), layer.weight, layer.bias,
                                  layer.padding[0], self._ext)
            else:
                x = layer(x)
        return x

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        for how, layer in self.plan:
            if how == "block":
                x = self._ext.bn_relu_pool_inference(
                    x.contiguous(memory_format=torch.channels_last), layer.weight,
                    layer.bias, layer.running_mean, layer.running_var, layer.eps)
            elif how == "conv1x":
                x = self._ext.conv1x_forward(x.contiguous(), layer.weight, layer.bias,
                                             layer.padding[0])
            else:
                x = layer(x)
        return x


def has_blocks(model: nn.Module) -> bool:
    """Whether BlockForward has a block of `model` to run in C++."""
    layers = list(model.children())
    return any(_is_block(layers[i:i + 3]) for i in range(len(layers)))


def _is_block(layers: list[nn.Module]) -> bool:
    if len(layers) != 3:
        return False
    bn, act, pool = layers
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and bn.momentum is not None and bn.num_features % 8 == 0
            and all(t.dtype == torch.float32 and t.device.type == "cpu"
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
            and type(act) is nn.ReLU
            and type(pool) is nn.MaxPool2d
            and pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


def _is_single_channel_conv(conv: nn.Module) -> bool:
    """A convolution of one input channel that the C++ op computes (oneDNN: ~8 GFLOP/s)."""
    return (type(conv) is nn.Conv2d and conv.in_channels == 1 and conv.out_channels % 8 == 0
            and conv.groups == 1
            and conv.kernel_size in ((3, 3), (5, 5)) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and isinstance(conv.padding, tuple)
            and conv.padding[0] == conv.padding[1] and conv.padding_mode == "zeros"
            and conv.bias is not None and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu")


class _BnReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn, ext):
        with torch.no_grad():  # running statistics are updated in place, outside the graph
            out, code, xmax, mean, invstd = ext.bn_relu_pool_forward(
                x, weight, bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps)
        ctx.save_for_backward(x, weight, code, xmax, mean, invstd)
        ctx.ext = ext
        return out

    @staticmethod
    def backward(ctx, dout):
        dx, dweight, dbias = ctx.ext.bn_relu_pool_backward(dout, *ctx.saved_tensors)
        return dx, dweight, dbias, None, None


class _Conv1x(torch.autograd.Function):
    """A single-channel input's convolution (no gradient for the input: it is the data)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, ext):
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.ext = pad, ext
        return ext.conv1x_forward(x, weight.detach(), bias.detach(), pad)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        dweight, dbias = ctx.ext.conv1x_backward(dout, x, weight, ctx.pad)
        return None, dweight, dbias, None, None
