"""torch.autocast on block-sparse models: every custom op has an autocast rule (cpu, cuda).

Under autocast the ops run in the autocast dtype with fp32 master ``values``,
as nn.Linear / nn.Conv2d do: outputs in the autocast dtype, gradients to
``values`` in fp32; dense and sparse layers mix in one model.
"""

import pytest
import torch
import torch.nn.functional as F

import freetickets_kernels as ftk
from freetickets_kernels import ops

from conftest import random_layout, random_values

BACKENDS = [b for b in ("reference", "cpu") if b in ftk.available_backends()]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    ftk.sparsify(model, density=0.1, block_size=32)  # ERK leaves the stem and shortcuts dense
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_resnet18_trains_a_dst_step_under_cpu_autocast(dtype):
    model = _resnet18()
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.modules())  # dense layers feed sparse ones
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.no_grad():
        ref = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.3, growth="gradient",
                                    prune_rate_schedule="constant")
    before = {n: m.layout.block_mask.clone() for n, m in dst.layers.items()}
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == dtype
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.1 * scale)
    loss.backward()
    for name, layer in dst.layers.items():
        assert layer.values.dtype == torch.float32 and layer.values.grad.dtype == torch.float32, name
        assert torch.isfinite(layer.values.grad).all(), name
    opt.step()
    entry = dst.step()  # RigL: scores from the gradients captured under autocast
    assert entry["kind"] == "update"
    assert any(not torch.equal(before[n], m.layout.block_mask) for n, m in dst.layers.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_and_conv_under_autocast_match_the_low_precision_op(backend):
    layout = random_layout((12, 10), (4, 5), 0.6)
    values = random_values(layout, dtype=torch.float32).requires_grad_()
    bias = torch.randn(12, requires_grad=True)
    x = torch.randn(6, 10)
    with ftk.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ftk.block_sparse_linear(x, values, layout, bias)
        want = ftk.block_sparse_linear(x.bfloat16(), values.detach().bfloat16(), layout, bias.detach().bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want)
        y.float().sum().backward()
    assert values.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32

    clayout = random_layout((6, 5, 3, 3), (4, 2), 0.6)
    cvalues = random_values(clayout, dtype=torch.float32).requires_grad_()
    cx = torch.randn(2, 5, 7, 6).to(memory_format=torch.channels_last)
    with ftk.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cy = ftk.block_sparse_conv2d(cx, cvalues, clayout, padding=1)
        assert cy.dtype == torch.bfloat16 and cy.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cy, ftk.block_sparse_conv2d(cx.bfloat16(), cvalues.detach().bfloat16(),
                                                               clayout, padding=1))
        cy.float().sum().backward()
    assert cvalues.grad.dtype == torch.float32


def test_every_custom_op_has_an_autocast_rule_on_cpu_and_cuda():
    for name in ("linear_forward", "linear_grad_input", "linear_grad_values", "linear_grad_block_norms",
                 "conv2d_forward", "conv2d_grad_input", "conv2d_grad_values", "conv2d_grad_block_norms"):
        qualname = f"freetickets::{name}"
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)


def test_mixed_dtypes_outside_autocast_stay_an_error():
    layout = random_layout((8, 8), (4, 4), 1.0)
    values = random_values(layout, dtype=torch.float32)
    with pytest.raises(TypeError, match="input is torch.bfloat16 but values are torch.float32"):
        ftk.block_sparse_linear(torch.randn(3, 8, dtype=torch.bfloat16), values, layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never cast: still an error
        with pytest.raises(TypeError, match="float64"):
            ftk.block_sparse_linear(torch.randn(3, 8, dtype=torch.float64), values, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_under_autocast(backend):
    layout = random_layout((10, 7), (4, 3), 0.6)
    x = torch.randn(5, 7, requires_grad=True)
    v = random_values(layout, dtype=torch.float32).requires_grad_()
    with ftk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.library.opcheck(ops.linear_forward, (x, v, *layout.indices.as_tuple(), None, 10))


def test_torch_compile_fullgraph_under_autocast():
    layout = random_layout((10, 7), (4, 3), 0.6)
    x = torch.randn(5, 7)
    v = random_values(layout, dtype=torch.float32)

    def fn(x, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ftk.block_sparse_linear(x, v, layout)

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, fn(x, v))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_with_grad_scaler(dtype):
    model = _resnet18().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == dtype
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for m in model.modules():
        if isinstance(m, (ftk.SparseLinear, ftk.SparseConv2d)):
            assert m.values.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rigl_scores_a_first_sparse_layer_fed_fp32_under_autocast(dtype):
    # the first layer's input stays fp32 while its gradient is low-precision; loss-scaled fp16
    # gradients whose block norms overflow fp16 must still score (in fp32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ftk.sparsify(model, density=0.5, block_size=32, distribution="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.3, prune_rate_schedule="constant")
    with torch.autocast("cpu", dtype=dtype):
        loss = model(torch.randn(16, 64)).float().square().sum()
    (loss * 2.0 ** 12).backward()  # a GradScaler-like scale
    assert dst.step()["kind"] == "update"
