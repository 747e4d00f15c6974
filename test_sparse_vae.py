"""vae.py against diffusers 0.42.1 (the oracle), with tiny random AutoencoderKLFlux2 models on the CPU.

Tiny models keep the real 4 levels (8x downsampling, 16 px per latent token after patchify). All norm
affines and the latent BatchNorm statistics are randomized so that every weight mapping matters.
"""

import copy
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

import vae as V
from tiny import tiny_diffusers_vae
from klein import pack, unpack
from vae import AutoEncoder, AutoEncoderConfig, to_diffusers_names, to_bfl_names, patchify, unpatchify

# float32; observed errors are ~1e-6 of the output scale (different but equivalent kernels: 1x1 conv vs Linear)
RTOL = 1e-5


def pipeline_encode(vae: AutoencoderKLFlux2, x: torch.Tensor) -> torch.Tensor:
    """The klein pipeline's own `_encode_vae_image` (mean -> patchify -> BN normalize)."""
    pipe = Flux2KleinPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    with torch.no_grad():
        return pipe._encode_vae_image(x, generator=None)


def pipeline_decode(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """The tail of Flux2KleinPipeline.__call__: denormalize -> _unpatchify_latents -> vae.decode."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        z = Flux2KleinPipeline._unpatchify_latents(latents * std + mean)
        return vae.decode(z, return_dict=False)[0]


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return (a - b).abs().max().item(), b.abs().max().item()


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err, scale = max_err(ours, ref)
    print(f"{name}: max abs err {err:.3e}, output max abs {scale:.3e}, relative {err / scale:.3e}")
    assert err <= RTOL * scale, f"{name}: max abs err {err} vs output scale {scale}"


# ---------------------------------------------------------------------------------------------------------------
# fixtures

CFG_A = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=32, norm_num_groups=8)
# B: other shapes, so the single-file loader must read them off the tensors; groups=32 is the single-file default
CFG_B = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32)


@pytest.fixture(scope="module")
def vae_a():
    return tiny_diffusers_vae(0, **CFG_A)


@pytest.fixture(scope="module")
def vae_b():
    return tiny_diffusers_vae(1, **CFG_B)


@pytest.fixture(scope="module")
def folders_a(vae_a, tmp_path_factory):
    root = tmp_path_factory.mktemp("a")
    vae_a.save_pretrained(root / "vae_only")
    vae_a.save_pretrained(root / "repo" / "vae")
    (root / "repo" / "model_index.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(42)
    return torch.rand(2, 3, 64, 96) * 2 - 1  # batch 2, non-square, in [-1, 1]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_patchify_layout_matches_pipeline():
    z = torch.randn(2, 5, 8, 12)
    p = patchify(z)
    assert torch.equal(p, Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify(p), z)
    assert torch.equal(unpatchify(p), Flux2KleinPipeline._unpatchify_latents(p))
    # channel c*4 + pi*2 + pj at (i, j) holds z[c, 2i+pi, 2j+pj]
    c, pi, pj, i, j = 3, 1, 0, 2, 5
    assert p[1, c * 4 + pi * 2 + pj, i, j] == z[1, c, 2 * i + pi, 2 * j + pj]
    tokens = pack(p)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(p))
    assert tokens.shape == (2, 4 * 6, 20)
    assert torch.equal(tokens[0, 1 * 6 + 4], p[0, :, 1, 4])  # row-major: token = row * w + col
    assert torch.equal(unpack(tokens, 4, 6), p)
    with pytest.raises(ValueError, match="even"):
        patchify(torch.randn(1, 4, 6, 7))
    with pytest.raises(ValueError, match="5x5"):
        unpack(tokens, 5, 5)


def test_real_config_matches_diffusers_layout():
    """The default config is the real FLUX.2 VAE: same 251 tensors / 84,046,115 params as diffusers, renamed."""
    with torch.device("meta"):
        ours, theirs = AutoEncoder(), AutoencoderKLFlux2()
    ours_sd, converted = ours.state_dict(), to_bfl_names(theirs.state_dict(), 4)
    assert len(ours_sd) == 251
    assert sum(p.numel() for p in ours.parameters()) == 84_046_115
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours_sd.items()}
    assert "encoder.quant_conv.weight" in ours_sd and "decoder.post_quant_conv.weight" in ours_sd
    assert ours_sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ours_sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)  # up.0: full resolution
    assert "decoder.up.3.upsample.conv.weight" in ours_sd and "decoder.up.0.upsample.conv.weight" not in ours_sd
    assert ours.config.downscale == 16


# ---------------------------------------------------------------------------------------------------------------
# numerics against diffusers


@pytest.mark.parametrize("layout", ["vae_only", "repo"])
def test_encode_decode_match_diffusers(vae_a, folders_a, images, layout):
    ours = AutoEncoder.from_pretrained(folders_a / layout)
    assert ours.config == AutoEncoderConfig(**CFG_A)
    assert not any(t.is_meta for t in ours.state_dict().values())
    assert ours.bn.num_batches_tracked.item() == 123

    ref = pipeline_encode(vae_a, images)
    with torch.no_grad():
        z = ours.encode(images)
    assert z.shape == (2, 128, 4, 6)
    assert_close(f"encode[{layout}]", z, ref)

    torch.manual_seed(7)
    latents = ref + 0.5 * torch.randn_like(ref)  # beyond the encoder's range, decode must still agree
    with torch.no_grad():
        img = ours.decode(latents)
    assert img.shape == (2, 3, 64, 96)
    assert_close(f"decode[{layout}]", img, pipeline_decode(vae_a, latents))


def test_train_mode_does_not_touch_latent_stats(vae_a, folders_a, images):
    ours = AutoEncoder.from_pretrained(folders_a / "vae_only")
    mean = ours.bn.running_mean.clone()
    with torch.no_grad():
        z_eval = ours.encode(images)
        z_train = ours.train().encode(images)
    assert torch.equal(z_eval, z_train) and torch.equal(mean, ours.bn.running_mean)


def test_dtype_and_device_arguments(vae_a, folders_a, images):
    ours = AutoEncoder.from_pretrained(folders_a / "vae_only", dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in ours.parameters())
    assert ours.bn.running_var.dtype == torch.bfloat16 and ours.bn.num_batches_tracked.dtype == torch.long
    theirs = copy.deepcopy(vae_a).to(torch.bfloat16)
    ref_z = pipeline_encode(vae_a, images)
    with torch.no_grad():
        z = ours.encode(images)  # float32 input is cast to the weights' dtype
        img = ours.decode(ref_z)
    assert z.dtype == img.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; ours must be no less accurate than diffusers' own bf16 run
    for name, mine, their, ref in [
        ("encode", z, pipeline_encode(theirs, images.bfloat16()), ref_z),
        ("decode", img, pipeline_decode(theirs, ref_z.bfloat16()), pipeline_decode(vae_a, ref_z)),
    ]:
        err, scale = max_err(mine.float(), ref)
        their_err, _ = max_err(their.float(), ref)
        print(f"{name} bf16 vs fp32 diffusers: ours {err:.3e}, diffusers bf16 {their_err:.3e}, scale {scale:.3e}")
        assert err < 2 * their_err


# ---------------------------------------------------------------------------------------------------------------
# BFL single file


@pytest.fixture(scope="module")
def bfl_file_b(vae_b, tmp_path_factory):
    sd = to_bfl_names(vae_b.state_dict(), num_levels=4)
    del sd["bn.num_batches_tracked"]  # BFL's converter mapping has no such key; the loader must not need it
    path = tmp_path_factory.mktemp("bfl") / "ae.safetensors"
    save_file(sd, path)
    return path


def test_bfl_names_verified_by_diffusers_converter(vae_b, bfl_file_b):
    """Cross-check our BFL names with diffusers' own LDM-VAE converter (the FLUX.2 one lives only in the repo's
    scripts/). LDM names are BFL's, except that LDM keeps the quant convs at top level, where diffusers' FLUX.2
    script maps them to encoder.quant_conv / decoder.post_quant_conv; the latent BN is FLUX.2-only."""
    bfl = load_file(bfl_file_b)
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    ldm = {}
    for k, t in bfl.items():
        for a, b in moved.items():
            k = k.replace(a, b) if k.startswith(a) else k
        ldm[k] = t
    ref = vae_b.state_dict()
    theirs = convert_ldm_vae_checkpoint({k: t for k, t in ldm.items() if not k.startswith("bn.")}, dict(vae_b.config))
    assert set(theirs) == {k for k in ref if not k.startswith("bn.")}
    assert all(torch.equal(theirs[k], ref[k]) for k in theirs)
    assert all(torch.equal(bfl[k], ref[k]) for k in ("bn.running_mean", "bn.running_var"))
    # and our inverse gives the diffusers state dict back
    back = to_diffusers_names(bfl, num_levels=4)
    assert set(back) | {"bn.num_batches_tracked"} == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in back)


def test_bfl_single_file_matches_diffusers(vae_b, bfl_file_b, images, tmp_path):
    ours = AutoEncoder.from_pretrained(bfl_file_b)
    assert ours.config == AutoEncoderConfig(**CFG_B)  # read off the shapes (groups: default 32)

    ref = pipeline_encode(vae_b, images)
    with torch.no_grad():
        z = ours.encode(images)
    assert z.shape == (2, 64, 4, 6)
    assert_close("encode[bfl file]", z, ref)
    with torch.no_grad():
        img = ours.decode(z)
    assert_close("decode[bfl file]", img, pipeline_decode(vae_b, z))

    # same weights as a diffusers folder and as a diffusers-named single file: bit-identical outputs
    vae_b.save_pretrained(tmp_path / "vae")
    save_file(vae_b.state_dict(), tmp_path / "diffusers_named.safetensors")
    for source in (tmp_path / "vae", tmp_path / "diffusers_named.safetensors"):
        other = AutoEncoder.from_pretrained(source)
        with torch.no_grad():
            assert torch.equal(other.encode(images), z) and torch.equal(other.decode(z), img), source


# ---------------------------------------------------------------------------------------------------------------
# hub ids (snapshot_download stubbed: no network here)


def test_hub_repo_id_downloads_only_vae(folders_a, images, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folders_a / "repo")

    monkeypatch.setattr(V, "snapshot_download", fake_snapshot_download)
    ours = AutoEncoder.from_pretrained("black-forest-labs/FLUX.2-klein-4B")
    assert calls == [("black-forest-labs/FLUX.2-klein-4B", ["vae/*"])]
    local = AutoEncoder.from_pretrained(folders_a / "repo")
    with torch.no_grad():
        assert torch.equal(ours.encode(images), local.encode(images))


def test_hub_failure_is_file_not_found(monkeypatch):
    def failing(repo_id, allow_patterns):
        raise OSError("offline")

    monkeypatch.setattr(V, "snapshot_download", failing)
    with pytest.raises(FileNotFoundError, match="no-such/repo.*offline"):
        AutoEncoder.from_pretrained("no-such/repo")


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_bad_input_shapes(folders_a):
    ours = AutoEncoder.from_pretrained(folders_a / "vae_only")
    with pytest.raises(ValueError, match="multiples of 16.*64x72"):
        ours.encode(torch.zeros(1, 3, 64, 72))
    with pytest.raises(ValueError, match="multiples of 16.*40x64"):
        ours.encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ours.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 128, h, w\)"):
        ours.decode(torch.zeros(1, 32, 4, 4))


def test_bad_checkpoint_lists_every_problem(folders_a, tmp_path):
    sd = load_file(folders_a / "vae_only" / "diffusion_pytorch_model.safetensors")
    del sd["decoder.up_blocks.0.resnets.2.conv1.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["encoder.conv_in.bias"] = torch.zeros(7)
    (tmp_path / "vae").mkdir()
    save_file(sd, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    shutil.copy(folders_a / "vae_only" / "config.json", tmp_path / "vae" / "config.json")
    with pytest.raises(ValueError) as e:
        AutoEncoder.from_pretrained(tmp_path)
    msg = str(e.value)
    print(msg[-300:])
    # reported in the file's (diffusers) naming
    assert "missing: decoder.up_blocks.0.resnets.2.conv1.weight" in msg
    assert "unexpected: encoder.extra.weight" in msg
    assert "encoder.conv_in.bias: (7,) vs (32,)" in msg

    bfl = to_bfl_names(load_file(folders_a / "vae_only" / "diffusion_pytorch_model.safetensors"), 4)
    del bfl["decoder.up.3.block.2.conv1.weight"]  # == up_blocks.0 above
    bfl["decoder.junk"] = torch.zeros(1)
    save_file(bfl, tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match=r"missing: decoder.up.3.block.2.conv1.weight; unexpected: decoder.junk"):
        AutoEncoder.from_pretrained(tmp_path / "ae.safetensors")


def test_missing_sources(folders_a, tmp_path):
    missing = tmp_path / "nope" / "vae"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        AutoEncoder.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        AutoEncoder.from_pretrained(tmp_path / "ae.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoEncoder.from_pretrained(tmp_path)  # exists, but is no VAE folder
    (tmp_path / "vae").mkdir()
    shutil.copy(folders_a / "vae_only" / "config.json", tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        AutoEncoder.from_pretrained(tmp_path)


def test_unsupported_config_is_rejected(folders_a, tmp_path):
    shutil.copytree(folders_a / "vae_only", tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["mid_block_add_attention"] = False
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mid_block_add_attention"):
        AutoEncoder.from_pretrained(tmp_path)
