"""Transformer parity with diffusers 0.42.1 on tiny random weights that diffusers itself saves."""


import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor
from safetensors.torch import load_file, save_file

import model
from model import Flux2, Flux2Config, KVCache
from tiny import TINY, make_inputs, randomize_

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, our model, repository folder) with the same random weights."""
    root = tmp_path_factory.mktemp("flux2")
    torch.manual_seed(0)
    ref = randomize_(Flux2Transformer2DModel(**TINY)).eval()
    ref.save_pretrained(root / "transformer")
    ours = Flux2.from_pretrained(str(root))
    return ref, ours, root


def assert_close(a, b, rel=1e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"
    return err


def dense_diffusers(ref_model, img, img_ids, txt, txt_ids, t, ref, ref_ids):
    N = img.shape[1]
    with torch.no_grad():
        out = ref_model(
            hidden_states=torch.cat([img, ref], 1) if ref is not None else img,
            encoder_hidden_states=txt, timestep=t, img_ids=torch.cat([img_ids, ref_ids]) if ref is not None else img_ids,
            txt_ids=txt_ids, return_dict=False,
        )[0]  # fmt: skip
    return out[:, :N]


@pytest.mark.parametrize("refs", [(), ((2, 5),), ((2, 5), (4, 3), (1, 6))])
def test_forward_equals_diffusers(tiny, refs):
    ref_model, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=refs)
    ref = torch.cat(ref, 1) if refs else None
    ref_ids = torch.cat(ref_ids) if refs else None
    want = dense_diffusers(ref_model, img, img_ids, txt, txt_ids, t, ref, ref_ids)
    with torch.no_grad():
        got = ours(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)
    assert got.shape == img.shape
    assert_close(got, want)


def test_sparse_subset_equals_diffusers(tiny):
    """A random subset of reference tokens, diffusers run on the same subset with the same ids."""
    ref_model, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((4, 5), (3, 3)))
    ref, ref_ids = torch.cat(ref, 1), torch.cat(ref_ids)
    keep = torch.randperm(ref.shape[1], generator=torch.Generator().manual_seed(3))[:9].sort().values
    want = dense_diffusers(ref_model, img, img_ids, txt, txt_ids, t, ref[:, keep], ref_ids[keep])
    with torch.no_grad():
        got = ours(img, img_ids, txt, txt_ids, t, ref=ref[:, keep], ref_ids=ref_ids[keep])
        dense = ours(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)
    assert_close(got, want)
    assert (got - dense).abs().max() > 1e-3  # the subset really changes the result


@pytest.fixture(scope="module")
def kv_reference(tiny):
    ref_model, _, _ = tiny
    for block in ref_model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref_model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return ref_model


@pytest.mark.parametrize("subset", [False, True])
def test_kv_cache_equals_diffusers(tiny, kv_reference, subset):
    _, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 5), (3, 4)))
    ref, ref_ids = torch.cat(ref, 1), torch.cat(ref_ids)
    if subset:
        keep = torch.tensor([0, 3, 4, 9, 12, 20])
        ref, ref_ids = ref[:, keep], ref_ids[keep]
    M, N = ref.shape[1], img.shape[1]
    with torch.no_grad():
        want0, dcache = kv_reference(
            hidden_states=torch.cat([ref, img], 1), encoder_hidden_states=txt, timestep=t,
            img_ids=torch.cat([ref_ids, img_ids]), txt_ids=txt_ids, kv_cache_mode="extract",
            num_ref_tokens=M, return_dict=False,
        )  # fmt: skip
        t1 = torch.tensor([0.2, 0.9])
        want1 = kv_reference(
            hidden_states=img, encoder_hidden_states=txt, timestep=t1, img_ids=img_ids, txt_ids=txt_ids,
            kv_cache_mode="cached", kv_cache=dcache, return_dict=False,
        )[0]  # fmt: skip
        cache = KVCache()
        got0 = ours(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_cache=cache)
        got1 = ours(img, img_ids, txt, txt_ids, t1, kv_cache=cache)
        no_cache = ours(img, img_ids, txt, txt_ids, t1, ref=ref, ref_ids=ref_ids, kv_pattern=True)
        dense = ours(img, img_ids, txt, txt_ids, t1, ref=ref, ref_ids=ref_ids)
    assert want0.shape == got0.shape == (2, N, TINY["in_channels"])
    assert_close(got0, want0)
    assert_close(got1, want1)
    assert_close(no_cache, want1)  # the KV pattern without a cache: what training uses
    assert (dense - want1).abs().max() > 1e-3  # the KV pattern is not standard klein
    assert len(cache) == TINY["num_layers"] + TINY["num_single_layers"] and cache.num_ref_tokens == M
    layers = dcache.double_block_caches + dcache.single_block_caches
    for (k, v), d in zip(cache.kv, layers):  # ours (B, H, M, D), diffusers (B, M, H, D)
        assert_close(k.transpose(1, 2), d.k_ref)
        assert_close(v.transpose(1, 2), d.v_ref)


def test_batched_ids_per_example(tiny):
    """Per-example ids (B, N, 4): each example equals a batch-1 run with its own ids."""
    _, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((3, 4),))
    ref, ref_ids = ref[0], ref_ids[0]
    ids_b = torch.stack([ref_ids, ref_ids.flip(0)])
    with torch.no_grad():
        both = ours(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ids_b)
        for b in range(2):
            one = ours(img[b : b + 1], img_ids, txt[b : b + 1], txt_ids, t[b : b + 1], ref=ref[b : b + 1], ref_ids=ids_b[b])
            assert_close(both[b : b + 1], one)


def bfl_from_diffusers_via_ours(ours):
    return {"model.diffusion_model." + k: v.contiguous() for k, v in ours.state_dict().items()}


def test_bfl_single_file(tiny, tmp_path):
    """A BFL single file: diffusers' own converter maps it back to the diffusers weights; it loads."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    ref_model, ours, _ = tiny
    bfl = bfl_from_diffusers_via_ours(ours)
    back = convert_flux2_transformer_checkpoint_to_diffusers({k.removeprefix("model.diffusion_model."): v for k, v in bfl.items()})
    want = ref_model.state_dict()
    assert set(back) == set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file(bfl, str(path))
    loaded = Flux2.from_pretrained(str(path))
    assert loaded.cfg == ours.cfg
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 5),))
    with torch.no_grad():
        a = loaded(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0])
        b = ours(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0])
    assert torch.equal(a, b)


def test_sharded_diffusers_folder_and_dtype(tiny, tmp_path):
    ref_model, ours, _ = tiny
    ref_model.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = Flux2.from_pretrained(str(tmp_path / "transformer"), dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.bfloat16()), k


@pytest.mark.parametrize("name,count", [("klein-4b", 3.88e9), ("klein-9b", 9.08e9)])
def test_parameter_counts(name, count):
    cfg = Flux2Config.from_name(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in Flux2(cfg).parameters())
        diffusers_cfg = dict(
            num_layers=cfg.depth, num_single_layers=cfg.depth_single, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_dim, guidance_embeds=False,
        )  # fmt: skip
        theirs = sum(p.numel() for p in Flux2Transformer2DModel(**diffusers_cfg).parameters())
    assert ours == theirs
    assert abs(ours - count) < 0.005e9


def test_mismatched_checkpoint_errors(tiny, tmp_path):
    _, ours, root = tiny
    sd = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    sd.pop("proj_out.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["x_embedder.weight"] = torch.zeros(5, 5)
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text((root / "transformer" / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        Flux2.from_pretrained(str(folder))
    msg = str(e.value)
    assert "missing: final_layer.linear.weight" in msg and "unexpected: extra.weight" in msg
    assert "img_in.weight: (5, 5)" in msg
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        Flux2.from_pretrained(str(corrupt))
    with pytest.raises(FileNotFoundError):
        Flux2.from_pretrained(str(tmp_path / "nowhere" / "x"))


def test_cache_misuse(tiny):
    _, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 2),))
    cache = KVCache()
    with torch.no_grad():
        ours(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0], kv_cache=cache)
        with pytest.raises(ValueError, match="already filled"):
            ours(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0], kv_cache=cache)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU: the CUDA kernels' LSE too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cached_attention_equals_one_attention(device, dtype, rel):
    """The cache read in place: two attentions merged by their log-sum-exps equal one attention over
    the concatenated keys (float32 math on the same inputs), for a cache of each image's own (Bc = B)
    and one shared by the batch (Bc = 1); bf16 to its rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, 2, 64, generator=g).to(device, dtype) for _ in range(3))  # (B, L, H, D)
    k_ref, v_ref = (torch.randn(3, 6, 2, 64, generator=g).to(device, dtype).transpose(1, 2) for _ in range(2))  # (B, H, M, D)
    heads = lambda x: x.transpose(1, 2).float()
    out, lse = model.sdpa_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    want_out, want_lse = model.sdpa_lse_math(heads(q), heads(k), heads(v))
    assert_close(out.float(), want_out, rel)
    assert_close(lse, want_lse, rel)
    for shared in (False, True):
        kr, vr = (k_ref[:1], v_ref[:1]) if shared else (k_ref, v_ref)
        keys = torch.cat([heads(k), kr.float().expand(3, -1, -1, -1)], dim=2)
        values = torch.cat([heads(v), vr.float().expand(3, -1, -1, -1)], dim=2)
        want = model.sdpa_lse_math(heads(q), keys, values)[0].transpose(1, 2)
        assert_close(model.cached_attention(q, k, v, kr, vr).float(), want, rel)
