"""FLUX.2 [klein] transformer in plain PyTorch, with the reference-token path made explicit.

Token layout inside the model: [text | target | references]. References are any set of reference
tokens (all of them, or the subset Sparse Context keeps) with their original (t, h, w, l) ids; since
positions come only from the ids, dropping a token is just dropping a row of (ref, ref_ids).

Two ways references can attend (see `attention`):
  - standard klein: references get the current t and attend to everything (full attention);
  - the KV pattern (klein-9b-kv): references get t = 0 and attend only to references, so their K/V
    never change across denoising steps and can be computed once and cached (`KVCache`).

Parameter names follow BFL's single-file checkpoints; diffusers folders are converted on load
(checkpoints.py). 8-bit weights (quant.py), LoRA (lora.py) and the attention selector
(attention_selector.py) plug in from outside.

May import: files, checkpoints. Nothing else of this project.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_checkpoint
from files import load_into


@dataclass
class Flux2Config:
    in_channels: int = 128  # 32 VAE latent channels x 2x2 patch
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5  # double-stream blocks
    depth_single: int = 20  # single-stream blocks
    context_dim: int = 7680  # 3 x Qwen3 hidden size (three hidden layers stacked)
    mlp_ratio: float = 3.0
    axes_dim: tuple = (32, 32, 32, 32)  # RoPE dims of the (t, h, w, l) axes; sums to head_dim
    theta: int = 2000
    time_dim: int = 256  # sinusoidal timestep features
    eps: float = 1e-6

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self):
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_name(cls, name):
        presets = {
            "klein-4b": dict(hidden_size=3072, num_heads=24, depth=5, depth_single=20, context_dim=7680),
            "klein-9b": dict(hidden_size=4096, num_heads=32, depth=8, depth_single=24, context_dim=12288),
        }
        if name not in presets:
            raise ValueError(f"unknown config {name!r}; choose from {sorted(presets)}")
        return cls(**presets[name])


# ----------------------------------------------------------------------------------------------
# Building blocks


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features [cos | sin] of t (B,) -> (B, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids, axes_dim, theta):
    """cos and sin of the rotation angles of 4-axis ids (B, L, 4) -> (B, L, 1, head_dim / 2, 2) float32.

    Angles in float64, rounded to float32 once: a sampling run computes this table once (its ids never
    change, see Flux2.rope) and every step and image of the run reuses it.
    """
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[..., i].double()[..., None] * omega)  # (B, L, d / 2)
    angles = torch.cat(angles, dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()[:, :, None]


def apply_rope(x, pe):
    """Rotate interleaved pairs (a, b) = (x[2j], x[2j+1]) of x (B, L, H, D) by the angles of pe.

    BFL's real 2x2 form (a cos - b sin, a sin + b cos), in float32: no complex numbers, so Inductor
    compiles it.
    """
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D / 2)
    cos, sin = pe.unbind(-1)  # (B or 1, L, 1, D / 2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # statistics in float32 (a no-op when x already is)
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * rrms).type_as(x) * self.scale


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (over head_dim), before RoPE."""

    def __init__(self, head_dim):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q, k):
        return self.query_norm(q), self.key_norm(k)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class SwiGLU(nn.Module):
    def forward(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class Modulation(nn.Module):
    """Shift, scale and gate vectors from the timestep embedding, shared by every block."""

    def __init__(self, dim, double):
        super().__init__()
        self.n = 6 if double else 3
        self.lin = nn.Linear(dim, self.n * dim, bias=False)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None].chunk(self.n, dim=-1)  # n x (B, 1, D)


def ref_modulation(mods, ref_mods, n_ref, seq_len):
    """Give the last n_ref tokens the references' own modulation: n x (B, seq_len, D)."""
    if not n_ref:
        return mods
    B = mods[0].shape[0]
    return tuple(
        torch.cat([m.expand(B, seq_len - n_ref, -1), r.expand(B, n_ref, -1)], dim=1) for m, r in zip(mods, ref_mods)
    )


def modulate(x, shift, scale, eps):
    """(1 + scale) * LayerNorm(x) + shift; addcmul does the multiply-add in one pass over x."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def gated(x, gate, y):
    """The gated residual x + gate * y, in one pass."""
    return torch.addcmul(x, gate, y)


class KVCache:
    """Reference K/V (after QK-norm and RoPE) of every block, from the step that extracted them.

    Empty: the next forward with references runs them in the KV pattern and fills it.
    Filled: later forwards take no references and attend to these instead, read in place: a cache
    extracted from one image serves a batch of any size (see `cached_attention`).
    """

    def __init__(self):
        self.kv = []  # one (k, v) per block, each (B, H, M, D) (a transposed view); double blocks first

    def __len__(self):
        return len(self.kv)

    @property
    def num_ref_tokens(self):
        return self.kv[0][0].shape[2] if self.kv else 0


def sdpa(q, k, v):
    """Softmax attention on (B, L, H, D) tensors -> (B, L, H, D).

    SDPA takes (B, H, L, D): transposed views suffice (as diffusers passes them), and its fused
    kernels lay the output out as (B, L, H, D), so no transpose here copies anything. No mask is
    ever passed: every kernel (FlashAttention included) can run.
    """
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def sdpa_lse(q, k, v):
    """Attention and the log-sum-exp of its scores: q (B, H, Lq, D), k, v (B, H, Lk, D) -> out
    (B, H, Lq, D), lse (B, H, Lq) float32.

    The fused kernels compute the LSE anyway and return it from their aten ops (PyTorch's context
    parallelism merges attention blocks with it); other devices take the math.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    elif q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        out, lse = sdpa_lse_math(q, k, v)
    return out, lse[..., : q.shape[2]]  # the efficient kernel pads the LSE's rows


def sdpa_lse_math(q, k, v):
    """sdpa_lse written out (every score materialized, in float32): for devices without a fused kernel."""
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v.float()).type_as(q), lse


def cached_attention(q, k, v, k_ref, v_ref):
    """Attention of fresh q, k, v (B, L, H, D) over [fresh keys | cached keys] -> (B, L, H, D).

    k_ref, v_ref (Bc, H, M, D) are read in place, never concatenated: the two parts are attended
    separately and merged exactly by their log-sum-exps (softmax over the union = w softmax(fresh) +
    (1 - w) softmax(cached), w = sigmoid(lse_fresh - lse_cached)). A cache extracted from one image
    (Bc = 1) serves all B images at once: their queries become rows of one (1, H, B * L, D) query.
    """
    B, L, H, D = q.shape
    o_new, lse_new = sdpa_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, .)
    o_ref, lse_ref = sdpa_lse(q.reshape(k_ref.shape[0], -1, H, D).transpose(1, 2), k_ref, v_ref)  # (Bc, H, B / Bc * L, .)
    o_ref, lse_ref = o_ref.transpose(1, 2).reshape(B, L, H, D), lse_ref.transpose(1, 2).reshape(B, L, H, 1)
    w = torch.sigmoid(lse_new.transpose(1, 2)[..., None] - lse_ref)  # (B, L, H, 1)
    return torch.lerp(o_ref.float(), o_new.transpose(1, 2).float(), w).type_as(q)


def attention(q, k, v, n_kv_ref=0, cached=None, store=None):
    """Joint attention over [text | target | references]; q, k, v (B, L, H, D) -> (B, L, H * D).

    The one place reference K/V are cached and reused; the caller says which of three cases runs:
      cached (k_ref, v_ref): this block's entry of a filled KVCache; the queries attend to the fresh
        keys and to these (the step runs no reference token);
      n_kv_ref > 0: the last n_kv_ref tokens are references in the KV pattern: they attend only to
        themselves, the rest attend to all; store: a KVCache's list, their K/V are appended to it;
      neither: plain joint attention (standard klein, references included if any).
    """
    if cached is not None:
        out = cached_attention(q, k, v, *cached)
    elif n_kv_ref:
        n = n_kv_ref
        if store is not None:  # one buffer per block, written once; a view would keep every token's K/V alive
            store.append((k[:, -n:].clone().transpose(1, 2), v[:, -n:].clone().transpose(1, 2)))
        out = torch.cat([sdpa(q[:, :-n], k, v), sdpa(q[:, -n:], k[:, -n:], v[:, -n:])], dim=1)
    else:
        out = sdpa(q, k, v)
    return out.flatten(2)


def split_heads(qkv, num_heads):
    """(B, L, 3 * H * D) -> q, k, v (B, L, H, D), views."""
    return qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)


class SelfAttention(nn.Module):
    """The projections of one stream of a double block (attention itself is joint)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Text and image streams with their own weights, joined only in attention."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        dim, hidden = cfg.hidden_size, cfg.mlp_hidden
        self.eps = cfg.eps
        self.img_attn = SelfAttention(dim, cfg.num_heads)
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))
        self.txt_attn = SelfAttention(dim, cfg.num_heads)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))

    def qkv(self, img, txt, img_mod, txt_mod, pe):
        """q, k (after QK-norm and RoPE), v of [text | image] tokens: (B, L + N + M, H, D) each."""
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, img_mod[0], img_mod[1], self.eps))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, txt_mod[0], txt_mod[1], self.eps))
        return apply_rope(torch.cat([tq, iq], dim=1), pe), apply_rope(torch.cat([tk, ik], dim=1), pe), torch.cat([tv, iv], dim=1)

    def forward(self, img, txt, img_mod, txt_mod, pe, n_kv_ref=0, cached=None, store=None):
        # img (B, N + M, D): target then reference tokens (both use the image weights); txt (B, L, D)
        _, _, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod
        _, _, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod
        out = attention(*self.qkv(img, txt, img_mod, txt_mod, pe), n_kv_ref, cached, store)
        L = txt.shape[1]
        img = gated(img, i_gate1, self.img_attn.proj(out[:, L:]))
        img = gated(img, i_gate2, self.img_mlp(modulate(img, i_shift2, i_scale2, self.eps)))
        txt = gated(txt, t_gate1, self.txt_attn.proj(out[:, :L]))
        txt = gated(txt, t_gate2, self.txt_mlp(modulate(txt, t_shift2, t_scale2, self.eps)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over all tokens; attention and MLP run in parallel from one fused projection."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        dim, hidden = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads, self.eps, self.split = cfg.num_heads, cfg.eps, (3 * dim, 2 * hidden)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * hidden, bias=False)  # [q | k | v | mlp gate | mlp up]
        self.linear2 = nn.Linear(dim + hidden, dim, bias=False)  # on [attention out | mlp hidden]
        self.norm = QKNorm(cfg.head_dim)
        self.mlp_act = SwiGLU()

    def qkv(self, x, mod, pe):
        """q, k (after QK-norm and RoPE), v (B, L, H, D) of all tokens, and the MLP's input (B, L, 2M)."""
        qkv, mlp = self.linear1(modulate(x, mod[0], mod[1], self.eps)).split(self.split, dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        return apply_rope(q, pe), apply_rope(k, pe), v, mlp

    def forward(self, x, mod, pe, n_kv_ref=0, cached=None, store=None):
        q, k, v, mlp = self.qkv(x, mod, pe)
        out = attention(q, k, v, n_kv_ref, cached, store)
        return gated(x, mod[2], self.linear2(torch.cat([out, self.mlp_act(mlp)], dim=-1)))


class LastLayer(nn.Module):
    def __init__(self, dim, out_channels, eps):
        super().__init__()
        self.eps = eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale, self.eps))


# ----------------------------------------------------------------------------------------------
# The model


class Flux2(nn.Module):
    def __init__(self, cfg: Flux2Config):
        super().__init__()
        assert sum(cfg.axes_dim) == cfg.head_dim, "RoPE axes must cover head_dim"
        self.cfg = cfg
        D = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, D, bias=False)
        self.txt_in = nn.Linear(cfg.context_dim, D, bias=False)
        self.time_in = MLPEmbedder(cfg.time_dim, D)
        self.double_stream_modulation_img = Modulation(D, double=True)
        self.double_stream_modulation_txt = Modulation(D, double=True)
        self.single_stream_modulation = Modulation(D, double=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(D, cfg.in_channels, cfg.eps)
        self.gradient_checkpointing = False

    def forward(self, img, img_ids, txt, txt_ids, t, ref=None, ref_ids=None, kv_cache=None, kv_pattern=False, pe=None):
        """Velocity of the target tokens (B, N, C).

        img (B, N, C) target tokens, img_ids (B, N, 4) or (N, 4); txt (B, L, J), txt_ids; t (B,) sigma
        in [0, 1]; ref (B, M, C), ref_ids: any set of reference tokens with their original ids.
        kv_cache: empty -> run the references in the KV pattern and store their K/V; filled -> reuse
        them (pass no ref). kv_pattern=True gives the KV pattern without a cache (training).
        pe: self.rope(txt_ids, img_ids, ref_ids) when the caller has it (a sampling run computes it
        once; a cached step passes the [text | target] rows); else computed here.
        """
        B, N, _ = img.shape
        n_ref = 0 if ref is None else ref.shape[1]
        read = kv_cache is not None and len(kv_cache) > 0  # a filled cache stands in for the references
        if read and n_ref:
            raise ValueError("the KV cache is already filled: call without ref to reuse it")
        fill = kv_cache is not None and n_ref > 0  # this call extracts the references' K/V into the cache
        kv_refs = n_ref > 0 and (kv_pattern or fill)  # references at t = 0, self-attending

        vec = self.time_in(timestep_embedding(t.to(img.dtype) * 1000, self.cfg.time_dim).to(img.dtype))
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)
        if kv_refs:
            ref_vec = self.time_in(timestep_embedding(torch.zeros_like(t, dtype=img.dtype), self.cfg.time_dim).to(img.dtype))
            img_mod = ref_modulation(img_mod, self.double_stream_modulation_img(ref_vec), n_ref, N + n_ref)
            single_mod = ref_modulation(single_mod, self.single_stream_modulation(ref_vec), n_ref, txt.shape[1] + N + n_ref)

        if pe is None:
            pe = self.rope(txt_ids, img_ids, ref_ids if n_ref else None)
        if pe.shape[1] != txt.shape[1] + N + n_ref:
            raise ValueError(f"pe has {pe.shape[1]} positions for {txt.shape[1]} text, {N} target and {n_ref} reference tokens")

        x = self.img_in(img if not n_ref else torch.cat([img, ref], dim=1))  # (B, N + M, D)
        c = self.txt_in(txt)  # (B, L, D)
        n_kv_ref = n_ref if kv_refs else 0
        store = kv_cache.kv if fill else None  # every block appends its reference K/V
        cached = kv_cache.kv if read else [None] * (self.cfg.depth + self.cfg.depth_single)  # block i reads entry i
        for i, block in enumerate(self.double_blocks):
            x, c = self._run(block, x, c, img_mod, txt_mod, pe, n_kv_ref, cached[i], store)
        x = torch.cat([c, x], dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run(block, x, single_mod, pe, n_kv_ref, cached[self.cfg.depth + i], store)
        x = x[:, c.shape[1] : c.shape[1] + N]
        return self.final_layer(x, vec)

    def rope(self, txt_ids, img_ids, ref_ids=None):
        """RoPE table of the [text | target | references] positions: (1, L + N + M, 1, head_dim / 2, 2),
        shared by the batch, or (B, ...) when some ids are per example (B, ., 4). Its first L + N rows
        are the table without references (a cached step's)."""
        ids = [i for i in (txt_ids, img_ids, ref_ids) if i is not None]
        B = max(i.shape[0] if i.ndim == 3 else 1 for i in ids)
        return rope(torch.cat([(i if i.ndim == 3 else i[None]).expand(B, -1, -1) for i in ids], dim=1), self.cfg.axes_dim, self.cfg.theta)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @classmethod
    def from_pretrained(cls, source, dtype=None, device=None):
        """Load a diffusers transformer/ folder, a repository folder, a BFL single file or a hub id
        (checkpoints.load_checkpoint). Built on the meta device, the memory-mapped weights assigned:
        peak memory is about one copy. 8-bit weights: quant.from_pretrained."""
        fields, sd = load_checkpoint(source)
        if any(k.endswith(".weight_scale") for k in sd):
            raise ValueError(f"{source} holds fp8 weights with scales (a BFL fp8 file): load it with 8-bit weights fp8 (quant.from_pretrained)")
        with torch.device("meta"):
            model = cls(Flux2Config(**fields))
        load_into(model, sd, dtype, device)
        return model.eval()
