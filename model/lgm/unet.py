"""LGM's asymmetric multi-view U-Net (Tang et al. 2024, "LGM", Sec. 3.2; 3DTopia/LGM
``core/unet.py``), re-written with the same module tree so official checkpoints load by name,
plus the zero-initialised time embedding of Ouroboros3D (``time_embedding.py``).

Every ResnetBlock and attention block scales its residual sum by ``skip_scale = sqrt(0.5)``;
attention is joint over the 4 input views ("multi-view attention": the tokens of all views of
one object attend to each other).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.lgm.config import LGMConfig
from model.lgm.time_embedding import NoiseLevelEmbedding, zero_linear

SKIP_SCALE = math.sqrt(0.5)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (no bias) and ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, C]"""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, C/heads]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MVAttention(nn.Module):
    """GroupNorm then self-attention over the tokens of all ``num_views`` views, residual."""

    def __init__(self, dim: int, heads: int, groups: int, num_views: int):
        super().__init__()
        self.num_views = num_views
        self.norm = nn.GroupNorm(groups, dim, eps=1e-5)
        self.attn = SelfAttention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B*V, C, H, W] -> same."""
        BV, C, H, W = x.shape
        V = self.num_views
        h = self.norm(x).reshape(BV // V, V, C, H, W).permute(0, 1, 3, 4, 2).reshape(BV // V, -1, C)
        h = self.attn(h).reshape(BV // V, V, H, W, C).permute(0, 1, 4, 2, 3).reshape(BV, C, H, W)
        return (h + x) * SKIP_SCALE


class ResnetBlock(nn.Module):
    """``(conv2(silu(norm2(conv1(silu(norm1(x))) + t))) + shortcut(x)) * skip_scale``, where
    ``t = time_emb_proj(silu(temb))`` is the (zero-initialised) time embedding."""

    def __init__(self, cin: int, cout: int, groups: int, temb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.time_emb_proj = zero_linear(temb_dim, cout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """x: [B*V, cin, H, W], temb: [B*V, temb_dim] or None -> [B*V, cout, H, W]"""
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.shortcut(x)) * SKIP_SCALE


def _attention_or_identity(use: bool, dim: int, cfg: LGMConfig) -> nn.Module:
    # nn.Identity has no parameters: the module indices (and so the key names) stay official.
    if use:
        return MVAttention(dim, cfg.attention_heads, cfg.norm_groups, cfg.num_input_views)
    return nn.Identity()


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, attention: bool, downsample: bool, cfg: LGMConfig):
        super().__init__()
        n = cfg.layers_per_block
        self.nets = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, cfg.norm_groups, cfg.time_embed_dim)
            for i in range(n)
        )
        self.attns = nn.ModuleList(_attention_or_identity(attention, cout, cfg) for _ in range(n))
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x, temb):
        skips = []
        for net, attn in zip(self.nets, self.attns):
            x = attn(net(x, temb))
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, channels: int, attention: bool, cfg: LGMConfig):
        super().__init__()
        g, t = cfg.norm_groups, cfg.time_embed_dim
        self.nets = nn.ModuleList([ResnetBlock(channels, channels, g, t), ResnetBlock(channels, channels, g, t)])
        self.attns = nn.ModuleList([_attention_or_identity(attention, channels, cfg)])

    def forward(self, x, temb):
        x = self.nets[0](x, temb)
        return self.nets[1](self.attns[0](x), temb)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, attention: bool, upsample: bool, cfg: LGMConfig):
        super().__init__()
        n = cfg.layers_per_block + 1  # one more layer on the way up
        self.nets = nn.ModuleList(
            ResnetBlock(
                (cin if i == 0 else cout) + (cskip if i == n - 1 else cout), cout,
                cfg.norm_groups, cfg.time_embed_dim,
            )
            for i in range(n)
        )  # fmt: skip
        self.attns = nn.ModuleList(_attention_or_identity(attention, cout, cfg) for _ in range(n))
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x, skips, temb):
        for i, (net, attn) in enumerate(zip(self.nets, self.attns)):  # skips used last-first
            x = attn(net(torch.cat([x, skips[-1 - i]], 1), temb))
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class MultiViewUNet(nn.Module):
    """``[B*V, 9, H, W] -> [B*V, 14, H', W']`` with ``H' = H / 2^(len(down)-1) * 2^(len(up)-1)``."""

    def __init__(self, cfg: LGMConfig, in_channels: int = 9, out_channels: int = 14):
        super().__init__()
        down, up = cfg.down_channels, cfg.up_channels
        self.num_views = cfg.num_input_views
        self.gradient_checkpointing = False
        self.time_embedding = NoiseLevelEmbedding(cfg.time_embed_channels, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(in_channels, down[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(down[max(i - 1, 0)], down[i], cfg.down_attention[i], i != len(down) - 1, cfg)
            for i in range(len(down))
        )
        self.mid_block = MidBlock(down[-1], cfg.mid_attention, cfg)
        self.up_blocks = nn.ModuleList(
            UpBlock(up[max(i - 1, 0)], down[max(-2 - i, -len(down))], up[i], cfg.up_attention[i],
                    i != len(up) - 1, cfg)
            for i in range(len(up))
        )  # fmt: skip
        self.norm_out = nn.GroupNorm(cfg.norm_groups, up[-1], eps=1e-5)
        self.conv_out = nn.Conv2d(up[-1], out_channels, 3, padding=1)

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B*V, 9, H, W]; c_noise: [B] noise level per object, or None (official LGM)."""
        temb = None
        if c_noise is not None:
            temb = self.time_embedding(c_noise).repeat_interleave(self.num_views, 0)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = self._run(block, x, temb)
            skips.extend(s)
        x = self._run(self.mid_block, x, temb)
        for block in self.up_blocks:
            n = len(block.nets)
            x = self._run(block, x, skips[-n:], temb)
            skips = skips[:-n]
        return self.conv_out(F.silu(self.norm_out(x)))
