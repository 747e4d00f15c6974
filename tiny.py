"""Tiny random klein checkpoints in the real formats, written by diffusers' and transformers' own
`save_pretrained`, and small inputs for them: what the tests, bench.py and the README's offline
example load instead of the multi-GB weights nothing here can download.

    python tiny.py tiny-klein                # a distilled pipeline folder (4 steps, no CFG); --base: a base one

Needs requirements-dev.txt (diffusers, transformers): those libraries write the files, so a file our
loaders read is one the reference implementation wrote. No run-time script imports this module.

May import: diffusers, transformers, tokenizers; data, vae and text_encoder (to cache a manifest).
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from klein import grid_ids

# ----------------------------------------------------------------------------------------------
# The transformer


TINY = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=3, joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4), mlp_ratio=3.0,
    guidance_embeds=False, timestep_guidance_channels=256,
)  # fmt: skip


def randomize_(module, seed=0):
    """Random weights of a realistic scale (diffusers' RMSNorm weights start at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5) + (p.ndim == 1))
    return module


def make_inputs(B=2, h=3, w=4, L=7, refs=(), seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, h * w, TINY["in_channels"], generator=g)
    txt = torch.randn(B, L, TINY["joint_attention_dim"], generator=g)
    txt_ids = torch.stack([torch.zeros(L), torch.zeros(L), torch.zeros(L), torch.arange(L)], -1).long()
    ref = [torch.randn(B, rh * rw, TINY["in_channels"], generator=g) for rh, rw in refs]
    ref_ids = [grid_ids(rh, rw, t=10 * (k + 1)) for k, (rh, rw) in enumerate(refs)]
    t = torch.tensor([0.7, 0.3])[:B]
    return img, grid_ids(h, w), txt, txt_ids, t, ref, ref_ids

# ----------------------------------------------------------------------------------------------
# The text encoder and tokenizer


# Qwen3's chat template (Qwen/Qwen3-* tokenizer_config.json, taken from public copies; klein's tokenizer/
# carries Qwen3-4B's / Qwen3-8B's). Only its user-message and generation-prompt branches matter here.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

TOKENIZER_TRAINING_TEXT = [
    "a photo of a red fox jumping over a lazy brown dog in the snow",
    "a watercolor painting of a lighthouse on a rocky coast at sunset",
    "the same cat, now wearing a small blue hat, sitting on a wooden chair",
    "put the person from image 1 into the kitchen of image 2, keep the lighting",
    "close-up portrait, soft studio light, 85mm lens, shallow depth of field",
]


def make_tiny_tokenizer(folder):
    """Offline stand-in for klein's tokenizer/: a byte-level BPE trained on a few sentences, wrapped as
    transformers' Qwen2Tokenizer with Qwen3's special tokens and chat template, saved to `folder`
    (writes tokenizer.json, tokenizer_config.json, chat_template.jinja). Returns the tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(TOKENIZER_TRAINING_TEXT, trainer=trainer)
    bpe_model = json.loads(bpe.to_str())["model"]
    # merges must be tuples (strings raise "failed to extract enum PyMerges")
    tokenizer = Qwen2Tokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]])
    # as in Qwen3: <|endoftext|> (pad/eos, added by Qwen2Tokenizer) and the chat markers are special,
    # the think markers are plain added tokens
    tokenizer.add_tokens(
        [
            AddedToken("<|im_start|>", special=True, normalized=False),
            AddedToken("<|im_end|>", special=True, normalized=False),
            AddedToken("<think>", special=False, normalized=False),
            AddedToken("</think>", special=False, normalized=False),
        ]
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_qwen3(
    folder, vocab_size, hidden_size=32, num_hidden_layers=28, tie_word_embeddings=True, max_shard_size=None, seed=0
):
    """A tiny random transformers Qwen3ForCausalLM saved to `folder` (config.json + safetensors; sharded
    with model.safetensors.index.json when `max_shard_size` is given, e.g. "20KB"). 4 query / 2 kv
    heads of dim 16 (q width 64 != hidden 32, like Qwen3's explicit head_dim). The klein context
    width is 3 * hidden_size. Returns the model."""
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = HFQwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.05,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def make_tiny_text_encoder_repo(root, hidden_size=32, sharded=False, tie_word_embeddings=True):
    """The text part of a klein repository folder: root/tokenizer/ and root/text_encoder/ (a 28-layer
    tiny Qwen3, so hidden-state indices 9, 18, 27 exist). Returns (tokenizer, model)."""
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    model = make_tiny_qwen3(
        root / "text_encoder",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        tie_word_embeddings=tie_word_embeddings,
        max_shard_size="20KB" if sharded else None,
    )
    return tokenizer, model

# ----------------------------------------------------------------------------------------------
# The VAE


def tiny_diffusers_vae(seed: int, **config):
    """A diffusers AutoencoderKLFlux2 with random weights and GroupNorm affines."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**config).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):  # identity affines would hide swapped/misplaced norms
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
        for attn in (vae.encoder.mid_block.attentions[0], vae.decoder.mid_block.attentions[0]):
            # sharpen the softmax (default init gives near-uniform attention, which would hide a q/k mix-up)
            attn.to_q.weight.mul_(3.0)
            attn.to_k.weight.mul_(3.0)
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.2 + 2.0 * torch.rand_like(vae.bn.running_var))
        vae.bn.num_batches_tracked.fill_(123)
    return vae

# ----------------------------------------------------------------------------------------------
# A whole klein repository folder


HIDDEN = 32  # tiny Qwen3: prompt embeddings are 3 x 32 = 96 wide


def make_pipeline_folder(root, distilled):
    """A klein repository folder written by diffusers' own save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    tokenizer, text_encoder = make_tiny_text_encoder_repo(root, hidden_size=HIDDEN)
    vae = tiny_diffusers_vae(0, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    torch.manual_seed(0)
    transformer = randomize_(Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * HIDDEN, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ), seed=1).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)  # fmt: skip
    pipe.save_pretrained(root)
    return pipe


def photo(w, h, mode="RGB", seed=0):
    """A smooth random image (structure for the selectors) in any PIL mode."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).convert(mode)

# ----------------------------------------------------------------------------------------------
# A training manifest, and a repository with its latent cache


TINY_KLEIN = dict(TINY, joint_attention_dim=96)  # text context = 3 x the tiny Qwen3's hidden size 32
# 4 levels as FLUX.2 (16 px per token); 4 latent channels x 2x2 patch = TINY's 16 in_channels
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def smooth_image(rng, w, h):
    """A random RGB image with large-scale structure (an upsampled 4x4 pattern)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def write_dataset(folder, n=7, seed=0):
    """n examples in two target buckets (64x64 and 96x64 px): the target is its first reference's
    colours inverted; some examples have a second reference of another size. Returns the manifest."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "img", exist_ok=True)
    prompts = ["invert the colours", "make it a negative", "invert the colours"]
    lines = []
    for i in range(n):
        w = 64 if i % 2 == 0 else 96
        ref = smooth_image(rng, w, 64)
        ref.save(folder / "img" / f"ref{i}.png")
        Image.fromarray(255 - np.array(ref)).save(folder / "img" / f"target{i}.png")
        refs = [f"img/ref{i}.png"]
        if i % 3 == 0:
            smooth_image(rng, 80, 64).save(folder / "img" / f"extra{i}.png")
            refs.append(f"img/extra{i}.png")
        task = "edit" if i % 2 else "subject"
        lines.append(dict(prompt=prompts[i % 3], target=f"img/target{i}.png", references=refs, task=task))
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def make_training_repo(root):
    """A tiny klein repository folder (transformer, vae, text_encoder, tokenizer, each saved by
    diffusers/transformers) and a manifest; the cache of that manifest made with our VAE and text
    encoder. Returns (manifest, cache folder)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from data import cache_dataset
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    torch.manual_seed(0)
    randomize_(Flux2Transformer2DModel(**TINY_KLEIN)).save_pretrained(root / "transformer")
    AutoencoderKLFlux2(**TINY_VAE).save_pretrained(root / "vae")
    make_tiny_text_encoder_repo(root)
    manifest = write_dataset(root / "data")
    cache = root / "cache"
    vae, text_encoder = AutoEncoder.from_pretrained(str(root)), TextEncoder.from_pretrained(str(root))
    cache_dataset(str(manifest), vae, text_encoder, str(cache), progress=False)
    return manifest, cache


# ----------------------------------------------------------------------------------------------
# BFL's fp8 single-file layout


def bfl_fp8_file(ours, path, per_row=True):
    """A tiny file in the layout of BFL's fp8 single files (quant.py): names prefixed model.diffusion_model.,
    the blocks' Linears float8_e4m3fn with a float32 weight_scale (one per tensor as ComfyUI writes it,
    or one per row as diffusers' fp8r) and an input_scale, everything else bf16."""
    sd = {}
    for k, v in ours.state_dict().items():
        name = k.removesuffix(".weight")
        if k.endswith(".weight") and name.startswith(("double_blocks.", "single_blocks.")) and v.ndim == 2:
            scale = v.abs().amax(dim=1) / 448 if per_row else v.abs().amax() / 448
            sd[k] = (v / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
            sd[f"{name}.weight_scale"], sd[f"{name}.input_scale"] = scale.float(), torch.tensor(0.01)
        else:
            sd[k] = v.bfloat16()
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()}, str(path))
    return sd


def main(argv=None):
    from files import ArgumentParser, check_writable_folder, fail

    p = ArgumentParser(description=__doc__)
    p.add_argument("folder", help="the klein repository folder to write (created; its parent must exist)")
    p.add_argument("--base", action="store_true", help="a base checkpoint (50 steps, CFG 4) instead of a distilled one")
    p.add_argument("--photo", default=None, metavar="OUT.png", help="also write scikit-image's astronaut photograph here")
    args = p.parse_args(argv)
    try:
        check_writable_folder(args.folder, "folder")
        if os.path.exists(args.folder) and os.listdir(args.folder):
            raise ValueError(f"folder {args.folder} is not empty")
        if args.photo is not None:
            from files import check_writable, image_format

            image_format(args.photo)
            check_writable(args.photo, "--photo")
    except (OSError, ValueError) as e:
        fail(e)
    from pathlib import Path

    make_pipeline_folder(Path(args.folder), distilled=not args.base)
    print(f"wrote {args.folder}")
    if args.photo is not None:
        import skimage.data

        from files import write_atomic

        write_atomic(args.photo, Image.fromarray(skimage.data.astronaut()))
        print(f"wrote {args.photo}")


if __name__ == "__main__":
    main()
