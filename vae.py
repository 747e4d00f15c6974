"""The FLUX.2 autoencoder (shared by every FLUX.2 model, klein included).

Image (B, 3, H, W) in [-1, 1]  <->  normalized latents (B, 128, H/16, W/16).

    encode: Encoder (3 stride-2 downsamples, quant_conv) -> mean of the posterior (B, 32, H/8, W/8)
            -> 2x2 patchify (B, 128, H/16, W/16) -> normalize with the frozen BatchNorm statistics
    decode: the exact inverse order, Decoder ends with conv_out (no clamp, no tanh)

Parameter names follow BFL's `ae.safetensors` (encoder.down.0.block.0.conv1.weight, ...), so that file
loads as is; diffusers `vae/` folders are renamed on load (`to_bfl_names`).

May import: files.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from torch import nn

from files import diffusers_weight_files, field, load_into, read_json, read_safetensors, resolve_component

PATCH = 2  # latents are cut into 2x2 patches: 32 channels x 4 = the 128 the transformer sees


@dataclass
class AutoEncoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2  # resnets per encoder level; the decoder uses one more
    latent_channels: int = 32  # z; the encoder emits 2*z (mean, logvar)
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4  # of the latent BatchNorm, not of the GroupNorms (those use 1e-6)

    @property
    def downscale(self) -> int:
        # pixels per latent token: 2 per downsample, times the 2x2 patchify
        return 2 ** (len(self.block_out_channels) - 1) * PATCH


# ---------------------------------------------------------------------------------------------------------------
# building blocks


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a (1x1-projected if needed) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, head dim = C (scale 1/sqrt(C)), residual.

    q/k/v/proj_out are 1x1 convs (BFL layout); diffusers stores the same weights as Linear [C, C].
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W, C)
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a 3x3 stride-2 conv with no padding.

    torch convs only pad symmetrically; (0, 1, 0, 1) is what the weights were trained with.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (the only attention in the VAE)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: resnets, then an optional resample, named as BFL names it.

    `encoder.down.i` ends in a Downsample (`downsample`) except on the last level; `decoder.up.i` in an
    Upsample (`upsample`) except on level 0. BFL indexes decoder levels by resolution like the encoder
    does (up.0 is the full-resolution, last-run level); diffusers numbers them in execution order, so
    up.i == up_blocks.(L-1-i).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, resample: str | None):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(channels[j], channels[j + 1], groups) for j in range(num_blocks))
        self.resample = resample  # None, "downsample" or "upsample": the attribute holding it
        if resample is not None:
            setattr(self, resample, (Downsample if resample == "downsample" else Upsample)(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class Encoder(nn.Module):
    """(B, 3, H, W) -> moments (B, 2z, H/8, W/8) = [mean, logvar], quant_conv included (as in BFL)."""

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, "downsample" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = MidBlock(ch[-1], groups)
        self.norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """z (B, z, h, w) -> image (B, 3, 8h, 8w), post_quant_conv included (as in BFL)."""

    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], groups)
        # level i goes from the channels of level i+1 (the one run before it) to ch[i]
        self.up = nn.ModuleList(
            Level(ch[min(i + 1, n - 1)], ch[i], cfg.layers_per_block + 1, groups, "upsample" if i > 0 else None)
            for i in range(n)
        )
        self.norm_out = group_norm(ch[0], groups)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------------------
# latent layout helpers (pure functions; sample.py uses them too)


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); output channel c*4 + pi*2 + pj holds z[c, 2i+pi, 2j+pj]."""
    B, C, H, W = z.shape
    if H % PATCH or W % PATCH:
        raise ValueError(f"patchify: H and W must be even, got {H}x{W}")
    z = z.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH)  # b c i pi j pj
    return z.permute(0, 1, 3, 5, 2, 4).reshape(B, C * PATCH * PATCH, H // PATCH, W // PATCH)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w); inverse of `patchify`."""
    B, C4, h, w = z.shape
    z = z.reshape(B, C4 // (PATCH * PATCH), PATCH, PATCH, h, w)  # b c pi pj i j
    return z.permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // (PATCH * PATCH), h * PATCH, w * PATCH)


# ---------------------------------------------------------------------------------------------------------------
# the autoencoder


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig | None = None):
        super().__init__()
        cfg = cfg or AutoEncoderConfig()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Frozen per-channel statistics of the patchified latents (affine=False). Only its buffers are used,
        # by hand in normalize/denormalize, so .train() can neither update them nor switch to batch stats.
        self.bn = nn.BatchNorm2d(PATCH * PATCH * cfg.latent_channels, eps=cfg.batch_norm_eps, affine=False)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Patchified latents -> the ~unit-variance space the transformer works in (computed in float32)."""
        mean, std = self._bn_stats()
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn_stats()
        return (z.float() * std + mean).to(z.dtype)

    def _bn_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean, std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalized latents (B, 128, H/16, W/16), deterministic (posterior mean)."""
        cfg, f = self.config, self.config.downscale
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects (B, {cfg.in_channels}, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"encode: H and W must be multiples of {f}, got {x.shape[2]}x{x.shape[3]}")
        weight = self.encoder.conv_in.weight
        moments = self.encoder(x.to(weight.device, weight.dtype))  # (B, 2z, H/8, W/8)
        mean = moments[:, : cfg.latent_channels]  # drop logvar: no sampling
        return self.normalize(patchify(mean))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, 128, h, w) -> images (B, 3, 16h, 16w), roughly in [-1, 1] but not clamped."""
        c = PATCH * PATCH * self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"decode expects normalized latents (B, {c}, h, w), got shape {tuple(z.shape)}")
        weight = self.decoder.conv_in.weight
        z = self.denormalize(z.to(weight.device)).to(weight.dtype)  # denormalize before any downcast
        return self.decoder(unpatchify(z))

    # -----------------------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> "AutoEncoder":
        """Load weights from any of:
        - a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors),
        - a repository folder holding such a `vae/` folder,
        - a BFL single file (`ae.safetensors`); the config is read off the tensor shapes (GroupNorm groups and
          the BatchNorm eps cannot be, and take the FLUX.2 defaults 32 and 1e-4),
        - a hub repo id (only its `vae/` folder is downloaded).
        The model is built on the meta device and takes the file's tensors as its parameters (no random init, no
        second copy). dtype=None keeps the file's dtypes.
        """
        path = Path(resolve_component(source, "vae", ["vae/*"], download=snapshot_download))
        if path.is_file():
            sd = read_safetensors([path])
            from_diffusers = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)
            if from_diffusers:
                sd = to_bfl_names(sd, _num_levels(sd, "encoder.down_blocks."))
            cfg = config_from_state_dict(sd)
        else:
            config_file = path / "config.json"
            if not config_file.exists():
                raise FileNotFoundError(f"{config_file} not found: not a diffusers VAE folder or repository")
            cfg = config_from_diffusers(read_json(config_file), config_file)
            sd = read_safetensors(diffusers_weight_files(path, "diffusion_pytorch_model"))
            sd, from_diffusers = to_bfl_names(sd, len(cfg.block_out_channels)), True

        with torch.device("meta"):
            model = cls(cfg)
        # BFL's file may lack this counter (it is bookkeeping, never read here)
        sd.setdefault("bn.num_batches_tracked", torch.zeros((), dtype=torch.long))

        def file_name(k):  # errors name keys as the file does
            return _rename(k, len(cfg.block_out_channels), to_bfl=False) if from_diffusers else k

        return load_into(model, sd, dtype, device, file_name).eval()


# ---------------------------------------------------------------------------------------------------------------
# configs and checkpoints


def config_from_diffusers(config: dict, path="config.json") -> AutoEncoderConfig:
    """AutoEncoderConfig from a diffusers `AutoencoderKLFlux2` config.json (read from path); rejects settings
    this code lacks, and values of the wrong type or sign."""
    if config.get("_class_name", "AutoencoderKLFlux2") != "AutoencoderKLFlux2":
        raise ValueError(f"expected an AutoencoderKLFlux2 config, got _class_name={config['_class_name']!r}")
    fixed = {  # the FLUX.2 architecture; anything else would silently compute something different
        "act_fn": "silu",
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "patch_size": [PATCH, PATCH],
        "decoder_block_out_channels": None,
    }
    bad = {k: config[k] for k, v in fixed.items() if k in config and _as_list(config[k]) != _as_list(v)}
    if bad:
        raise ValueError(f"unsupported AutoencoderKLFlux2 settings: {bad}")
    d = AutoEncoderConfig()
    cfg = AutoEncoderConfig(
        in_channels=field(config, "in_channels", path, default=d.in_channels),
        out_channels=field(config, "out_channels", path, default=d.out_channels),
        block_out_channels=field(config, "block_out_channels", path, list, default=d.block_out_channels),
        layers_per_block=field(config, "layers_per_block", path, default=d.layers_per_block),
        latent_channels=field(config, "latent_channels", path, default=d.latent_channels),
        norm_num_groups=field(config, "norm_num_groups", path, default=d.norm_num_groups),
        batch_norm_eps=field(config, "batch_norm_eps", path, float, default=d.batch_norm_eps),
    )
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        raise ValueError(f"{path}: field 'block_out_channels' {list(cfg.block_out_channels)} must be multiples of "
                         f"norm_num_groups {cfg.norm_num_groups}")
    return cfg


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> AutoEncoderConfig:
    """Read the architecture off a BFL-named state dict's shapes."""
    try:
        n = _num_levels(sd, "encoder.down.")
        return AutoEncoderConfig(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            block_out_channels=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)),
            layers_per_block=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
            latent_channels=sd["decoder.conv_in.weight"].shape[1],
        )
    except KeyError as e:
        raise ValueError(f"not a FLUX.2 autoencoder checkpoint: no tensor {e}") from None


def _num_levels(sd, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# diffusers prefix <-> BFL prefix; {i} is a level index (reversed for decoder levels, see Level)
_RENAMES = [
    ("quant_conv.", "encoder.quant_conv."),
    ("post_quant_conv.", "decoder.post_quant_conv."),
    ("encoder.down_blocks.{i}.resnets.", "encoder.down.{i}.block."),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{i}.resnets.", "decoder.up.{i}.block."),
    ("decoder.up_blocks.{i}.upsamplers.0.", "decoder.up.{i}.upsample."),
] + [
    (f"{part}.{d}", f"{part}.{b}")
    for part in ("encoder", "decoder")
    for d, b in [
        ("mid_block.resnets.0.", "mid.block_1."),
        ("mid_block.resnets.1.", "mid.block_2."),
        ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
        ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
        ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
        ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
        ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
        ("conv_norm_out.", "norm_out."),
    ]
]
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _rename(name: str, num_levels: int, to_bfl: bool) -> str:
    for diffusers, bfl in _RENAMES:
        src, dst = (diffusers, bfl) if to_bfl else (bfl, diffusers)
        m = re.match(re.escape(src).replace(re.escape("{i}"), r"(\d+)"), name)
        if m:
            i = int(m.group(1)) if m.groups() else 0
            if src.startswith("decoder.up"):
                i = num_levels - 1 - i
            name = dst.format(i=i) + name[m.end() :]
            break
    a, b = (".conv_shortcut.", ".nin_shortcut.") if to_bfl else (".nin_shortcut.", ".conv_shortcut.")
    return name.replace(a, b)


def to_bfl_names(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLFlux2 state dict -> BFL names; attention Linear [C, C] -> 1x1 conv [C, C, 1, 1].

    Names it does not know pass through unchanged (and are then reported as unexpected by the loader).
    """
    out = {}
    for k, t in sd.items():
        k = _rename(k, num_levels, to_bfl=True)
        out[k] = t[:, :, None, None] if _ATTN_WEIGHT.search(k) and t.ndim == 2 else t
    return out


def to_diffusers_names(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Inverse of `to_bfl_names`."""
    out = {}
    for k, t in sd.items():
        out[_rename(k, num_levels, to_bfl=False)] = t[:, :, 0, 0] if _ATTN_WEIGHT.search(k) and t.ndim == 4 else t
    return out
