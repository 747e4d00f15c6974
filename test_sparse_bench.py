"""bench.py: the smoke run reports every point; the FLOP ideal counts exactly the work done."""

import os
import subprocess
import sys

import torch
import torch.nn as nn

from bench import HEADER, KEEPS, REFS, bench_config, forward_flops, kept, loop_flops
from model import Flux2, Flux2Config


def test_quick_run_reports_every_point(tmp_path):
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    cmd = [sys.executable, "bench.py", "--quick", "--out-md", str(md), "--out-png", str(png)]
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    text = md.read_text()
    assert HEADER in text and png.stat().st_size > 0
    for refs in REFS:
        for keep in KEEPS:
            for cache in ("none", "kv"):  # --quick: 4x4 = 16 tokens per reference
                assert f"| {refs} | {keep:g} | {refs * max(1, round(keep * 16))} | {cache} |" in text
    assert "ours / diffusers" in text


def test_flop_ideal_is_exact():
    """Count every Linear of a real (meta) model times the tokens it sees, plus 4 D per query-key pair."""
    cfg = Flux2Config(in_channels=2, hidden_size=4, num_heads=1, axes_dim=(1, 1, 1, 1), depth=2, depth_single=3,
                      context_dim=3, mlp_ratio=2.0, time_dim=6)  # fmt: skip
    n_txt, n_img, n_ref = 5, 7, 11
    L, D, blocks = n_txt + n_img + n_ref, cfg.hidden_size, cfg.depth + cfg.depth_single
    with torch.device("meta"):
        model = Flux2(cfg)

    def tokens(name):
        if name.startswith(("time_in", "double_stream_mod", "single_stream_mod", "final_layer.adaLN")):
            return 1  # per-sample vectors
        if name == "final_layer.linear":
            return n_img
        if name == "txt_in" or ".txt_" in name:
            return n_txt
        if name == "img_in" or ".img_" in name:
            return n_img + n_ref
        assert name.startswith("single_blocks"), name
        return L

    linear = sum(2 * m.in_features * m.out_features * tokens(n) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    full = linear + blocks * 4 * D * L * L
    assert forward_flops(cfg, n_txt, n_img, n_ref) == full

    # Cached step: references do not run, text and target queries see n_ref more keys.
    cached = forward_flops(cfg, n_txt, n_img, 0) + blocks * 4 * D * (n_txt + n_img) * n_ref
    assert forward_flops(cfg, n_txt, n_img, n_ref, "cached") == cached
    # Extract step: reference queries see only reference keys; a second timestep embedding (t = 0)
    # feeds the references' image and single-stream modulations.
    ref_vec = sum(2 * p.numel() for n, p in model.named_parameters()
                  if n.startswith(("time_in", "double_stream_modulation_img", "single_stream_modulation")))  # fmt: skip
    extract = full - blocks * 4 * D * n_ref * (n_txt + n_img) + ref_vec
    assert forward_flops(cfg, n_txt, n_img, n_ref, "extract") == extract

    # The ideal speedup of the bench config: 1 at keep 1, growing as keep shrinks, more with the cache.
    cfg = bench_config()
    dense = loop_flops(cfg, 512, 1024, 6 * 1024, kv=False)
    ideal = [dense / loop_flops(cfg, 512, 1024, 6 * kept(1024, k), kv=False) for k in KEEPS]
    ideal_kv = [dense / loop_flops(cfg, 512, 1024, 6 * kept(1024, k), kv=True) for k in KEEPS]
    assert ideal[0] == 1.0 and all(a < b for a, b in zip(ideal, ideal[1:]))
    assert all(a < b for a, b in zip(ideal_kv, ideal_kv[1:])) and all(k > n for k, n in zip(ideal_kv, ideal))
