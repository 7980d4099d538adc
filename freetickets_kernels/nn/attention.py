"""SparseMultiheadAttention: nn.MultiheadAttention with block-sparse q/k/v/out projections."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import IntPair
from .linear import SparseLinear

Projection = Union[SparseLinear, nn.Linear]


def _unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why ``mha`` cannot become a SparseMultiheadAttention (None: it can)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported by SparseMultiheadAttention"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported by SparseMultiheadAttention"
    return None


def _projection_weights(mha: nn.MultiheadAttention) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
    """{q_proj, k_proj, v_proj, out_proj: (weight [out, in], bias)} of a torch MHA."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        ws = (w[:e], w[e:2 * e], w[2 * e:])
    else:
        ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    b = mha.in_proj_bias
    bs = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None, None, None)
    out = {n: (w, bb) for n, w, bb in zip(("q_proj", "k_proj", "v_proj"), ws, bs)}
    out["out_proj"] = (mha.out_proj.weight, mha.out_proj.bias)
    return out


def projection_shapes(mha: nn.MultiheadAttention) -> Dict[str, Tuple[int, int]]:
    return {n: tuple(w.shape) for n, (w, _) in _projection_weights(mha).items()}


def _float_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


# the state_dict metadata key that marks a SparseMultiheadAttention (read by densify_state_dict)
ATTENTION_METADATA = "ftk_attention"


def _record_attention(module, state_dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: mark this prefix as a sparse attention, and whether torch's
    ``nn.MultiheadAttention`` packs its q/k/v weights (``in_proj_weight``) or keeps them apart, so
    :func:`~freetickets_kernels.nn.densify_state_dict` can write the keys torch's module expects."""
    packed = module.kdim == module.embed_dim and module.vdim == module.embed_dim
    local_metadata[ATTENTION_METADATA] = {"packed_qkv": bool(packed)}


class SparseMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` whose projections are block-sparse linears.

    ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` are :class:`SparseLinear`
    submodules (a projection may also be a dense ``nn.Linear``, e.g. when the
    ERK density reaches 1), so DST trains them as any other block-sparse layer.
    ``forward`` has ``nn.MultiheadAttention.forward``'s signature and results:
    ``batch_first`` both ways, unbatched inputs, ``key_padding_mask`` and
    ``attn_mask`` (bool: True = not allowed, or float: added), ``is_causal``,
    dropout on the attention weights.  With ``need_weights=False`` it runs
    ``F.scaled_dot_product_attention``; with ``need_weights=True`` (torch's
    default) it computes the softmax weights explicitly and returns them
    (averaged over heads unless ``average_attn_weights=False``), as torch does.
    ``add_bias_kv`` and ``add_zero_attn`` are not supported.
    """

    # There is no packed ``in_proj_weight``: this tells torch's Transformer(Encoder)Layer fast paths,
    # which read it, to call this module's forward instead.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 device=None, dtype=None, density: float = 0.1, block_size: IntPair = 32) -> None:
        super().__init__()
        self._setup(embed_dim, num_heads, dropout, kdim, vdim, batch_first)
        kw = dict(bias=bias, device=device, dtype=dtype, density=density, block_size=block_size)
        self.q_proj: Projection = SparseLinear(embed_dim, embed_dim, **kw)
        self.k_proj: Projection = SparseLinear(self.kdim, embed_dim, **kw)
        self.v_proj: Projection = SparseLinear(self.vdim, embed_dim, **kw)
        self.out_proj: Projection = SparseLinear(embed_dim, embed_dim, **kw)

    def _setup(self, embed_dim, num_heads, dropout, kdim, vdim, batch_first) -> None:
        self.register_state_dict_post_hook(_record_attention)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout, self.batch_first = dropout, batch_first

    @property
    def bias(self) -> bool:
        return self.q_proj.bias is not None

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        """The q/k/v biases packed as in ``nn.MultiheadAttention`` (a detached copy, for inspection)."""
        if not self.bias:
            return None
        return torch.cat([p.bias.detach() for p in (self.q_proj, self.k_proj, self.v_proj)])

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, density: Union[float, Dict[str, float]],
                   block_size: IntPair = 32, criterion: str = "magnitude") -> "SparseMultiheadAttention":
        """Keep ``density`` of each projection's blocks (a float, or one per projection name:
        ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; a density of 1 keeps it a dense ``nn.Linear``)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_dense needs an nn.MultiheadAttention, got {type(mha).__name__}")
        why = _unsupported(mha)
        if why:
            raise ValueError(why)
        weights = _projection_weights(mha)
        densities = density if isinstance(density, dict) else {n: density for n in weights}
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._setup(mha.embed_dim, mha.num_heads, mha.dropout, mha.kdim, mha.vdim, mha.batch_first)
        for name, (w, b) in weights.items():
            dense = nn.Linear(w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                dense.weight.copy_(w)
                if b is not None:
                    dense.bias.copy_(b)
            d = densities[name]
            setattr(new, name, dense if d >= 1.0 else SparseLinear.from_dense(dense, d, block_size, criterion))
        new.train(mha.training)
        return new

    def to_dense(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` computing exactly the same function (same weights)."""
        w = self.q_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.bias, kdim=self.kdim,
                                    vdim=self.vdim, batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            ws = [p.weight.detach() for p in (self.q_proj, self.k_proj, self.v_proj)]
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat(ws))
            else:
                for name, wt in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), ws):
                    getattr(mha, name).copy_(wt)
            if self.bias:
                mha.in_proj_bias.copy_(torch.cat([p.bias.detach() for p in (self.q_proj, self.k_proj,
                                                                             self.v_proj)]))
                mha.out_proj.bias.copy_(self.out_proj.bias.detach())
            mha.out_proj.weight.copy_(self.out_proj.weight.detach())
        mha.train(self.training)
        return mha

    # --------------------------------------------------------------- forward
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # from here: [L, B, E] as in torch's multi_head_attention_forward
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        h, hd = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention). "
                               "You may use the Transformer module method `generate_square_subsequent_mask` "
                               "to create this mask.")
        q = self.q_proj(query).reshape(tgt_len, bsz * h, hd).transpose(0, 1)  # [B*H, L, hd]
        k = self.k_proj(key).reshape(src_len, bsz * h, hd).transpose(0, 1)
        v = self.v_proj(value).reshape(src_len, bsz * h, hd).transpose(0, 1)

        dtype = q.dtype
        mask = _float_mask(attn_mask, "attn_mask", dtype)
        if mask is not None:
            if mask.dim() == 2:
                if mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be "
                                       f"{(tgt_len, src_len)}.")
                mask = mask.unsqueeze(0)
            elif mask.shape != (bsz * h, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be "
                                   f"{(bsz * h, tgt_len, src_len)}.")
        sdpa_causal = is_causal and key_padding_mask is None and not need_weights
        if sdpa_causal:
            mask = None
        kpm = _float_mask(key_padding_mask, "key_padding_mask", dtype)
        if kpm is not None:
            if kpm.shape != (bsz, src_len):
                raise RuntimeError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                   f"{tuple(kpm.shape)}")
            kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = torch.baddbmm(mask, q * (1.0 / math.sqrt(hd)), k.transpose(-2, -1)) if mask is not None \
                else torch.bmm(q * (1.0 / math.sqrt(hd)), k.transpose(-2, -1))
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)  # [B*H, L, hd]
            out = out.transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
        else:
            if mask is not None:
                mask = mask.view(bsz, h, -1, src_len) if mask.shape[0] == bsz * h else mask.unsqueeze(0)
            out = F.scaled_dot_product_attention(q.view(bsz, h, tgt_len, hd), k.view(bsz, h, src_len, hd),
                                                 v.view(bsz, h, src_len, hd), attn_mask=mask,
                                                 dropout_p=dropout_p, is_causal=sdpa_causal)
            out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, self.embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, self.embed_dim)

        attn = None
        if need_weights:
            attn = weights.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                attn = attn.mean(dim=1)
            if unbatched:
                attn = attn.squeeze(0)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, attn

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")
