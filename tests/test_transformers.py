"""Transformers through sparsify -> RigL -> densify: sparse attention, Linear subclasses,
register_conversion (a GPT-2-style Conv1D), tied weights, SparseConv1d, the honest report."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk

TOL = dict(rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ helpers
def _rigl_steps(model, x, loss_fn, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.3, prune_rate_schedule="constant",
                                    growth="gradient")
    entries = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x)).backward()
        opt.step()
        entries.append(dst.step())
    assert all(e is not None and e["kind"] == "update" for e in entries), entries
    return dst


def _stored_fraction(model):
    """Live-block elements of the sparse layers plus every dense weight matrix, over all weight matrices."""
    kept = total = 0
    for m in model.modules():
        if isinstance(m, ftk.nn.BlockSparseModule):
            kept, total = kept + int(m.mask.sum()), total + m.mask.numel()
        else:
            for p in m.parameters(recurse=False):
                if p.dim() >= 2:
                    kept, total = kept + p.numel(), total + p.numel()
    return kept / total


def _true_kept_fraction(dense_model):
    mats = [p for p in dense_model.parameters() if p.dim() >= 2]
    return sum(int(p.count_nonzero()) for p in mats) / sum(p.numel() for p in mats)


# ------------------------------------------------------------- attention
def _sparse_and_dense_mha(batch_first, kdim=None, vdim=None, dropout=0.0, bias=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    sparse = ftk.SparseMultiheadAttention.from_dense(mha, 0.5, block_size=8)
    return sparse, sparse.to_dense()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_sparse_mha_matches_torch_with_masks(batch_first, need_weights):
    sparse, dense = _sparse_and_dense_mha(batch_first)
    assert isinstance(dense, nn.MultiheadAttention) and dense.batch_first == batch_first
    assert all(isinstance(getattr(sparse, n), ftk.SparseLinear) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    B, L, S = 3, 5, 7
    shape = (lambda n: (B, n, 32)) if batch_first else (lambda n: (n, B, 32))
    q, k, v = torch.randn(shape(L)), torch.randn(shape(S)), torch.randn(shape(S))
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, 0] = True
    bool_mask = torch.rand(L, S) < 0.3
    bool_mask[:, 1] = False  # no fully masked row
    float_mask = torch.randn(L, S)
    per_head = torch.randn(B * 4, L, S)
    cases = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=bool_mask),
             dict(attn_mask=float_mask, key_padding_mask=kpm.float().masked_fill(kpm, float("-inf"))),
             dict(attn_mask=bool_mask, key_padding_mask=kpm), dict(attn_mask=per_head)]
    for kw in cases:
        out, w = sparse(q, k, v, need_weights=need_weights, **kw)
        ref, ref_w = dense(q, k, v, need_weights=need_weights, **kw)
        torch.testing.assert_close(out, ref, **TOL, msg=lambda m: f"{kw.keys()}: {m}")
        if need_weights:
            torch.testing.assert_close(w, ref_w, **TOL)
        else:
            assert w is None and ref_w is None
    out, w = sparse(q, k, v, average_attn_weights=False)
    ref, ref_w = dense(q, k, v, average_attn_weights=False)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)


def test_sparse_mha_causal_kdim_vdim_unbatched_no_bias_and_backward():
    sparse, dense = _sparse_and_dense_mha(True, kdim=16, vdim=24, bias=False)
    assert not dense._qkv_same_embed_dim and dense.in_proj_bias is None
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 6, 16), torch.randn(2, 6, 24)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for need_weights in (False, True):
        out, _ = sparse(q, k, v, attn_mask=causal, is_causal=True, need_weights=need_weights)
        ref, _ = dense(q, k, v, attn_mask=causal, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(out, ref, **TOL)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        sparse(q, k, v, is_causal=True)
    out, w = sparse(q[0], k[0], v[0])  # unbatched
    ref, ref_w = dense(q[0], k[0], v[0])
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    # backward: the sparse values get the dense gradient at their live blocks
    qq = q.clone().requires_grad_()
    sparse(qq, k, v, need_weights=False)[0].square().sum().backward()
    qd = q.clone().requires_grad_()
    dense(qd, k, v, need_weights=False)[0].square().sum().backward()
    torch.testing.assert_close(qq.grad, qd.grad, **TOL)
    dw = dense.q_proj_weight.grad * sparse.q_proj.mask
    torch.testing.assert_close(sparse.q_proj.layout.unpack(sparse.q_proj.values.grad), dw, **TOL)


def test_sparse_mha_dropout_trains_and_is_off_in_eval():
    sparse, dense = _sparse_and_dense_mha(False, dropout=0.5)
    x = torch.randn(4, 2, 32)
    sparse.train()
    torch.manual_seed(1)
    a, wa = sparse(x, x, x)
    torch.manual_seed(1)
    b, wb = sparse(x, x, x)
    torch.testing.assert_close(a, b)  # same seed, same dropout mask
    assert not torch.allclose(a, sparse.eval()(x, x, x)[0])
    dense.eval()
    torch.testing.assert_close(sparse(x, x, x, need_weights=False)[0], dense(x, x, x, need_weights=False)[0],
                               **TOL)


def test_sparsify_swaps_attention_and_densify_restores_torch_modules():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4), "head": nn.Linear(32, 32)})
    report = ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform")
    assert isinstance(model["attn"], ftk.SparseMultiheadAttention)
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"} == set(report.sparse_layers)
    x = torch.randn(5, 2, 32)
    y, _ = model["attn"](x, x, x, need_weights=False)
    ftk.densify(model)
    assert type(model["attn"]) is nn.MultiheadAttention
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(model["attn"](x, x, x, need_weights=False)[0], y, **TOL)
    # a projection excluded by name stays a dense nn.Linear inside the sparse attention
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4), "head": nn.Linear(32, 32)})
    report = ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform", exclude=["*.out_proj"])
    assert report.dense_layers == {"attn.out_proj": "excluded"}
    assert type(model["attn"].out_proj) is nn.Linear and isinstance(model["attn"].q_proj, ftk.SparseLinear)
    y, _ = model["attn"](x, x, x)
    torch.testing.assert_close(ftk.densify(model)["attn"](x, x, x)[0], y, **TOL)
    # two Linears sharing one weight: both dense, the matrix counted once
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    rep = ftk.sparsify(nn.Sequential(a, nn.ReLU(), b, nn.Linear(16, 16)), 0.5, block_size=8,
                       distribution="uniform")
    assert "tied to 2.weight" in rep.dense_layers["0"] and "tied to 0.weight" in rep.dense_layers["2"]
    assert rep.global_density() == pytest.approx(0.75)
    # unsupported configurations stay dense, with their out_proj, and say why
    odd = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, add_bias_kv=True), "fc": nn.Linear(32, 32)})
    rep = ftk.sparsify(odd, density=0.5, block_size=8, distribution="uniform")
    dense = rep.dense_layers
    assert "add_bias_kv" in dense["attn.in_proj_weight"] and "add_bias_kv" in dense["attn.out_proj"]
    assert type(odd["attn"]) is nn.MultiheadAttention


def test_torch_transformer_encoder_runs_sparse_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    ftk.sparsify(model, density=0.5, block_size=8)
    x = torch.randn(3, 6, 32)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    y_train = model(x, mask=causal, src_key_padding_mask=kpm, is_causal=True)  # module path
    with torch.no_grad():
        y_eval = model.eval()(x)  # torch's fast path steps aside for the sparse attention
    ftk.densify(model)
    torch.testing.assert_close(model.train()(x, mask=causal, src_key_padding_mask=kpm, is_causal=True), y_train,
                               **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), y_eval, **TOL)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention


# ---------------------------------------------------------------- ViT (torchvision)
def test_vit_rigl_two_steps_densify_equal_and_true_kept_fraction():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    with torch.no_grad():  # torchvision zero-inits the head and class token: make every weight nonzero
        model.heads.head.weight.normal_(0, 0.02)
        model.class_token.normal_(0, 0.02)
    report = ftk.sparsify(model, density=0.2, block_size=8)
    assert report.global_density() == pytest.approx(_true_kept_fraction(ftk.densify(copy.deepcopy(model))),
                                                    abs=0.01)
    attn = model.encoder.layers[0].self_attention
    assert isinstance(attn, ftk.SparseMultiheadAttention)
    assert isinstance(model.encoder.layers[0].mlp[0], ftk.SparseLinear)
    assert isinstance(model.conv_proj, ftk.SparseConv2d)
    dense = report.dense_layers
    assert "class_token" in dense and "encoder.pos_embedding" in dense
    x, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    dst = _rigl_steps(model, x, lambda out: F.cross_entropy(out, target))
    assert "encoder.layers.encoder_layer_0.self_attention.q_proj" in dst.layers
    # DST keeps each layer's block count: the report's fraction is still what the model stores
    assert report.global_density() == pytest.approx(_stored_fraction(model), abs=1e-6)
    assert report.global_density() < 0.5
    model.eval()
    with torch.no_grad():
        y = model(x)
        ftk.densify(model)
        assert not any(isinstance(m, (ftk.nn.BlockSparseModule, ftk.SparseMultiheadAttention))
                       for m in model.modules())
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_vit_b_16_kept_fraction_is_true_and_rigl_then_densify():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
        model.class_token.normal_(0, 0.02)
    report = ftk.sparsify(model, density=0.2, block_size=32)
    assert sum(isinstance(m, ftk.SparseMultiheadAttention) for m in model.modules()) == 12
    kept = report.global_density()
    assert kept == pytest.approx(_true_kept_fraction(ftk.densify(copy.deepcopy(model))), abs=0.01)
    assert kept == pytest.approx(0.2, abs=0.01)
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))  # 4 patches of 16
    _rigl_steps(model, x, lambda out: F.cross_entropy(out, target))
    assert report.global_density() == pytest.approx(_stored_fraction(model), abs=1e-6)
    model.eval()
    with torch.no_grad():
        y = model(x)
        ftk.densify(model)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------- GPT-2 style: Conv1D, tied head
class Conv1D(nn.Module):
    """GPT-2's transposed-weight projection: weight [in, out], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def _conv1d_to_sparse(module, density, block_size, criterion):
    nx, nf = module.weight.shape
    lin = nn.Linear(nx, nf, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(module.weight.t())
        lin.bias.copy_(module.bias)
    return ftk.SparseLinear.from_dense(lin, density, block_size, criterion)


def _conv1d_to_dense(sparse):
    conv = Conv1D(sparse.out_features, sparse.in_features)
    with torch.no_grad():
        conv.weight.copy_(sparse.weight.t())
        conv.bias.copy_(sparse.bias)
    return conv


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.c_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=96, d=32, heads=4, layers=2, ctx=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@pytest.fixture
def conv1d_registered():
    ftk.register_conversion(Conv1D, _conv1d_to_sparse, _conv1d_to_dense,
                            weight_shape=lambda m: tuple(m.weight.shape[::-1]))
    yield
    ftk.nn.unregister_conversion(Conv1D)


def test_gpt2_style_conv1d_and_tied_head_rigl_then_densify(conv1d_registered):
    torch.manual_seed(0)
    model = TinyGPT()
    report = ftk.sparsify(model, density=0.3, block_size=8)
    kept = report.global_density()
    assert kept == pytest.approx(_true_kept_fraction(ftk.densify(copy.deepcopy(model))), abs=0.01)
    assert isinstance(model.h[0].c_attn, ftk.SparseLinear) and isinstance(model.h[1].mlp_proj, ftk.SparseLinear)
    # the tied head stays dense and tied, and the report says so
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    dense = report.dense_layers
    assert "tied to wte.weight" in dense["lm_head"]
    assert "Embedding" in dense["wte"] and "Embedding" in dense["wpe"]
    tied_rows = [r for r in report.rows if r["name"] in ("wte", "lm_head")]
    assert sorted(r.get("counted", True) for r in tied_rows) == [False, True]  # one matrix, counted once
    idx = torch.randint(0, 96, (3, 16))
    _rigl_steps(model, idx, lambda logits: F.cross_entropy(logits.reshape(-1, 96), idx.reshape(-1)))
    assert model.lm_head.weight is model.wte.weight
    model.eval()
    with torch.no_grad():
        y = model(idx)
        ftk.densify(model)
        assert type(model.h[0].c_attn) is Conv1D and model.h[0].c_attn.weight.shape == (32, 96)
        assert model.lm_head.weight is model.wte.weight
        torch.testing.assert_close(model(idx), y, rtol=1e-4, atol=1e-5)


def test_register_conversion_validates_and_linear_subclasses_convert():
    with pytest.raises(TypeError):
        ftk.register_conversion(int, lambda *a: None, lambda s: None)

    class Marker(nn.Linear):  # keeps Linear.forward: converts like Linear
        pass

    class Scaled(nn.Linear):  # its own forward: not a plain linear, stays dense
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Marker(16, 16), Scaled(16, 16),
                          nn.modules.linear.NonDynamicallyQuantizableLinear(16, 16))
    report = ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform")
    assert isinstance(model[0], ftk.SparseLinear) and isinstance(model[2], ftk.SparseLinear)
    assert type(model[1]) is Scaled and "overrides Linear.forward" in report.dense_layers["1"]


def test_report_lists_every_weight_matrix():
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.Conv3d(2, 4, 3), nn.ConvTranspose2d(4, 4, 3),
                          nn.Conv2d(8, 8, 3, groups=2), nn.LayerNorm(16), nn.Conv1d(4, 4, 3, padding_mode="reflect"))
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    report = ftk.sparsify(model, density=0.5, block_size=4, distribution="uniform")
    dense = report.dense_layers
    assert report.sparse_layers == ["1"]
    assert "Embedding" in dense["0"] and "Conv3d" in dense["2"] and "ConvTranspose2d" in dense["3"]
    assert "groups=2" in dense["4"] and "reflect" in dense["6"]
    assert "5" not in dense  # LayerNorm's scale is 1-d: not a weight matrix
    assert sum(r["params"] for r in report.rows) == total
    assert report.global_density() == pytest.approx(1 - 0.5 * 256 / total, abs=1e-6)
    assert "kept fraction of all the model's weight matrices" in str(report)


# ------------------------------------------------------------------ SparseConv1d
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=5, stride=2, padding=2, dilation=2),
        dict(kernel_size=4, padding="same"),  # asymmetric 'same'
        dict(kernel_size=3, padding="same", dilation=2, bias=False),
        dict(kernel_size=1, padding="valid"),
    ],
)
def test_sparse_conv1d_matches_conv1d_forward_and_backward(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv1d(20, 12, **kwargs)  # 20 and 12 channels: ragged blocks of 8
    sparse = ftk.SparseConv1d.from_dense(conv, 0.5, block_size=8)
    assert sparse.weight.shape == conv.weight.shape and sparse.mask.shape == conv.weight.shape
    ref = sparse.to_dense()
    assert isinstance(ref, nn.Conv1d) and ref.padding == conv.padding and ref.stride == conv.stride
    torch.testing.assert_close(ref.weight, conv.weight * sparse.mask)
    x = torch.randn(3, 20, 17, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = sparse(x), ref(xr)
    torch.testing.assert_close(y, yr, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(sparse.layout.unpack(sparse.values.grad).squeeze(2), ref.weight.grad * sparse.mask,
                               **TOL)
    if sparse.bias is not None:
        torch.testing.assert_close(sparse.bias.grad, ref.bias.grad, **TOL)
    torch.testing.assert_close(sparse(x[0].detach()), ref(x[0].detach()), **TOL)  # unbatched
    if hasattr(sparse, "init_"):  # the base class's weight-write contract, in nn.Conv1d's [out, in, k]
        with pytest.raises(RuntimeError):
            nn.init.zeros_(sparse.weight)
        sparse.init_(lambda w: w.fill_(1.0) if w.shape == conv.weight.shape else None)
        torch.testing.assert_close(sparse.to_dense().weight.detach(), sparse.mask.float())


def test_sparse_conv1d_refuses_and_sparsify_rigl_densify():
    with pytest.raises(ValueError, match="groups"):
        ftk.SparseConv1d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        ftk.SparseConv1d(4, 4, 3, padding_mode="circular")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv1d(16, 16, 3, stride=2),
                          nn.Flatten(), nn.Linear(16 * 7, 4))
    report = ftk.sparsify(model, density=0.5, block_size=4, distribution="uniform")
    assert isinstance(model[0], ftk.SparseConv1d) and report.sparse_layers == ["0", "2", "4"]
    x = torch.randn(5, 8, 16)
    _rigl_steps(model, x, lambda out: out.square().mean())
    model.eval()
    with torch.no_grad():
        y = model(x)
        ftk.densify(model)
        assert type(model[0]) is nn.Conv1d
        torch.testing.assert_close(model(x), y, **TOL)
