"""Qwen3 text encoder for FLUX.2 [klein] prompt conditioning, in plain PyTorch.

klein does not use Qwen3's output: each prompt is wrapped in the Qwen3 chat template (thinking
disabled), right-padded to 512 tokens, and the hidden states after decoder layers 9, 18 and 27 (the
transformers `hidden_states` tuple indices, index 0 = the embeddings) are concatenated per token into
a (B, 512, 3 * hidden) context. All 512 positions are kept, padding included: the DiT attends to them
unmasked, so the hidden states at padding positions matter and must equal transformers' as well.

Only the decoder layers up to the deepest requested index are built and loaded; later layers, the
final norm and the LM head never run, so they are not read from the checkpoint.
Parameter names equal the Hugging Face checkpoint keys (`model.layers.N.self_attn.q_proj.weight`).

May import: files.
"""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer

from files import check_file, diffusers_weight_files, field, load_into, read_json, read_safetensors, resolve_component


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128  # Qwen3 sets it explicitly: heads * head_dim need not equal hidden_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False

    @classmethod
    def from_json(cls, path):
        """Read a transformers Qwen3 `config.json` (4.x or 5.x style)."""
        raw = read_json(path)
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("use_sliding_window", False):
            raise ValueError(f"{path}: sliding-window attention is not supported")
        # transformers 5 nests RoPE settings in `rope_parameters`; 4.x has top-level `rope_theta`
        # plus `rope_scaling` (null for plain RoPE)
        name = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
        rope = field(raw, name, path, dict, default={})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{path}: RoPE type {rope_type!r} is not supported (only default)")
        theta = field(rope, "rope_theta", f"{path}: {name}", float) if "rope_theta" in rope else field(raw, "rope_theta", path, float)
        heads, hidden = field(raw, "num_attention_heads", path), field(raw, "hidden_size", path)
        cfg = cls(
            vocab_size=field(raw, "vocab_size", path),
            hidden_size=hidden,
            intermediate_size=field(raw, "intermediate_size", path),
            num_hidden_layers=field(raw, "num_hidden_layers", path),
            num_attention_heads=heads,
            num_key_value_heads=field(raw, "num_key_value_heads", path, default=heads),
            head_dim=field(raw, "head_dim", path, default=hidden // heads),
            rms_norm_eps=field(raw, "rms_norm_eps", path, float, default=cls.rms_norm_eps),
            rope_theta=float(theta),
            attention_bias=field(raw, "attention_bias", path, bool, default=False),
        )
        if heads % cfg.num_key_value_heads or cfg.head_dim % 2:
            raise ValueError(f"{path}: num_attention_heads {heads} must be a multiple of num_key_value_heads "
                             f"{cfg.num_key_value_heads}, and head_dim {cfg.head_dim} even")
        return cfg


# ----------------------------------------------------------------------------------------------
# Qwen3 decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # statistics in fp32, then back to the input dtype *before* the weight multiply (as transformers
        # does), so bf16 results round the same way
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(seq_len, head_dim, theta, device, dtype):
    """RoPE tables (L, D) in the rotate-half layout: frequencies repeated over the two halves."""
    # frequencies on the CPU (like transformers' init-time buffer), so GPU tables match it bit for bit
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.to(device)  # (L, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # rotate-half: pairs are (i, i + D/2), not interleaved neighbours
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k (applied before RoPE)."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, Hq, L, D)
        k = self.k_norm(self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # each kv head serves n_heads / n_kv_heads consecutive query heads
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, Hq, L, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(D)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Token embedding + the first `num_layers` decoder layers (no final norm: klein never uses it)."""

    def __init__(self, config, num_layers):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(num_layers))

    def forward(self, input_ids, attention_mask, out_layers):
        """input_ids, attention_mask: (B, L), mask 1 = token, 0 = padding (right padding only).
        Returns the hidden states (B, L, hidden) at each index of `out_layers` (0 = embeddings,
        i = output of the i-th decoder layer), like transformers' `hidden_states[i]`."""
        B, L = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, L, hidden)
        cos, sin = rope_cos_sin(L, self.config.head_dim, self.config.rope_theta, x.device, x.dtype)
        # causal AND key-is-a-token. Padding queries still attend to every real token before them:
        # with right padding key 0 is always a token, so no row is fully masked (no NaN), and this is
        # exactly the mask transformers builds, so padding positions match it too.
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L)
        outputs = {0: x} if 0 in out_layers else {}
        for i, layer in enumerate(self.layers[: max(out_layers)], start=1):
            x = layer(x, cos, sin, mask)
            if i in out_layers:
                outputs[i] = x
        return [outputs[i] for i in out_layers]


# ----------------------------------------------------------------------------------------------
# klein text encoder: chat template + tokenizer + layer selection


def chat_prompt(prompt):
    """What klein feeds Qwen3: the Qwen3 chat template of one user message, generation prompt added,
    thinking disabled (an empty think block). No system message."""
    return "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class TextEncoder(nn.Module):
    def __init__(self, config, tokenizer, pad_token_id, layers=(9, 18, 27)):
        super().__init__()
        layers = tuple(int(i) for i in layers)
        if not layers or not all(0 <= i < config.num_hidden_layers for i in layers):
            # index num_hidden_layers would be the final-normed output in transformers; klein never uses it
            raise ValueError(f"layers {layers} must be non-empty and within 0..{config.num_hidden_layers - 1}")
        self.config = config
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.layers = layers
        self.model = Qwen3Model(config, num_layers=max(layers))

    @classmethod
    def from_pretrained(cls, source, dtype=None, device=None, layers=(9, 18, 27)):
        """source: a klein repository folder (with text_encoder/ and tokenizer/) or a hub repo id.
        dtype None keeps the checkpoint's dtype; device None is the CPU."""
        folder = Path(resolve_component(source, None, ["text_encoder/*", "tokenizer/*"], download=snapshot_download))
        te_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
        for needed in (te_dir / "config.json", tok_dir / "tokenizer.json"):
            if not needed.exists():
                raise FileNotFoundError(f"{needed} not found: {folder} is not a klein repository folder")
        config = Qwen3Config.from_json(te_dir / "config.json")
        tokenizer_file = check_file(str(tok_dir / "tokenizer.json"), "tokenizer")
        try:
            tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the tokenizers library raises a plain Exception
            raise ValueError(f"cannot read tokenizer {tokenizer_file}: {e}") from None
        # we pad/truncate by hand below, whatever tokenizer.json says
        tokenizer.no_padding()
        tokenizer.no_truncation()

        with torch.device("meta"):  # no memory and no random init: every tensor comes from the checkpoint
            encoder = cls(config, tokenizer, _pad_token_id(tokenizer, tok_dir), layers)
        return _load_weights(encoder, te_dir, dtype, device).requires_grad_(False)

    def tokenize(self, prompts, max_length=512):
        """Chat-templated, right-padded, truncated token ids and attention mask, both (B, max_length)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        input_ids = torch.full((len(prompts), max_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(chat_prompt(prompt), add_special_tokens=False).ids
            if len(ids) > max_length:
                warnings.warn(
                    f"prompt {b} is {len(ids)} tokens with the chat template; truncated to {max_length}",
                    stacklevel=2,
                )
                ids = ids[:max_length]
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
        return input_ids, attention_mask

    @torch.no_grad()
    def encode(self, prompts, max_length=512):
        """Prompt(s) -> klein text context (B, max_length, len(layers) * hidden), in the model dtype."""
        input_ids, attention_mask = self.tokenize(prompts, max_length)
        device = self.model.embed_tokens.weight.device
        hidden = self.model(input_ids.to(device), attention_mask.to(device), self.layers)
        return torch.cat(hidden, dim=-1)  # per token: [layer 9 | layer 18 | layer 27]


# ----------------------------------------------------------------------------------------------
# loading


def _pad_token_id(tokenizer, tok_dir):
    config_path = tok_dir / "tokenizer_config.json"
    settings = read_json(config_path) if config_path.exists() else {}
    # klein pads and truncates on the right (transformers' default), the only layout implemented here
    for side in ("padding_side", "truncation_side"):
        if settings.get(side, "right") != "right":
            raise ValueError(f"{config_path}: {side}={settings[side]!r} is not supported (only right)")
    pad = settings.get("pad_token") or "<|endoftext|>"  # Qwen's pad token when the config names none
    if isinstance(pad, dict):  # older files store an AddedToken dict
        pad = field(pad, "content", f"{config_path}: pad_token", str)
    if not isinstance(pad, str):
        raise ValueError(f"{config_path}: field 'pad_token' must be a string, got {pad!r}")
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"pad token {pad!r} is not in {tok_dir / 'tokenizer.json'}")
    return pad_id


def _load_weights(encoder, te_dir, dtype, device):
    """Assign the checkpoint tensors to the meta-device `encoder` (memory-mapped, cast only if asked).
    Later layers, the final norm and lm_head are skipped unread; any other mismatch (missing,
    unexpected or mis-shaped keys) is one ValueError listing all of them."""
    built, total = len(encoder.model.layers), encoder.config.num_hidden_layers

    def skipped(key):
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        if layer:
            return built <= int(layer.group(1)) < total
        return key in ("model.norm.weight", "lm_head.weight")

    files = diffusers_weight_files(te_dir, "model")
    state_dict = {k: v for k, v in read_safetensors(files).items() if not skipped(k)}
    # one dtype for the whole model: the one asked for, else the checkpoint's (its embedding's)
    if dtype is None and "model.embed_tokens.weight" in state_dict:
        dtype = state_dict["model.embed_tokens.weight"].dtype

    return load_into(encoder, state_dict, dtype, device)
