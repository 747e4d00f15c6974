"""LoRA formats against diffusers' own loaders, the manifest checks, the latent cache, and training:
loss falls, torchrun equals one process, a resumed run equals an uninterrupted one."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from PIL import Image
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import lora
import train
from data import CachedDataset, ManifestError, cache_dataset, read_manifest
from files import load_image
from checkpoints import config_from_diffusers, diffusers_to_bfl
from model import Flux2
from klein import prepare_reference, to_tensor
import quant
from quant import FORMATS, Linear8, dequantize
from tiny import TINY, make_inputs, randomize_, write_dataset
from text_encoder import TextEncoder
from vae import AutoEncoder

HERE = os.path.dirname(os.path.abspath(__file__))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------
# LoRA formats


@pytest.fixture
def pair(tmp_path):
    """A fresh (diffusers model, our model) pair with the same tiny random weights."""
    torch.manual_seed(0)
    theirs = randomize_(Flux2Transformer2DModel(**TINY)).eval()
    theirs.save_pretrained(tmp_path / "transformer")
    return theirs, Flux2.from_pretrained(str(tmp_path))


def run_both(theirs, ours):
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 5), (3, 3)))
    ref, ref_ids = torch.cat(ref, 1), torch.cat(ref_ids)
    with torch.no_grad():
        want = theirs(
            hidden_states=torch.cat([img, ref], 1), encoder_hidden_states=txt, timestep=t,
            img_ids=torch.cat([img_ids, ref_ids]), txt_ids=txt_ids, return_dict=False,
        )[0][:, : img.shape[1]]  # fmt: skip
        got = ours(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)
    return got, want


def fused_weights(theirs):
    """diffusers' effective weights after fuse_lora, in BFL names."""
    sd = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    return diffusers_to_bfl(sd, config_from_diffusers(theirs.config))


def test_saved_lora_loads_in_diffusers(pair, tmp_path):
    """Our LoRA on every Linear (alpha != rank, random B) saved and loaded by diffusers' PEFT loader:
    the same outputs as ours unmerged and merged; our loader reads it back to the same weights."""
    theirs, ours = pair
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.inject(ours, targets=["*"], rank=3, alpha=5.0, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora.lora_modules(ours).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora.save_lora(ours, str(path))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in load_file(str(path))
    assert "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B.weight" in load_file(str(path))
    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer")

    unmerged, want = run_both(theirs, ours)
    before = run_both(Flux2Transformer2DModel.from_pretrained(tmp_path / "transformer").eval(), ours)[1]
    assert rel_err(before, want) > 0.05  # the LoRA changes the output
    for m in lora.lora_modules(ours).values():
        m.merge()
    merged, _ = run_both(theirs, ours)
    err_unmerged, err_merged = rel_err(unmerged, want), rel_err(merged, want)
    print(f"\nsaved LoRA vs diffusers: unmerged {err_unmerged:.2e}, merged {err_merged:.2e} (max abs / max |out|)")
    assert err_unmerged < 1e-5 and err_merged < 1e-5

    theirs.fuse_lora()
    fused = fused_weights(theirs)
    fresh = Flux2.from_pretrained(str(tmp_path))
    lora.load_lora(fresh, str(tmp_path))
    for k, v in fresh.state_dict().items():
        assert rel_err(v, fused[k]) < 1e-6, k
        assert rel_err(v, ours.state_dict()[k]) < 1e-6, k
    for m in lora.lora_modules(ours).values():
        m.unmerge()
    assert max(rel_err(ours.state_dict()[k], v) for k, v in base.items()) < 1e-6


def test_diffusers_trainer_lora_with_alpha(pair, tmp_path):
    """A file saved the way diffusers' klein trainer saves (PEFT adapter, lora_alpha = 2 r, the config
    in the safetensors metadata): our loader reads alpha from there and matches diffusers' fuse."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs, ours = pair
    targets = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"]
    targets += [f"single_transformer_blocks.{i}.attn.to_out" for i in range(TINY["num_single_layers"])]
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    Flux2KleinPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(theirs),
        transformer_lora_adapter_metadata=theirs.peft_config["default"].to_dict(),
    )  # fmt: skip
    names = lora.load_lora(ours, str(tmp_path / "lora"))
    assert len(names) == 2 * TINY["num_layers"] + 2 * TINY["num_single_layers"]  # qkv, proj; linear1, linear2
    theirs.fuse_lora()
    fused = fused_weights(theirs)
    worst = max(rel_err(v, fused[k]) for k, v in ours.state_dict().items())
    print(f"\ndiffusers-trainer LoRA (alpha = 2 r) merged weights vs diffusers: max rel {worst:.2e}")
    assert worst < 1e-6


def bfl_lora(ours, rank=4, seed=3):
    """A BFL/ai-toolkit LoRA on every Linear: diffusion_model.<BFL name>.lora_A/B.weight, one pair per layer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in ours.named_modules():
        if isinstance(m, torch.nn.Linear):
            out, inp = m.weight.shape
            sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
            sd[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    return sd


def test_bfl_lora_matches_diffusers(pair):
    theirs, ours = pair
    sd = bfl_lora(ours)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs.load_lora_adapter(Flux2KleinPipeline.lora_state_dict(dict(sd)), prefix="transformer")
    theirs.fuse_lora(lora_scale=0.7)
    fused = fused_weights(theirs)
    names = lora.load_lora(ours, sd, scale=0.7)
    assert "double_blocks.1.txt_attn.qkv" in names and "final_layer.adaLN_modulation.1" in names
    got = ours.state_dict()
    worst = 0.0
    for k, v in got.items():
        if k == "final_layer.adaLN_modulation.1.weight":
            continue
        worst = max(worst, rel_err(v, fused[k]))
        assert rel_err(v, fused[k]) < 1e-6, k
    # diffusers' converter maps final_layer.adaLN_modulation.1 onto norm_out.linear without swapping the
    # (shift, scale) rows into its (scale, shift) order; in our BFL-layout model the pair applies as is.
    k = "final_layer.adaLN_modulation.1.weight"
    a, b = sd[f"diffusion_model.{k[:-7]}.lora_A.weight"], sd[f"diffusion_model.{k[:-7]}.lora_B.weight"]
    assert rel_err(got[k], base[k] + 0.7 * b @ a) < 1e-6
    assert rel_err(fused[k], base[k] + 0.7 * lora.swap_halves(b) @ a) < 1e-6
    print(f"\nBFL LoRA merged weights vs diffusers: max rel {worst:.2e}")


def kohya_lora(ours, seed=4):
    """A kohya LoRA on the layers diffusers' kohya converter knows, alpha != rank; block 1's img qkv
    is block-diagonal (rank 6 = 3 x 2), which diffusers splits into three rank-2 pairs."""
    g = torch.Generator().manual_seed(seed)
    names = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear"]
    for i in range(TINY["num_layers"]):
        layers = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
        names += [f"double_blocks.{i}.{n}" for n in layers]
    names += [f"single_blocks.{i}.{n}" for i in range(TINY["num_single_layers"]) for n in ("linear1", "linear2")]
    sd = {}
    for name in names:
        out, inp = ours.get_submodule(name).weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        rank = 6 if name == "double_blocks.1.img_attn.qkv" else 4
        up = torch.randn(out, rank, generator=g) * 0.1
        if rank == 6:  # q rows use only columns 0-1, k rows 2-3, v rows 4-5
            mask = torch.block_diag(*[torch.ones(out // 3, 2)] * 3)
            up = up * mask
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(float(rank) * 2.5)
    return sd


def test_kohya_lora_matches_diffusers(pair):
    theirs, ours = pair
    sd = kohya_lora(ours)
    theirs.load_lora_adapter(Flux2KleinPipeline.lora_state_dict(dict(sd)), prefix="transformer")
    theirs.fuse_lora()
    fused = fused_weights(theirs)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.load_lora(ours, sd)
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) == 5 + 8 * TINY["num_layers"] + 2 * TINY["num_single_layers"]
    worst = max(rel_err(v, fused[k]) for k, v in ours.state_dict().items())
    print(f"\nkohya LoRA merged weights vs diffusers: max rel {worst:.2e}")
    assert worst < 1e-6


def test_unmerged_load_equals_merged(pair, tmp_path):
    """merge=False wraps layers in LoRALinear: a fused BFL pair becomes three chunks with equal A;
    diffusers pairs of different ranks on one layer are zero-padded, a missing chunk stays zero."""
    _, ours = pair
    g = torch.Generator().manual_seed(5)
    D = ours.cfg.hidden_size
    sd = {
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight": torch.randn(2, D, generator=g),
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_B.weight": torch.randn(3 * D, 2, generator=g) * 0.1,
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, D, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(D, 2, generator=g) * 0.1,
        "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": torch.randn(5, D, generator=g),
        "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": torch.randn(D, 5, generator=g) * 0.1,
        "transformer.norm_out.linear.lora_A.weight": torch.randn(3, D, generator=g),
        "transformer.norm_out.linear.lora_B.weight": torch.randn(2 * D, 3, generator=g) * 0.1,
    }
    lora.load_lora(ours, sd, scale=0.5)
    unmerged = Flux2.from_pretrained(str(tmp_path))
    lora.load_lora(unmerged, sd, scale=0.5, merge=False)
    mods = lora.lora_modules(unmerged)
    assert sorted(mods) == ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv", "final_layer.adaLN_modulation.1"]
    q0 = mods["double_blocks.0.img_attn.qkv"]
    assert q0.rank == 5 and q0.chunks == 3 and not q0.lora_B[1].any() and not q0.lora_A[0, 2:].any()
    q1 = mods["double_blocks.1.img_attn.qkv"]
    assert torch.equal(q1.lora_A[0], q1.lora_A[2])
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 5),))
    with torch.no_grad():
        a = unmerged(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0])
        b = ours(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0])
    assert rel_err(a, b) < 1e-5
    for m in lora.lora_modules(unmerged).values():
        m.merge()
    for k, v in ours.state_dict().items():
        assert rel_err(unmerged.state_dict()[k], v) < 1e-6, k


def test_lora_over_an_8bit_base(pair, tmp_path):
    """A LoRA over int8 block Linears: its gradients equal those over the plain model holding the
    dequantized weights; an optimizer step changes the LoRA only (the base stays frozen and int8); a
    loaded LoRA stays unmerged there and equals the one merged into the dequantized weights."""
    base, deq = quant.from_pretrained(str(tmp_path), "int8"), deq_model(tmp_path)
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((2, 5),))
    grads = []
    for model in (base, deq):
        model.requires_grad_(False)
        lora.inject(model, rank=2, seed=3)
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
        out = model(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0], kv_pattern=True)
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1]) and all(n.endswith(("lora_A", "lora_B")) for n in grads[0])
    for n, g in grads[0].items():
        assert rel_err(g, grads[1][n]) < 1e-5, n
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    trainable = [p for p in base.parameters() if p.requires_grad]
    lora_before = [p.clone() for p in trainable]
    torch.optim.AdamW(trainable, lr=1e-2).step()
    after = base.state_dict()
    assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in frozen.items())
    assert sum(v.dtype == torch.int8 for v in after.values()) == 8 * TINY["num_layers"] + 2 * TINY["num_single_layers"]
    assert all(not torch.equal(a, b) for a, b in zip(lora_before, trainable))

    sd = bfl_lora(pair[1])
    eight, plain = quant.from_pretrained(str(tmp_path), "int8"), deq_model(tmp_path)
    lora.load_lora(eight, sd, scale=0.7)
    lora.load_lora(plain, sd, scale=0.7)
    mods = lora.lora_modules(eight)
    assert mods and all(m.weight.dtype == torch.int8 for m in mods.values())
    with pytest.raises(ValueError, match="cannot be merged"):
        next(iter(mods.values())).merge()
    with torch.no_grad():
        a = eight(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0])
        b = plain(img, img_ids, txt, txt_ids, t, ref=ref[0], ref_ids=ref_ids[0])
    assert rel_err(a, b) < 1e-5


def deq_model(folder):
    """The plain model holding the int8 model's dequantized weights."""
    eight, model = quant.from_pretrained(str(folder), "int8"), Flux2.from_pretrained(str(folder))
    with torch.no_grad():
        for n, m in eight.named_modules():
            if isinstance(m, Linear8):
                model.get_submodule(n).weight.copy_(dequantize(m.weight, m.weight_scale, torch.float32))
    return model


def test_bad_lora_keys(pair):
    _, ours = pair
    sd = bfl_lora(ours)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    sd["transformer.not_a_layer.lora_A.weight"] = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="unknown LoRA keys") as e:
        lora.load_lora(ours, sd)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in str(e.value)
    assert "transformer.not_a_layer.lora_A.weight" in str(e.value)
    sd = bfl_lora(ours)
    del sd["diffusion_model.img_in.lora_B.weight"]
    sd["diffusion_model.txt_in.lora_A.weight"] = torch.zeros(4, 5)
    with pytest.raises(ValueError) as e:
        lora.load_lora(ours, sd)
    assert "img_in: lora_A/lora_down and lora_B/lora_up must both be present" in str(e.value)
    assert "txt_in: lora_A (4, 5)" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Data: a tiny klein repository and a manifest of synthetic images

def test_cache(klein, tmp_path, monkeypatch):
    root, manifest, cache = klein
    data = CachedDataset(str(cache))
    assert len(data) == 7 and data.buckets() == {(4, 4): [0, 2, 4, 6], (4, 6): [1, 3, 5]}
    item = data[0]  # line 1: a 64x64 target, references of 64x64 and 80x64 px
    assert item["target"].shape == (16, 4, 4) and [r.shape for r in item["refs"]] == [(16, 4, 4), (16, 4, 5)]
    assert item["txt"].shape == (512, 96) and item["task"] == "subject"
    assert len(os.listdir(cache / "text")) == 2  # 7 prompts, 2 distinct
    vae = AutoEncoder.from_pretrained(str(root))
    with torch.no_grad():
        want = vae.encode(to_tensor(prepare_reference(load_image(str(root / "data" / "img" / "extra0.png")))))[0]
    assert torch.equal(item["refs"][1], want)

    # resumable: an interrupted run (no index.json, one example missing) encodes only that example;
    # a changed setting encodes everything again
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    os.remove(copy / "index.json")
    os.remove(copy / "latents" / "00000003.safetensors")  # line 3: a target and one reference
    encoded = []
    fake = lambda x: encoded.append(tuple(x.shape)) or torch.zeros(1, 16, x.shape[2] // 16, x.shape[3] // 16)
    monkeypatch.setattr(vae, "encode", fake)
    text_encoder = TextEncoder.from_pretrained(str(root))
    cache_dataset(str(manifest), vae, text_encoder, str(copy), progress=False)
    assert encoded == [(1, 3, 64, 64)] * 2 and CachedDataset(str(copy)).index == data.index
    cache_dataset(str(manifest), vae, text_encoder, str(copy), max_area=64 * 64, progress=False)
    assert len(encoded) == 2 + 7 + 7 + 3 and not any(name.endswith(".tmp") for name in os.listdir(copy / "latents"))
    assert CachedDataset(str(copy)).buckets() == {(4, 4): [0, 2, 4, 6], (3, 4): [1, 3, 5]}  # 96x64 -> 78x52 -> 64x48


def manifest_with(tmp_path, bad_line):
    """A manifest whose line 2 is bad_line between two good lines (images from write_dataset)."""
    write_dataset(tmp_path, n=1)
    good = json.dumps(dict(prompt="p", target="img/target0.png", references=["img/ref0.png"], task="edit"))
    path = tmp_path / "m.jsonl"
    path.write_text(f"{good}\n{bad_line}\n\n{good}\n")
    return path


def record(**change):
    r = dict(prompt="p", target="img/target0.png", references=["img/ref0.png"], task="edit") | change
    return json.dumps({k: v for k, v in r.items() if v is not None})


@pytest.mark.parametrize(
    "bad_line,problem",
    [
        ('{"prompt": "p", "target": ', "bad JSON"),
        (record(target=None), "missing field 'target'"),
        (record(references="img/ref0.png"), "field 'references' must be a list, got str"),
        (record(prompt=3), "field 'prompt' must be a str, got int"),
        (record(references=["img/nowhere.png"]), "image not found: "),
        (record(target="m.jsonl"), "unreadable image "),
        (record(references=[]), "no references"),
        (record(task="style"), "unknown task 'style'; expected one of edit, subject"),
        (record(references=["img/small.png"]), "image too small: "),
    ],
)
def test_manifest_errors(tmp_path, bad_line, problem):
    path = manifest_with(tmp_path, bad_line)
    Image.new("RGB", (48, 64)).save(tmp_path / "img" / "small.png")
    with pytest.raises(ManifestError) as e:
        read_manifest(str(path))
    assert f"{path} line 2: {problem}" in str(e.value)
    examples = read_manifest(str(path), skip_bad=True)
    assert [ex.line for ex in examples] == [1, 4]


def test_manifest_error_lists_every_line(tmp_path, capsys):
    path = manifest_with(tmp_path, record(task="style"))
    path.write_text(path.read_text() + record(references=[]) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(str(path))
    assert str(e.value).splitlines() == [
        f"2 bad lines in {path} (--skip-bad skips them):",
        f"{path} line 2: unknown task 'style'; expected one of edit, subject",
        f"{path} line 5: no references: an example needs at least one reference image",
    ]
    assert len(read_manifest(str(path), skip_bad=True)) == 2
    assert "skipped 2 bad line(s)" in capsys.readouterr().err


def error_line(e, capsys):
    """The one `error:` line a CLI exited with: sys.exit("error: ...") or files.fail (printed, exit status 1)."""
    err = capsys.readouterr().err.splitlines()
    if isinstance(e.value.code, str):
        return e.value.code
    errors = [line for line in err if line.startswith("error: ")]
    assert e.value.code == 1 and len(errors) == 1, err
    return errors[0]


def test_cli_bad_input(klein, tmp_path, capsys):
    root, _, cache = klein
    path = manifest_with(tmp_path, record(target=None))
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(root), "--data", str(path), "--out", str(tmp_path / "run")])
    assert error_line(e, capsys) == f"error: {path} line 2: missing field 'target'"
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(root), "--data", str(cache), "--out", str(tmp_path / "run"), "--keep-range", ".3", ".1"])
    assert e.value.code == 1 and "--keep-range needs 0 < LO <= HI <= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tmp_path), "--data", str(cache), "--out", str(tmp_path / "run")])
    message = error_line(e, capsys)
    assert message.startswith("error: ") and "\n" not in message


def test_compact_cache_and_training(klein, tmp_path, capsys):
    """data.py --compact 2 stores each reference also downscaled (klein.compact_reference, then the VAE);
    train.py --compact 2 trains on those at ids spanning the full-size grid, no token dropped; a factor
    the cache lacks and --keep-range beside --compact are refused before any model loads."""
    from klein import compact_reference, reference_ids

    root, manifest, cache = klein
    small = tmp_path / "cache"
    data.main([str(manifest), "--model", str(root), "--out", str(small), "--compact", "2"])
    item = CachedDataset(str(small))[0]  # line 1: references of 64x64 and 80x64 px
    assert [r.shape for r in item["compact"][2]] == [(16, 2, 2), (16, 2, 3)]
    vae = AutoEncoder.from_pretrained(str(root))
    with torch.no_grad():
        image = prepare_reference(load_image(str(root / "data" / "img" / "extra0.png")))
        assert torch.equal(item["compact"][2][1], vae.encode(to_tensor(compact_reference(image, 2)))[0])
    args = train.parse_args(["--model", str(root), "--data", str(small), "--out", str(tmp_path / "run"), "--compact", "2",
                             "--keep-all-prob", "0"])  # fmt: skip
    (example,) = train.step_examples(CachedDataset(str(small)), [0], 0, 0, 1, args)
    want = [reference_ids(k, *r.shape[1:], span=tuple(f.shape[1:])) for k, (r, f) in enumerate(zip(item["compact"][2], item["refs"]))]
    assert torch.equal(example["ref_ids"], torch.cat(want)) and example["ref"].shape == (4 + 6, 16)
    train.main(["--model", str(root), "--data", str(small), "--out", str(tmp_path / "run"), "--compact", "2", "--steps", "2"])
    assert "(step 2" in capsys.readouterr().out
    for extra, message in ((["--compact", "3"], "--compact 3: --data holds no references downscaled by that factor"),
                           (["--compact", "2", "--keep-range", "0.1", "0.2"], "--keep-range cannot apply with --compact"),
                           (["--compact", "1"], "--compact must be an integer in [2, 64]")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            train.main(["--model", str(root), "--data", str(small), "--out", str(tmp_path / "bad"), *extra])
        assert message in error_line(e, capsys)
        assert not (tmp_path / "bad" / "pytorch_lora_weights.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# Training


def test_drop_references():
    refs = [torch.randn(16, 4, 5), torch.randn(16, 3, 3)]
    keeps = train.keep_fractions(train.generator(0, 1, "keep"), 2, (0.2, 0.25), keep_all_prob=0.0)
    assert keeps[:1] == train.keep_fractions(train.generator(0, 1, "keep"), 1, (0.2, 0.25), 0.0)  # per slot, whatever the count
    tokens, ids = train.drop_references(refs, train.generator(0, 1, 2), keeps)
    again = train.drop_references(refs, train.generator(0, 1, 2), keeps)
    assert torch.equal(tokens, again[0]) and torch.equal(ids, again[1])
    first = ids[:, 0] == 10
    assert first.sum() == 4 and (~first).sum() == 2  # round(f * 20), round(f * 9) kept with f in [0.2, 0.25]
    for k, z in enumerate(refs):  # survivors keep their own latent and their original (t, h, w, 0) id
        sel = ids[:, 0] == 10 * (k + 1)
        for x, (t, h, w, l) in zip(tokens[sel], ids[sel].tolist()):
            assert torch.equal(x, z[:, h, w]) and l == 0
    other = train.drop_references(refs, train.generator(0, 1, 3), keeps)  # another example of the step:
    assert other[1].shape == ids.shape and not torch.equal(other[1], ids)  # the same count, other tokens
    assert train.drop_references(refs, train.generator(0, 1, 2), None)[0].shape == (29, 16)
    # per reference, over steps: all kept with probability keep_all_prob, else f ~ U(keep_range)
    draws = [train.keep_fractions(train.generator(0, n, "keep"), 2, (0.05, 0.25), 0.5) for n in range(400)]
    assert 0.4 < sum(d is None for d in draws) / 400 < 0.6
    fractions = torch.tensor([d for d in draws if d is not None])
    assert fractions.min() >= 0.05 and fractions.max() <= 0.25 and abs(fractions.mean() - 0.15) < 0.01
    assert abs(torch.corrcoef(fractions.T)[0, 1]) < 0.2  # the slots' fractions are independent


def eval_loss(model, data, draws=4):
    """Mean flow-matching loss over every example and `draws` fixed draws (sigma, noise, kept tokens),
    and the loss of predicting zero velocity on the same draws."""
    losses, zero = [], []
    with torch.no_grad():
        for i in range(len(data)):
            for j in range(draws):
                keeps = train.keep_fractions(train.generator("eval", i, j, "keep"), len(data[i]["refs"]), (0.05, 0.25), 0.1)
                ex = train.training_example(data[i], train.generator("eval", i, j), keeps)
                losses.append(train.flow_matching_loss(model, [ex], False, torch.device("cpu")))
                zero.append((ex["noise"] - ex["x0"]).pow(2).mean())
    return torch.cat(losses).mean().item(), torch.stack(zero).mean().item()


def test_loss_falls(klein, tmp_path):
    """Training from the manifest (cached into OUT/cache first), rank-16 LoRA on every Linear: the loss
    on fixed draws falls well below that of predicting zero, so the model learns the data, not just
    to shrink its random output."""
    root, manifest, _ = klein
    out = tmp_path / "run"
    train.main(["--model", str(root), "--data", str(manifest), "--out", str(out), "--steps", "60", "--lr", "5e-3",
                "--rank", "16", "--targets", "*", "--warmup", "5", "--batch-size", "2", "--save-every", "30"])  # fmt: skip
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 61))
    data = CachedDataset(str(out / "cache"))
    before, zero = eval_loss(Flux2.from_pretrained(str(root)), data)
    trained = Flux2.from_pretrained(str(root))
    lora.load_lora(trained, str(out))
    after, _ = eval_loss(trained, data)
    curve = [round(sum(r["loss"] for r in log[i : i + 10]) / 10, 3) for i in range(0, 60, 10)]
    print(f"\ntraining loss, means of 10 steps: {curve}")
    print(f"fixed draws: {before:.3f} -> {after:.3f} (zero velocity: {zero:.3f})")
    assert after < 0.5 * zero < before


def run_args(root, data, out, *extra):
    return ["--model", str(root), "--data", str(data), "--out", str(out), "--lr", "2e-3", "--warmup", "2",
            "--keep-all-prob", "0.5", "--save-every", "2", *extra]  # fmt: skip


def lora_of(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["lora"]


def test_resume_equals_uninterrupted(klein, tmp_path, monkeypatch, capsys):
    """A run killed in step 5 (after the checkpoint of step 4) and resumed equals an uninterrupted run."""
    root, _, cache = klein
    args = ["--steps", "6", "--kv", "--grad-accum", "2", "--rank", "2", "--alpha", "3"]
    train.main(run_args(root, cache, tmp_path / "a", *args))
    calls = []

    def crash_in_step_5(examples, size):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return train_forward_groups(examples, size)

    train_forward_groups = train.forward_groups
    monkeypatch.setattr(train, "forward_groups", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(root, cache, tmp_path / "b", *args))
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(run_args(root, cache, tmp_path / "b", *args))
    assert "already holds a run" in error_line(e, capsys)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(root, cache, tmp_path / "b", *args[:-4], "--resume"))
    assert "rank 2 -> 4" in error_line(e, capsys)
    train.main(run_args(root, cache, tmp_path / "b", *args, "--resume"))
    a, b = lora_of(tmp_path / "a"), lora_of(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_B"))


def test_torchrun_equals_one_process(klein, tmp_path, monkeypatch):
    """torchrun: 2 processes x batch 1 (gloo, gradient checkpointing), given the manifest (process 0
    caches it while the other waits), take the same global batches and draws as 1 process x 2 examples; 7 examples in batches of 2, so step 4 is a batch of one (process 1
    has none) and step 5 starts a new epoch. With one example per forward in both, the summed
    gradient is the same float sum (a + b), so the LoRA is bitwise equal; stacking the two examples
    into one forward (batch 2) changes only rounding: losses and gradient norms agree to 1e-6.
    Both runs validate (train_extras: the processes share the forwards and sum their losses) and draw
    previews (process 0 alone, the other waiting): the validation losses and the sheets are bitwise equal."""
    root, manifest, cache = klein
    (tmp_path / "previews.jsonl").write_text(json.dumps(dict(prompt="invert the colours", references=[str(root / "data" / "img" / "ref3.png")])) + "\n")
    extras = ["--val-data", str(cache), "--val-every", "2", "--sample-file", str(tmp_path / "previews.jsonl"), "--sample-every", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = run_args(root, manifest, tmp_path / "two", "--steps", "5", "--gradient-checkpointing", *extras)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "train.py"), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert CachedDataset(str(tmp_path / "two" / "cache")).index == CachedDataset(str(cache)).index
    train.main(run_args(root, cache, tmp_path / "accum", "--steps", "5", "--grad-accum", "2", *extras))
    sizes, loss = [], train.flow_matching_loss
    monkeypatch.setattr(train, "flow_matching_loss", lambda model, group, *a: sizes.append(len(group)) or loss(model, group, *a))
    train.main(run_args(root, cache, tmp_path / "stacked", "--steps", "5", "--batch-size", "2"))
    assert 2 in sizes  # two examples share a forward, padded and masked when their kept counts differ
    two, accum, stacked = (lora_of(tmp_path / d) for d in ("two", "accum", "stacked"))
    assert all(torch.equal(two[k], accum[k]) for k in two)
    untimed = lambda r: {k: v for k, v in r.items() if not k.endswith("_seconds")}  # noqa: E731
    logs = {d: [untimed(json.loads(line)) for line in open(tmp_path / d / "log.jsonl")] for d in ("two", "accum", "stacked")}
    assert logs["two"] == logs["accum"]
    assert [r["step"] for r in logs["two"] if "val_dense" in r] == [0, 2, 4, 5]
    print("\nvalidation losses, torchrun x2 = one process:", [(r["step"], round(r["val_dense"], 6), round(r["val_sparse"], 6)) for r in logs["two"] if "val_dense" in r])
    sheets = sorted(os.listdir(tmp_path / "two" / "samples"))
    assert sheets == ["step_000000.png", "step_000004.png", "step_000005.png"] == sorted(os.listdir(tmp_path / "accum" / "samples"))
    assert all((tmp_path / "two" / "samples" / n).read_bytes() == (tmp_path / "accum" / "samples" / n).read_bytes() for n in sheets)
    for key in ("loss", "grad_norm"):
        a, b = (np.array([r[key] for r in logs[d] if "loss" in r]) for d in ("two", "stacked"))
        print(f"\ntorchrun x2 vs one process, one forward of 2: {key} max rel diff {np.abs(a / b - 1).max():.1e}")
        assert np.allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kv", [False, True])
def test_training_forwards_take_no_mask(klein, tmp_path, monkeypatch, kv):
    """A run of two examples per forward under sdpa_kernel(MATH), with an SDPA that fails on any mask:
    examples of one step share their keep fractions, so those of equal grids share a forward unpadded."""
    root, _, cache = klein
    sdpa, calls, sizes, loss = F.scaled_dot_product_attention, [], [], train.flow_matching_loss

    def maskless(q, k, v, attn_mask=None, **kw):
        assert attn_mask is None, "a training forward passed an attention mask"
        calls.append(q.shape[0])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", maskless)
    monkeypatch.setattr(train, "flow_matching_loss", lambda model, group, *a: sizes.append(len(group)) or loss(model, group, *a))
    with sdpa_kernel(SDPBackend.MATH):
        train.main(run_args(root, cache, tmp_path / "run", "--steps", "4", "--batch-size", "2", *(["--kv"] if kv else [])))
    assert 2 in sizes and 2 in calls  # a forward of two examples, through the wrapper
    assert len(lora_of(tmp_path / "run")) > 0


@pytest.mark.compile
def test_compiled_training_step_equals_eager(klein, tmp_path, monkeypatch):
    """train.py --compile: the transformer compiled fullgraph with dynamic shapes; two steps whose
    examples kept different counts give eager's losses and LoRA gradients (1e-5) from one graph. The
    graph is captured and differentiated for real (Dynamo, AOT autograd); Inductor's code generation
    for the backward takes minutes on a CPU, so this test runs the graph with backend aot_eager."""
    from torch._dynamo.utils import counters

    root, _, cache = klein
    calls, models, compile, loss = [], [], Flux2.compile, train.flow_matching_loss

    class Built(Exception):
        pass

    def built(model, *a):
        models.append(model)
        raise Built

    monkeypatch.setattr(Flux2, "compile", lambda self, **kw: calls.append(kw) or compile(self, backend="aot_eager", **kw))
    monkeypatch.setattr(train, "flow_matching_loss", built)
    with pytest.raises(Built):  # the model train.py builds, compiled as train.py compiles it
        train.main(run_args(root, cache, tmp_path / "run", "--steps", "1", "--compile", "--rank", "2"))
    assert calls == [dict(fullgraph=True, dynamic=True)]
    compiled = models[0]
    eager = Flux2.from_pretrained(str(root)).requires_grad_(False)
    lora.inject(eager, lora.DEFAULT_TARGETS, 2, None, 0)
    eager.load_state_dict(compiled.state_dict())
    data = CachedDataset(str(cache))
    torch._dynamo.reset()
    counters.clear()
    for step, keep in ((0, [0.2]), (1, [0.5])):  # 3 and 8 tokens (duck sizing would tie a count equal to B to B)
        examples = [train.training_example(data[i], train.generator(0, step, i), keep) for i in (2, 4)]  # equal grids
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            losses = loss(model, examples, True, torch.device("cpu"))
            losses.sum().backward()
            results.append((losses.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
        (want, want_grad), (got, got_grad) = results  # lora_A's gradients are 0 while lora_B is: one scale for all
        assert rel_err(got, want) < 1e-5 and rel_err(got_grad, want_grad) < 1e-5 and want_grad.abs().max() > 0
    assert counters["stats"]["unique_graphs"] == 1


def test_cli_summaries(klein, tmp_path, capsys):
    """data.py ends with a summary line; train.py shows the loss in its progress bar and ends by naming
    the LoRA file."""
    root, manifest, cache = klein
    data.main([str(manifest), "--model", str(root), "--out", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == f"cached 7 examples in {tmp_path / 'cache'}: 7 encoded, 0 already cached, 0 skipped (0 bad manifest lines, 0 whose images failed to load); 2 distinct prompts"
    data.main([str(manifest), "--model", str(root), "--out", str(tmp_path / "cache")])
    assert "0 encoded, 7 already cached" in capsys.readouterr().out
    train.main(["--model", str(root), "--data", str(cache), "--out", str(tmp_path / "run"), "--steps", "2"])
    out = capsys.readouterr()
    assert "loss=" in out.err
    assert out.out.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 'run' / 'pytorch_lora_weights.safetensors'} (step 2")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_cli_trains_over_an_8bit_base(klein, tmp_path, monkeypatch, kind):
    """train.py --weights: the model it trains has 8-bit block Linears, still 8-bit and unchanged after
    the run; the LoRA it writes loads."""
    root, _, cache = klein
    models = []
    load = quant.from_pretrained
    monkeypatch.setattr(quant, "from_pretrained", lambda *a, **k: models.append(load(*a, **k)) or models[-1])
    fresh = quant.from_pretrained(str(root), kind)
    train.main(run_args(root, cache, tmp_path / "run", "--steps", "2", "--weights", kind))
    trained = models[-1]
    eight = {n: m for n, m in trained.named_modules() if getattr(m, "weight_scale", None) is not None}
    assert len(eight) == 8 * trained.cfg.depth + 2 * trained.cfg.depth_single
    assert all(isinstance(m, lora.LoRALinear) for n, m in eight.items() if n.endswith("img_attn.qkv"))
    before = fresh.state_dict()
    for n, m in eight.items():
        assert m.weight.dtype == FORMATS[kind][0] and torch.equal(m.weight.view(torch.uint8), before[f"{n}.weight"].view(torch.uint8))
    assert lora.load_lora(quant.from_pretrained(str(root), kind), str(tmp_path / "run"))
