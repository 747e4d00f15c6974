"""Checkpoint formats of the FLUX.2 transformer: BFL single files load as they are; diffusers folders
are renamed to BFL names (q/k/v fused, the final shift/scale swapped); the config is read from a
diffusers config.json or inferred from a BFL file's tensor shapes.

`load_checkpoint(source)` returns (config fields, BFL-named state dict, memory-mapped); model.py builds
`Flux2Config(**fields)` from it. lora.py maps LoRA files through the same names.

May import: files. Nothing else of this project (model.py imports this file).
"""

import os

import torch

from files import check_file, diffusers_weight_files, field, read_json, read_safetensors, resolve_component

FINAL_MODULATION = "final_layer.adaLN_modulation.1"  # rows (shift, scale) here, (scale, shift) in diffusers' norm_out


def swap_halves(w):
    """(shift, scale) rows <-> (scale, shift) rows."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_names(cfg):
    """diffusers module name -> (our module name, chunk): chunk c of our fused q/k/v is diffusers' c-th.
    cfg: anything with the block counts `depth` and `depth_single`."""
    names = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "norm_out.linear": FINAL_MODULATION,
        "proj_out": "final_layer.linear",
    }
    names = {k: (v, 0) for k, v in names.items()}
    double = {
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0",
        "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0",
        "ff_context.linear_out": "txt_mlp.2",
        "attn.norm_q": "img_attn.norm.query_norm",
        "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm",
        "attn.norm_added_k": "txt_attn.norm.key_norm",
    }
    single = {
        "attn.to_qkv_mlp_proj": "linear1",
        "attn.to_out": "linear2",
        "attn.norm_q": "norm.query_norm",
        "attn.norm_k": "norm.key_norm",
    }
    for i in range(cfg.depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for c, (img, txt) in enumerate([("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")]):
            names[f"{d}.attn.{img}"] = (f"{b}.img_attn.qkv", c)
            names[f"{d}.attn.{txt}"] = (f"{b}.txt_attn.qkv", c)
        names.update({f"{d}.{a}": (f"{b}.{o}", 0) for a, o in double.items()})
    for i in range(cfg.depth_single):
        names.update({f"single_transformer_blocks.{i}.{a}": (f"single_blocks.{i}.{o}", 0) for a, o in single.items()})
    return names


def diffusers_to_bfl(sd, cfg):
    """diffusers Flux2Transformer2DModel state dict -> our (BFL) names: q/k/v fused, final shift/scale swapped."""
    names, out, chunks = diffusers_names(cfg), {}, {}
    for key, w in sd.items():
        module = key.removesuffix(".weight")
        if module not in names:
            out[key] = w  # reported as unexpected by load_into
            continue
        ours, c = names[module]
        suffix = "scale" if ours.endswith("_norm") else "weight"
        chunks.setdefault(f"{ours}.{suffix}", {})[c] = swap_halves(w) if ours == FINAL_MODULATION else w
    for key, parts in chunks.items():  # a fused q/k/v missing a part comes out mis-shaped and is reported
        out[key] = torch.cat([parts[c] for c in sorted(parts)], dim=0) if len(parts) > 1 else parts[0]
    return out


class Fields(dict):
    """Flux2Config fields; attribute access for diffusers_names."""

    __getattr__ = dict.__getitem__


def config_from_diffusers(c, path="config.json"):
    """Flux2Config fields of a diffusers transformer config.json (the dict c, read from path)."""
    heads = field(c, "num_attention_heads", path)
    fields = Fields(
        in_channels=field(c, "in_channels", path, default=128),
        hidden_size=heads * field(c, "attention_head_dim", path),
        num_heads=heads,
        depth=field(c, "num_layers", path),
        depth_single=field(c, "num_single_layers", path),
        context_dim=field(c, "joint_attention_dim", path),
        mlp_ratio=field(c, "mlp_ratio", path, float, default=3.0),
        axes_dim=field(c, "axes_dims_rope", path, list, default=(32, 32, 32, 32)),
        theta=field(c, "rope_theta", path, float, default=2000),
        time_dim=field(c, "timestep_guidance_channels", path, default=256),
        eps=field(c, "eps", path, float, default=1e-6),
    )
    return check_axes(fields, f"{path}: field 'axes_dims_rope'")


def config_from_bfl(sd, path="checkpoint"):
    """Infer the config fields of a BFL checkpoint from its tensor shapes."""
    try:
        D, C = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        count = lambda p: len({k.split(".")[1] for k in sd if k.startswith(p)})  # noqa: E731
        fields = Fields(
            in_channels=C,
            hidden_size=D,
            num_heads=D // head_dim,
            depth=count("double_blocks."),
            depth_single=count("single_blocks."),
            context_dim=sd["txt_in.weight"].shape[1],
            mlp_ratio=sd["double_blocks.0.img_mlp.2.weight"].shape[1] / D,
            axes_dim=(head_dim // 4,) * 4,
            time_dim=sd["time_in.in_layer.weight"].shape[1],
        )
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{path} is not a FLUX.2 transformer checkpoint: {type(e).__name__} {e}") from None
    if D % head_dim:
        raise ValueError(f"{path}: hidden size {D} is no multiple of the head dim {head_dim}")
    return check_axes(fields, f"{path}: the RoPE axes")


def check_axes(fields, where):
    """fields, if the RoPE axes are even and sum to the head dim (each rotates pairs of one head's channels)."""
    head_dim = fields["hidden_size"] // fields["num_heads"]
    axes = list(fields["axes_dim"])
    if sum(axes) != head_dim or any(d % 2 for d in axes):
        raise ValueError(f"{where} {axes} must be even and sum to the head dim {head_dim}")
    fields["axes_dim"] = tuple(axes)
    return fields


def load_checkpoint(source):
    """(config fields, BFL-named state dict) from any supported source: a diffusers transformer/ folder
    (single or sharded safetensors), a diffusers repository folder, a BFL single file or a hub id."""
    path = resolve_component(str(source), "transformer", ["transformer/*"])
    if os.path.isfile(path):  # BFL single file
        sd = read_safetensors([path])
        sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
        if "img_in.weight" not in sd:
            raise ValueError(f"{path} is not a FLUX.2 transformer checkpoint (no img_in.weight)")
        return config_from_bfl(sd, path), sd
    if not os.path.isdir(path):
        check_file(path, "transformer checkpoint")  # a FIFO or device: refused before it is opened
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in {path}: expected a diffusers transformer folder")
    fields = config_from_diffusers(read_json(cfg_path), cfg_path)
    sd = read_safetensors(diffusers_weight_files(path, "diffusion_pytorch_model"))
    return fields, diffusers_to_bfl(sd, fields)
