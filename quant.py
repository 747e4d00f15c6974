"""Weight-only 8-bit Linears: klein-9B's 16.9 GiB of bf16 weights in about 8.8 GiB.

`Linear8` stores an 8-bit weight (int8 or float8_e4m3fn) and one float32 scale per output row,
W = weight * weight_scale[:, None]. Each call dequantizes that one layer's weight to the activations'
dtype for its matmul (and again in backward), so the model never holds a 16-bit copy of itself.
Activations, norms, the LoRA and the Linears outside the blocks keep the model's dtype.

BFL's fp8 single files (FLUX.2-klein-4b-fp8/flux-2-klein-4b-fp8.safetensors, 3.79 GiB; -9b-fp8,
-base-4b-fp8, -base-9b-fp8, -9b-kv-fp8), as public sources describe them:
  - the names of BFL's bf16 single files (optionally prefixed `model.diffusion_model.`);
  - every Linear of the double and single blocks (img/txt_attn.qkv and .proj, img/txt_mlp.0 and .2,
    linear1, linear2: 80 in klein-4B) has `weight` in float8_e4m3fn (out, in), a float32
    `weight_scale` and a float32 `input_scale`; everything else is bf16 (ComfyUI's scaled-fp8 layout:
    sgl-project/sglang#38514, whose "split to_q/to_k/to_v" are the names after its own conversion;
    the fp8 layers qkv, proj, linear1, linear2, img_mlp, txt_mlp: shootthesound/comfyUI-Realtime-Lora#44).
    That is 149 + 2 x 80 = 309 tensors, the count a public MLX conversion of the 4B file reports (split
    q, k, v would make 369), and 3.68B fp8 + 0.20B bf16 parameters = 3.79 GiB, the file's size.
  - W = weight * weight_scale (ComfyUI QUANTIZATION.md; leejet/stable-diffusion.cpp#1898). ComfyUI
    writes one 0-d scale per tensor; diffusers 0.42.1 reads BFL's `fp8r` checkpoints with one scale
    per row, shape (out,) (diffusers/quantizers/bfl, BFLQuantizationConfig). Which one the klein
    files hold was not confirmed: both load, a per-tensor scale repeated per row.
  - `input_scale` is the static activation scale of an fp8 x fp8 matmul: weight-only, we drop it.

It plugs in at load time, as gpt-fast's quantize.py does: `from_pretrained(source, "int8", dtype,
device)` in place of `Flux2.from_pretrained(source, dtype, device)`; the model never knows.

May import: files, checkpoints, model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_checkpoint
from files import load_into
from model import Flux2, Flux2Config

FORMATS = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}  # storage dtype, largest value
BLOCKS = ("double_blocks.", "single_blocks.")  # the Linears BFL's fp8 files hold in 8 bits; we quantize the same


def check_weights(kind):
    if kind not in FORMATS:
        raise ValueError(f"weights {kind!r}: choose one of {', '.join(FORMATS)}")


def quantize(w, kind):
    """w (out, in) -> (8-bit weight, float32 scale (out,)), weight * scale[:, None] ~ w.

    Each row's largest |w| maps to the format's largest value; int8 rounds to the nearest integer,
    e4m3 to the nearest of its values (3 mantissa bits). An all-zero row gets scale 1.
    """
    dtype, top = FORMATS[kind]
    w = w.float()
    scale = w.abs().amax(dim=1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w / scale[:, None]).clamp(-top, top)
    return (q.round() if kind == "int8" else q).to(dtype), scale


def dequantize(weight, scale, dtype):
    """weight * scale per row, in dtype: one layer's weight, for one matmul."""
    return weight.to(dtype) * scale.to(dtype)[:, None]


class Matmul8(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward: autograd saves the 8-bit weight, not
    W, so a training step does not keep every layer's 16-bit weight from forward to backward."""

    @staticmethod
    def forward(ctx, x, weight, scale):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad @ dequantize(weight, scale, grad.dtype), None, None


def linear8(x, weight, scale):
    """x (..., in) @ (weight * scale)^T -> (..., out), in autocast's dtype when it is on (its matmul's)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return Matmul8.apply(x, weight, scale)


class Linear8(nn.Linear):
    """A bias-free Linear with a frozen 8-bit `weight` (out, in) and a float32 `weight_scale` (out,).

    An nn.Linear to whatever looks for one (LoRA injection); not its __init__, which would allocate a
    float32 weight.
    """

    def __init__(self, in_features, out_features, kind):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FORMATS[kind][0]), requires_grad=False)
        self.register_parameter("bias", None)
        self.register_buffer("weight_scale", torch.empty(out_features))

    matmul = staticmethod(linear8)  # what a LoRA over this layer calls (lora.LoRALinear)

    def forward(self, x):
        return linear8(x, self.weight, self.weight_scale)


def row_scales(scale, out_features, key):
    """A file's weight_scale, per tensor (one value) or per row, as float32 (out,)."""
    if scale.numel() not in (1, out_features) or scale.squeeze().ndim > 1:
        raise ValueError(f"{key}: shape {tuple(scale.shape)} is neither one scale nor one per row of {out_features}")
    return scale.float().reshape(-1).expand(out_features).contiguous()


def to_8bit(model, sd, kind, dtype=None, device=None):
    """Make the meta-device model's block Linears Linear8(kind) and return the state dict for it, every
    tensor final and on device: the file's fp8 layers as they are, the other block Linears quantized
    (on device, one at a time), everything else cast to dtype (None: kept). kind "fp8" or "int8"."""
    stored = {k.removesuffix(".weight_scale") for k in sd if k.endswith(".weight_scale")}
    if stored and kind != "fp8":
        raise ValueError("the checkpoint holds fp8 weights with scales (a BFL fp8 file): load it with weights fp8")
    check_weights(kind)
    sd, out = dict(sd), {}
    for name, m in list(model.named_modules()):
        key = f"{name}.weight"
        if not (isinstance(m, nn.Linear) and (name.startswith(BLOCKS) or name in stored) and key in sd):
            continue  # a missing weight is reported by load_into
        w = sd.pop(key)
        if name in stored:
            if w.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{key} is {w.dtype}, but it has a weight_scale: expected float8_e4m3fn")
            q, scale = w, row_scales(sd.pop(f"{name}.weight_scale"), w.shape[0], f"{name}.weight_scale")
            sd.pop(f"{name}.input_scale", None)
        else:
            q, scale = quantize(w.to(device), kind)
        out[key], out[f"{name}.weight_scale"] = q.to(device), scale.to(device)
        with torch.device("meta"):
            model.set_submodule(name, Linear8(m.in_features, m.out_features, kind))
    return out | {k: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype) for k, v in sd.items()}


def from_pretrained(source, weights, dtype=None, device=None):
    """Flux2.from_pretrained with the blocks' Linears in 8 bits (weights "fp8" or "int8"), the rest in
    dtype, quantized on load one layer at a time on `device`; a BFL fp8 file loads as it is (fp8)."""
    fields, sd = load_checkpoint(source)
    with torch.device("meta"):
        model = Flux2(Flux2Config(**fields))
    load_into(model, to_8bit(model, sd, weights, dtype, device))  # every tensor final, on device
    return model.eval()
