"""Models shared by the examples and benchmarks: the FOGZO paper's MNIST MLP, a ResNet-20-style
CNN for 28×28 grayscale, and a tiny LLaMA-style decoder. All weight matrices are ``nn.Linear``/
``nn.Conv2d`` so :func:`metaste.quantize_model` quantizes them; the classifier / LM head is the
last such layer (kept in full precision by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mlp", "BasicBlock", "ResNet", "resnet20", "TinyLlama"]


def mlp(sizes: tuple[int, ...] = (784, 10, 10)) -> nn.Sequential:
    """Linear layers with ReLU between them; default 784-10-10 (the FOGZO paper's MNIST MLP)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a ReLU between, plus the (1×1 conv-BN when shapes change)
    shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for CIFAR-style inputs (He et al. 2016, §4.2): a 3×3 stem, three stages of
    ``blocks`` basic blocks with widths w, 2w, 4w (stride 2 between stages), global average pool,
    linear head. ``blocks=3, width=16`` is ResNet-20; smaller settings fit a CPU budget."""

    def __init__(self, blocks: int = 3, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stages.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def resnet20(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    return ResNet(3, 16, in_channels, num_classes)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (x1, x2) of each head by position-dependent angles (RoPE)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = _RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = _RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        )
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))  # SwiGLU


class TinyLlama(nn.Module):
    """A LLaMA-style causal decoder: token embedding, ``layers`` × (RMSNorm → attention with
    rotary positions → RMSNorm → SwiGLU MLP), final RMSNorm, linear LM head. The defaults
    (dim 128, 5 layers, 4 heads, hidden 344) give ≈ 1.0M parameters with the 63-character KJV
    vocabulary."""

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        layers: int = 5,
        heads: int = 4,
        hidden: int = 344,
        max_len: int = 256,
    ) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim={dim} must split into {heads} heads of even size")
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden) for _ in range(layers))
        self.norm = _RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        half = dim // heads // 2
        freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))
