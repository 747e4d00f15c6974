"""Transformer parity with diffusers 0.42.1 on tiny random weights that diffusers itself saves."""


import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor
from safetensors.torch import load_file, save_file

import attention_selector
import model
import quant
from model import Flux2, Flux2Config, KVCache
from quant import FORMATS, Linear8, dequantize, quantize, to_8bit
from tiny import TINY, bfl_fp8_file, make_inputs, randomize_

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


def recorded_qk(ours, monkeypatch, *inputs, **kw):
    """q, k (B, L, H, D) that every block hands to attention() in a plain forward, in block order."""
    seen, real = [], model.attention
    monkeypatch.setattr(model, "attention", lambda q, k, *a: seen.append((q, k)) or real(q, k, *a))
    with torch.no_grad():
        ours(*inputs, **kw)
    monkeypatch.setattr(model, "attention", real)
    return seen


@pytest.mark.parametrize("block,queries,kv", [(0, "target", False), (0, "text", False), (2, "target", False),
                                              (3, "both", True), (1, "references", True)])  # fmt: skip
def test_reference_attention_equals_softmax_of_the_block(tiny, monkeypatch, block, queries, kv):
    """The scores are softmax(q k^T / sqrt(d)) of the same block over every key its queries see, written
    out here, averaged over heads and queries, at the reference keys; chunked equals unchunked."""
    _, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((3, 4), (2, 3)))
    ref, ref_ids = torch.cat(ref, 1), torch.cat(ref_ids)
    q, k = recorded_qk(ours, monkeypatch, img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_pattern=kv)[block]
    L, N, M = txt.shape[1], img.shape[1], ref.shape[1]
    rows = {"target": range(L, L + N), "text": range(L), "both": range(L + N), "references": range(L + N, L + N + M)}[queries]
    keys = list(range(L + N, L + N + M)) if kv and queries == "references" else list(range(L + N + M))
    want = torch.zeros(2, M)
    for b in range(2):
        for h in range(q.shape[2]):
            for i in rows:
                p = torch.softmax(torch.stack([q[b, i, h] @ k[b, j, h] for j in keys]) / q.shape[-1] ** 0.5, dim=0)
                want[b] += p[-M:]
    want /= q.shape[2] * len(rows)
    got = attention_selector.reference_attention(ours, img, img_ids, txt, txt_ids, t, ref, ref_ids, block=block, queries=queries, kv_pattern=kv)
    monkeypatch.setattr(attention_selector, "CHUNK_BYTES", 1)
    one_row = attention_selector.reference_attention(ours, img, img_ids, txt, txt_ids, t, ref, ref_ids, block=block, queries=queries,
                                                     kv_pattern=kv)  # fmt: skip
    assert got.shape == (2, M) and (got >= 0).all()
    assert_close(got, want)
    assert_close(one_row, got)


def test_reference_attention_bad_arguments(tiny):
    _, ours, _ = tiny
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((3, 4),))
    for kw, message in ((dict(block=4), "block 4"), (dict(queries="keys"), "queries")):
        with pytest.raises(ValueError, match=message):
            attention_selector.reference_attention(ours, img, img_ids, txt, txt_ids, t, ref[0], ref_ids[0], **kw)


# ----------------------------------------------------------------------------------------------
# 8-bit weights (quant.py)


def half_step(w, scale, kind):
    """The largest error round-to-nearest may leave in each weight, in weight units: half the spacing of
    the format's values around w / scale (int8: 1; e4m3: 2^-3 relative on normals, 2^-9 below 2^-6)."""
    v = (w / scale[:, None]).abs()
    return scale[:, None] * (0.5 if kind == "int8" else torch.maximum(v * 2**-4, torch.full_like(v, 2**-10)))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_rounds_to_nearest(kind):
    """Every weight within half a step of its 8-bit value; each row's largest |w| is the format's
    largest value; an all-zero row stays zero; quantizing the result again changes nothing."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 64, generator=g) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different sizes
    w[3] = 0
    w[5, 7] = 50.0  # an outlier
    q, scale = quantize(w, kind)
    assert q.dtype == FORMATS[kind][0] and scale.dtype == torch.float32 and scale.shape == (40,)
    back = dequantize(q, scale, torch.float32)
    err = (back - w).abs()
    assert (err <= half_step(w, scale, kind) * (1 + 1e-6)).all(), (err / half_step(w, scale, kind)).max()
    top = q.float().abs().amax(dim=1)
    assert (top[torch.arange(40) != 3] == FORMATS[kind][1]).all() and not q[3].float().any()
    q2, scale2 = quantize(back, kind)
    assert torch.equal(q2.float(), q.float()) and torch.allclose(scale2, scale, rtol=1e-6)


def test_linear8_is_the_linear_of_its_dequantized_weight():
    """forward and backward equal F.linear on weight * scale; backward saves no 16/32-bit copy of it;
    under autocast the matmul runs in autocast's dtype."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=g)
    layer = Linear8(32, 24, "int8")
    layer.weight.data, layer.weight_scale.data = quantize(w, "int8")
    W = dequantize(layer.weight, layer.weight_scale, torch.float32)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not [t for t in saved if t.shape == w.shape and t.dtype in (torch.float32, torch.bfloat16)]
    (gy,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_()
    want = torch.nn.functional.linear(x2, W)
    (gw,) = torch.autograd.grad(want.square().sum(), x2)
    assert torch.equal(y, want) and torch.allclose(gy, gw, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, torch.nn.functional.linear(x.bfloat16(), dequantize(layer.weight, layer.weight_scale, torch.bfloat16)))


@pytest.fixture(scope="module")
def eight_bit(tiny):
    """{(kind, dtype): the tiny model with 8-bit block Linears}, and the plain model in each dtype."""
    _, _, root = tiny
    plain = {dt: Flux2.from_pretrained(str(root), dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    q = {(k, dt): quant.from_pretrained(str(root), k, dtype=dt) for k in FORMATS for dt in plain}
    return q, plain


def run_tiny(model, dtype):
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 5), (3, 3)))
    with torch.no_grad():
        return model(img.to(dtype), img_ids, txt.to(dtype), txt_ids, t, ref=torch.cat(ref, 1).to(dtype),
                     ref_ids=torch.cat(ref_ids)).float()  # fmt: skip


def linears8(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear8)}


def bits(t):
    """t, with fp8 seen as bytes (torch.equal has no fp8 kernel)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_8bit_model_is_the_model_of_its_dequantized_weights(tiny, eight_bit, kind):
    """Exactly the block Linears are 8-bit; the model computes what the plain model computes with
    those weights dequantized (float32)."""
    q, plain = eight_bit
    model = q[(kind, torch.float32)]
    names = {n for n, m in plain[torch.float32].named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks.", "single_blocks."))}
    assert set(linears8(model)) == names and len(names) == 8 * TINY["num_layers"] + 2 * TINY["num_single_layers"]
    assert all(not p.requires_grad for p in model.parameters() if p.dtype == FORMATS[kind][0])
    deq = Flux2.from_pretrained(str(tiny[2]))
    with torch.no_grad():
        for n, m in linears8(model).items():
            deq.get_submodule(n).weight.copy_(dequantize(m.weight, m.weight_scale, torch.float32))
    assert_close(run_tiny(model, torch.float32), run_tiny(deq, torch.float32), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_8bit_model_output_within_its_quantization_error(eight_bit, kind, dtype):
    """The 8-bit model against the plain one in the same dtype: relative RMS error of the velocity at
    most eps * sqrt(n). eps: the largest relative RMS error quantization leaves in one layer's weights
    (||W8 - W|| / ||W||, the rounding step as realized: ~0.6% int8, ~2.5% fp8); n: the 8-bit Linears a
    token passes in sequence (4 per double block, 2 per single). Each adds an error of at most its
    weights' relative size to its output (normalized inputs, gated residuals), independent errors add
    in quadrature. bf16 rounds the activations of both models alike: the same bound."""
    q, plain = eight_bit
    model, ref = q[(kind, dtype)], plain[dtype]
    eps = max(
        (dequantize(m.weight, m.weight_scale, torch.float32) - ref.get_submodule(n).weight.float()).norm().item()
        / ref.get_submodule(n).weight.float().norm().item()
        for n, m in linears8(model).items()
    )
    n = 4 * TINY["num_layers"] + 2 * TINY["num_single_layers"]
    got, want = run_tiny(model, dtype), run_tiny(ref, dtype)
    rel = ((got - want).norm() / want.norm()).item()
    print(f"\n{kind} {dtype}: velocity rel RMS error {rel:.2e}, bound eps {eps:.2e} x sqrt({n}) = {eps * n**0.5:.2e}")
    assert rel <= eps * n**0.5


def tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_8bit_weight_bytes(eight_bit):
    """The tiny 8-bit model holds 1 byte per block-Linear weight, 4 per row scale and the bf16 rest:
    no 16-bit copy kept besides."""
    q, plain = eight_bit
    bf16 = tensor_bytes(plain[torch.bfloat16])
    for kind in FORMATS:
        layers = linears8(q[(kind, torch.bfloat16)]).values()
        want = bf16 - sum(m.weight.numel() for m in layers) + sum(4 * m.out_features for m in layers)
        assert tensor_bytes(q[(kind, torch.bfloat16)]) == want


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("name", ["klein-4b", "klein-9b"])
def test_8bit_weight_bytes_at_klein_size(name, kind):
    """At klein's real shapes (meta tensors through the same converter) the 8-bit model's tensors take
    at most 0.55x the bf16 model's bytes."""
    with torch.device("meta"):
        model = Flux2(Flux2Config.from_name(name))
    sd = {k: v.bfloat16() for k, v in model.state_dict().items()}
    bf16 = sum(v.numel() * 2 for v in sd.values())
    ratio = sum(v.numel() * v.element_size() for v in to_8bit(model, sd, kind, torch.bfloat16, "meta").values()) / bf16
    print(f"\n{name} {kind}: {ratio:.3f} x bf16's {bf16 / 1e9:.2f} GB = {ratio * bf16 / 1e9:.2f} GB")
    assert ratio <= 0.55


@pytest.mark.parametrize("per_row", [False, True])
def test_bfl_fp8_file_loads_as_it_is(tiny, tmp_path, per_row):
    """The file's fp8 values and scales become the Linear8 tensors unchanged (a per-tensor scale repeated
    per row); the model equals a plain one holding weight * weight_scale; without --weights fp8 the
    file is one error; a scale of another shape is one error naming it."""
    _, ours, _ = tiny
    path = tmp_path / "flux-2-klein-tiny-fp8.safetensors"
    sd = bfl_fp8_file(ours, path, per_row)
    model = quant.from_pretrained(str(path), "fp8", dtype=torch.float32)
    layers = linears8(model)
    assert len(layers) == 8 * TINY["num_layers"] + 2 * TINY["num_single_layers"]
    deq = {}
    for n, m in layers.items():
        assert torch.equal(bits(m.weight), bits(sd[f"{n}.weight"]))
        assert torch.equal(m.weight_scale, sd[f"{n}.weight_scale"].expand(m.out_features))
        deq[f"{n}.weight"] = sd[f"{n}.weight"].float() * sd[f"{n}.weight_scale"].reshape(-1, 1)
    plain_path = tmp_path / "dequantized.safetensors"
    save_file({k: v.float().contiguous() for k, v in sd.items() if not k.endswith("_scale")} | deq, str(plain_path))
    plain = Flux2.from_pretrained(str(plain_path), dtype=torch.float32)
    assert_close(run_tiny(model, torch.float32), run_tiny(plain, torch.float32), rel=1e-6)
    with pytest.raises(ValueError, match="weights fp8"):
        Flux2.from_pretrained(str(path))
    with pytest.raises(ValueError, match="weights fp8"):
        quant.from_pretrained(str(path), "int8")
    bad = dict(sd, **{"single_blocks.0.linear1.weight_scale": torch.ones(2)})
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="single_blocks.0.linear1.weight_scale: shape"):
        quant.from_pretrained(str(tmp_path / "bad.safetensors"), "fp8")
    with pytest.raises(ValueError, match="weights 'fp4'"):
        quant.from_pretrained(str(tiny[2]), "fp4")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_8bit_from_a_bfl_single_file_equals_from_a_diffusers_folder(tiny, eight_bit, tmp_path, kind):
    """Quantizing on load gives the same tensors from a BFL bf16/fp32 single file as from the diffusers folder."""
    _, ours, _ = tiny
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file(bfl_from_diffusers_via_ours(ours), str(path))
    got, want = quant.from_pretrained(str(path), kind).state_dict(), eight_bit[0][(kind, torch.float32)].state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(bits(v), bits(want[k])) for k, v in got.items())
