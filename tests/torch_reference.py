"""Small PyTorch models with the parameter names of the papers' own releases, for parity tests.

No library builds these files' models: DeiT and MAE released timm-0.3.2 ViTs plus their own
modules, LV-ViT its own stem and token head.  These modules are written from the papers and the
layouts in the releases (names, shapes, forward passes), independently of vit_jax:

  ViT    cls (+ DeiT's dist) token, learned pos_embed, pre-norm blocks; heads: class token,
         distilled (mean of `head` and `head_dist`), or MAE fine-tuning's global pool + `fc_norm`
  MAE    encoder on the visible patches, decoder with `mask_token`, sin-cos tables, pixel loss
  LVViT  conv stem with BatchNorm, blocks scaled by 1 / skip_lam, `head` + 0.5 * max of `aux_head`

The ViT's blocks also take ViT-22B's options under timm's names (QK-norm, RMSNorm, no output / MLP
biases, the parallel block), written from the ViT-22B paper.

Images are NCHW, as torch takes them.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_norm(kind, dim, eps=1e-6):
  """"layernorm", or ViT-22B's "rmsnorm": x / sqrt(mean(x^2) + eps) * weight (no centring, no bias)."""
  return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


def attend(q, k, v, q_norm=None, k_norm=None):
  """softmax(norm(q) norm(k)^T / sqrt(d)) v over `[batch, heads, tokens, d]`; QK-norm per head (ViT-22B)."""
  if q_norm is not None:
    q, k = q_norm(q), k_norm(k)
  weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
  return weights @ v


class Attention(nn.Module):
  def __init__(self, dim, heads, qkv_bias=True, *, qk_norm=None, proj_bias=True):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    if qk_norm:
      self.q_norm, self.k_norm = make_norm(qk_norm, dim // heads), make_norm(qk_norm, dim // heads)
    self.proj = nn.Linear(dim, dim, bias=proj_bias)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = attend(q, k, v, getattr(self, "q_norm", None), getattr(self, "k_norm", None))
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim, hidden, bias=True):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
  """Pre-norm block; `qk_norm`, `proj_bias` (attention output and MLP) and `norm_type` as timm's `Block`."""

  def __init__(self, dim, heads, hidden, *, qkv_bias=True, eps=1e-6, skip_lam=1.0, qk_norm=None, proj_bias=True,
               norm_type="layernorm"):
    super().__init__()
    self.skip_lam = skip_lam
    self.norm1, self.norm2 = make_norm(norm_type, dim, eps), make_norm(norm_type, dim, eps)
    self.attn = Attention(dim, heads, qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias)
    self.mlp = Mlp(dim, hidden, bias=proj_bias)

  def forward(self, x):
    x = x + self.attn(self.norm1(x)) / self.skip_lam
    return x + self.mlp(self.norm2(x)) / self.skip_lam


class ParallelBlock(nn.Module):
  """ViT-22B's parallel block: y = LN(x); x + attention(y) + MLP(y), the attention's q, k, v and the MLP's
  input projection in one matrix `in_proj` (rows: MLP, q, k, v), as timm's `ParallelScalingBlock`."""

  def __init__(self, dim, heads, hidden, *, qkv_bias=True, qk_norm=None, proj_bias=True, norm_type="layernorm"):
    super().__init__()
    self.heads, self.hidden = heads, hidden
    self.in_norm = make_norm(norm_type, dim)
    self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=qkv_bias)
    if not qkv_bias:
      self.mlp_bias = nn.Parameter(torch.zeros(hidden))
    if qk_norm:
      self.q_norm, self.k_norm = make_norm(qk_norm, dim // heads), make_norm(qk_norm, dim // heads)
    self.attn_out_proj = nn.Linear(dim, dim, bias=proj_bias)
    self.mlp_out_proj = nn.Linear(hidden, dim, bias=proj_bias)

  def forward(self, x):
    b, n, d = x.shape
    m, q, k, v = self.in_proj(self.in_norm(x)).split([self.hidden, d, d, d], dim=-1)
    if hasattr(self, "mlp_bias"):
      m = m + self.mlp_bias
    heads = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
    out = attend(heads(q), heads(k), heads(v), getattr(self, "q_norm", None), getattr(self, "k_norm", None))
    return x + self.attn_out_proj(out.transpose(1, 2).reshape(b, n, d)) + self.mlp_out_proj(F.gelu(m))


class PatchEmbed(nn.Module):
  def __init__(self, channels, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(channels, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
  """DeiT's and MAE fine-tuning's ViT (timm 0.3.2 names); `num_classes=0`: the normalised tokens."""

  def __init__(self, *, grid, patch, dim, depth, heads, hidden, num_classes, channels=3, distilled=False,
               global_pool=False, norm=True, parallel=False, **block):
    super().__init__()
    self.distilled, self.global_pool = distilled, global_pool
    self.patch_embed = PatchEmbed(channels, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    if distilled:
      self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1 + int(distilled), dim))
    self.blocks = nn.ModuleList([(ParallelBlock if parallel else Block)(dim, heads, hidden, **block)
                                 for _ in range(depth)])
    kind = block.get("norm_type", "layernorm")
    if global_pool:
      self.fc_norm = make_norm(kind, dim)
    elif norm:
      self.norm = make_norm(kind, dim)
    if num_classes:
      self.head = nn.Linear(dim, num_classes)
      if distilled:
        self.head_dist = nn.Linear(dim, num_classes)
    self.num_classes = num_classes

  def forward(self, images):
    x = self.patch_embed(images)
    prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
    x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    if self.global_pool:
      return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))
    x = self.norm(x) if hasattr(self, "norm") else x
    if not self.num_classes:
      return x
    if self.distilled:
      return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
    return self.head(x[:, 0])


def sincos_table(dim, grid, cls_token=True):
  """MAE's fixed table: the first half of the channels encodes the column, the second the row;
  each half is [sin, cos] at frequencies 10000^(-k / (dim / 4)); a zero row for the class token."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij")
  half = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), omega)), np.cos(np.outer(pos.ravel(), omega))], 1)
  table = np.concatenate([half(cols), half(rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return torch.from_numpy(table[None].astype(np.float32))


class MAE(nn.Module):
  """The MAE release's pre-training model (`mae_visualize_vit_*.pth`, `*_full.pth` names)."""

  def __init__(self, *, grid, patch, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads, channels=3,
               mask_ratio=0.75, norm_pix_loss=False, mlp_ratio=4):
    super().__init__()
    self.patch, self.mask_ratio, self.norm_pix_loss = patch, mask_ratio, norm_pix_loss
    self.patch_embed = PatchEmbed(channels, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(sincos_table(dim, grid), requires_grad=False)
    self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio * dim) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.decoder_embed = nn.Linear(dim, decoder_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    self.decoder_pos_embed = nn.Parameter(sincos_table(decoder_dim, grid), requires_grad=False)
    self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio * decoder_dim)
                                         for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_dim, patch * patch * channels)

  def patchify(self, images):
    b, c, h, w = images.shape
    p = self.patch
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

  def forward(self, images, noise):
    x = self.patch_embed(images) + self.pos_embed[:, 1:]
    b, length, d = x.shape
    keep = int(length * (1 - self.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))
    tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, length - keep, -1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    target = self.patchify(images)
    if self.norm_pix_loss:
      target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    return loss, pred, mask


class LVViTStem(nn.Module):
  def __init__(self, channels, width, dim, patch):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, width, 7, 2, 3, bias=False)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.conv3 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(width), nn.BatchNorm2d(width), nn.BatchNorm2d(width)
    self.proj = nn.Conv2d(width, dim, patch // 2, patch // 2)

  def forward(self, x):
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
      x = F.relu(bn(conv(x)))
    return self.proj(x).flatten(2).transpose(1, 2)


class LVViT(nn.Module):
  """The LV-ViT release's classifier; returns (logits, token logits [B, patches, classes])."""

  def __init__(self, *, grid, patch, dim, depth, heads, num_classes, skip_lam, stem_width=64, channels=3):
    super().__init__()
    self.patch_embed = LVViTStem(channels, stem_width, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, heads, 3 * dim, qkv_bias=False, eps=1e-5, skip_lam=skip_lam)
                                 for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-5)
    self.head, self.aux_head = nn.Linear(dim, num_classes), nn.Linear(dim, num_classes)

  def forward(self, images):
    x = self.patch_embed(images)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    x = self.norm(x)
    tokens = self.aux_head(x[:, 1:])
    return self.head(x[:, 0]) + 0.5 * tokens.max(dim=1)[0], tokens


def perturb_(model, scale=0.1, seed=0):
  """Every trainable parameter and every BatchNorm running statistic moved away from its initial value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        p.add_(scale * torch.randn(p.shape, generator=gen))
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
        m.num_batches_tracked.fill_(123)
  return model.eval()


class TalkingHeadsAttention(nn.Module):
  """CaiT's self-attention: logits mixed across heads by `proj_l` before the softmax, probabilities by `proj_w`
  after it (no renormalisation)."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.proj_l, self.proj_w = nn.Linear(heads, heads), nn.Linear(heads, heads)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    logits = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)  # [b, h, n, n]
    mix = lambda layer, a: layer(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # a Linear over the head axis
    weights = mix(self.proj_w, torch.softmax(mix(self.proj_l, logits), dim=-1))
    return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class ClassAttention(nn.Module):
  """Only the class token queries; keys and values come from [class token, patches]."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

  def forward(self, u):
    b, n, d = u.shape
    split = lambda t: t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)
    q, k, v = split(self.q(u[:, :1])), split(self.k(u)), split(self.v(u))
    weights = torch.softmax((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, 1, d))


class CaiTBlock(nn.Module):
  def __init__(self, dim, heads, hidden, attention):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn, self.mlp = attention, Mlp(dim, hidden)
    self.gamma_1, self.gamma_2 = nn.Parameter(1e-5 * torch.ones(dim)), nn.Parameter(1e-5 * torch.ones(dim))


class CaiT(nn.Module):
  """CaiT (Touvron et al. 2021) under the names of its release / timm's `Cait`."""

  def __init__(self, *, grid, patch, dim, depth, heads, hidden, num_classes, class_depth=2, channels=3):
    super().__init__()
    self.patch_embed = PatchEmbed(channels, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))  # patches only
    self.blocks = nn.ModuleList([CaiTBlock(dim, heads, hidden, TalkingHeadsAttention(dim, heads))
                                 for _ in range(depth)])
    self.blocks_token_only = nn.ModuleList([CaiTBlock(dim, heads, hidden, ClassAttention(dim, heads))
                                            for _ in range(class_depth)])
    self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

  def forward(self, images):
    x = self.patch_embed(images) + self.pos_embed
    for blk in self.blocks:
      x = x + blk.gamma_1 * blk.attn(blk.norm1(x))
      x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    cls = self.cls_token.expand(x.shape[0], -1, -1)
    for blk in self.blocks_token_only:
      u = torch.cat([cls, x], dim=1)
      cls = cls + blk.gamma_1 * blk.attn(blk.norm1(u))
      cls = cls + blk.gamma_2 * blk.mlp(blk.norm2(cls))
    return self.head(self.norm(cls[:, 0]))
