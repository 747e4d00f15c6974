"""Tests for text_encoder.py against transformers' Qwen3 and diffusers' Flux2KleinPipeline (oracles),
on a tiny random Qwen3 and an offline byte-level BPE tokenizer (nothing is downloaded).

The tiny repository builders live in tiny.py.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import text_encoder
from text_encoder import Qwen3Config, TextEncoder, chat_prompt
from tiny import TOKENIZER_TRAINING_TEXT, make_tiny_text_encoder_repo

PROMPTS = [
    "a red fox in the snow",  # short: most of the 512 positions are padding
    "a watercolor painting of a lighthouse on a rocky coast at sunset, close-up, soft light, "
    "with 3 boats and the same cat wearing a blue hat",
]
LAYERS = (9, 18, 27)


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    make_tiny_text_encoder_repo(root)
    return root


@pytest.fixture(scope="module")
def sharded_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein_sharded")
    make_tiny_text_encoder_repo(root, sharded=True, tie_word_embeddings=False)
    return root


def hf_tokenizer(root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "tokenizer")


def hf_model(root, dtype=torch.float32, attn_implementation="sdpa"):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(
        root / "text_encoder", dtype=dtype, attn_implementation=attn_implementation
    ).eval()


def test_chat_prompt_equals_qwen3_template(repo):
    tokenizer = hf_tokenizer(repo)
    for prompt in ["", "a cat", "two\nlines, {braces} and unicode: café 東京", PROMPTS[1]]:
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert chat_prompt(prompt) == expected


def test_tokenize_matches_transformers(repo):
    encoder = TextEncoder.from_pretrained(repo)
    tokenizer = hf_tokenizer(repo)
    long_prompt = " ".join(TOKENIZER_TRAINING_TEXT * 30)
    prompts = PROMPTS + ["", "café 東京 ✓"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt's truncation warning is tested below
        input_ids, attention_mask = encoder.tokenize(prompts + [long_prompt])
    for b, prompt in enumerate(prompts + [long_prompt]):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        ref = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=512)
        assert torch.equal(input_ids[b], ref["input_ids"][0]), prompt
        assert torch.equal(attention_mask[b], ref["attention_mask"][0]), prompt
    assert encoder.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert attention_mask[0].sum() < 40 and attention_mask[-1].sum() == 512  # short is padded, long is cut


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hidden_states_match_transformers(repo, attn_implementation):
    encoder = TextEncoder.from_pretrained(repo)
    model = hf_model(repo, attn_implementation=attn_implementation)
    # klein's 512 positions on the sdpa path; eager (a second oracle, slow O(L^2) softmax) on 128
    input_ids, attention_mask = encoder.tokenize(PROMPTS, max_length=512 if attn_implementation == "sdpa" else 128)
    with torch.no_grad():
        ref = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        ours = encoder.model(input_ids, attention_mask, (0,) + LAYERS)
        # the mask matters at padding positions: attending to padding keys would change them
        unmasked_9 = encoder.model(input_ids, torch.ones_like(attention_mask), (9,))[0]
    assert len(encoder.model.layers) == 27  # only the layers up to index 27 are built
    pad = ~attention_mask.bool()
    for i, h in zip((0,) + LAYERS, ours):
        assert torch.isfinite(h).all()
        err = (h - ref[i]).abs().max().item()
        err_pad = (h - ref[i])[pad].abs().max().item()
        scale = ref[i].abs().max().item()
        print(f"{attn_implementation} hidden_states[{i}]: max abs err {err:.2e} (padding {err_pad:.2e}), max |ref| {scale:.2f}")
        assert err <= 1e-5 * scale
    assert (ours[1] - unmasked_9)[pad].abs().max() > 1e-2 * ref[9].abs().max()


@pytest.mark.parametrize("repo_fixture", ["repo", "sharded_repo"])
def test_encode_matches_diffusers_pipeline(repo_fixture, request):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    root = request.getfixturevalue(repo_fixture)
    if repo_fixture == "sharded_repo":  # the index + several shards, and an untied lm_head that is skipped
        assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
        keys = json.loads((root / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
        assert "lm_head.weight" in keys and len(set(keys.values())) > 1
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=hf_model(root),
        tokenizer=hf_tokenizer(root),
        transformer=None,
    )
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))
    ours = TextEncoder.from_pretrained(root).encode(PROMPTS)
    assert ours.shape == ref.shape == (2, 512, 3 * 32)
    assert ours.dtype == ref.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    print(f"{repo_fixture} prompt embeds: max abs err {err:.2e}, max |ref| {ref.abs().max().item():.2f}")
    assert err <= 1e-5 * ref.abs().max().item()


def test_bfloat16_matches_transformers(repo):
    # same dtype path as the real bf16 checkpoint: fp32 statistics, bf16 everywhere else
    encoder = TextEncoder.from_pretrained(repo, dtype=torch.bfloat16)
    model = hf_model(repo, dtype=torch.bfloat16)
    assert encoder.model.embed_tokens.weight.dtype == torch.bfloat16
    input_ids, attention_mask = encoder.tokenize(PROMPTS, max_length=128)  # bf16 matmuls are slow on CPU
    ours = encoder.encode(PROMPTS, max_length=128)
    with torch.no_grad():
        hs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    ref = torch.cat([hs[i] for i in LAYERS], dim=-1)
    assert ours.dtype == torch.bfloat16
    err = (ours.float() - ref.float()).abs().max().item()
    print(f"bf16 prompt embeds: max abs err {err:.2e}")
    assert torch.equal(ours, ref)


def test_truncation_warns(repo):
    encoder = TextEncoder.from_pretrained(repo)
    long_prompt = " ".join(TOKENIZER_TRAINING_TEXT * 30)
    with pytest.warns(UserWarning, match=r"prompt 0 is \d+ tokens with the chat template; truncated to 512"):
        out = encoder.encode(long_prompt)
    assert out.shape == (1, 512, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts that fit do not warn
        encoder.tokenize(PROMPTS)


def test_missing_folder_and_files(tmp_path, repo):
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        TextEncoder.from_pretrained(tmp_path / "no_such_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        TextEncoder.from_pretrained(tmp_path / "empty")
    broken = tmp_path / "no_weights"
    (broken / "text_encoder").mkdir(parents=True)
    (broken / "text_encoder" / "config.json").write_text((repo / "text_encoder" / "config.json").read_text())
    (broken / "tokenizer").symlink_to(repo / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        TextEncoder.from_pretrained(broken)


def test_left_padding_tokenizer_is_rejected(tmp_path, repo):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "text_encoder").symlink_to(repo / "text_encoder")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "tokenizer" / name).write_text((repo / "tokenizer" / name).read_text())
    config = json.loads((repo / "tokenizer" / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(dict(config, padding_side="left")))
    with pytest.raises(ValueError, match="padding_side='left' is not supported"):
        TextEncoder.from_pretrained(tmp_path)


def test_checkpoint_key_errors(tmp_path, repo):
    state = load_file(repo / "text_encoder" / "model.safetensors")

    def write_variant(name, state_dict):
        root = tmp_path / name
        (root / "text_encoder").mkdir(parents=True)
        (root / "text_encoder" / "config.json").write_text((repo / "text_encoder" / "config.json").read_text())
        (root / "tokenizer").symlink_to(repo / "tokenizer")
        save_file(state_dict, root / "text_encoder" / "model.safetensors")
        return root

    missing = {k: v for k, v in state.items() if k != "model.layers.3.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing: model.layers.3.mlp.up_proj.weight"):
        TextEncoder.from_pretrained(write_variant("missing", missing))

    bad = dict(state, **{"model.extra.weight": torch.zeros(2), "model.layers.5.self_attn.q_norm.weight": torch.ones(8)})
    with pytest.raises(ValueError, match=r"unexpected: model.extra.weight") as info:
        TextEncoder.from_pretrained(write_variant("bad", bad))
    assert "model.layers.5.self_attn.q_norm.weight: (8,) vs (16,)" in str(info.value)

    # layer 27 (0-based), the final norm and lm_head are not needed for index 27 and are not read
    needed = {k: v for k, v in state.items() if not k.startswith(("model.layers.27.", "model.norm."))}
    TextEncoder.from_pretrained(write_variant("only_needed", needed))


def test_layer_indices(repo):
    encoder = TextEncoder.from_pretrained(repo, layers=(2, 5))
    assert len(encoder.model.layers) == 5 and encoder.encode("a cat").shape == (1, 512, 64)
    with pytest.raises(ValueError, match="within 0..27"):
        TextEncoder.from_pretrained(repo, layers=(9, 28))  # 28 = final-normed output in transformers


def test_config_reads_transformers_4_style(tmp_path):
    # Qwen/Qwen3-4B's config.json (transformers 4.51): top-level rope_theta, rope_scaling null
    raw = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960,
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": 151936,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert Qwen3Config.from_json(tmp_path / "config.json") == Qwen3Config()  # the defaults are Qwen3-4B
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="yarn"):
        Qwen3Config.from_json(tmp_path / "config.json")


def test_hub_id_downloads_only_text_files(monkeypatch, repo):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(repo)

    monkeypatch.setattr(text_encoder, "snapshot_download", fake_snapshot_download)
    encoder = TextEncoder.from_pretrained("black-forest-labs/FLUX.2-klein-4B")
    assert calls == [("black-forest-labs/FLUX.2-klein-4B", ["text_encoder/*", "tokenizer/*"])]
    embed = load_file(repo / "text_encoder" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(encoder.model.embed_tokens.weight, embed)
