"""bench.py and its sections (bench_measure, bench_per_image, bench_attention, --many-refs): the smoke run
reports every point; the FLOP ideal counts exactly the work done."""

import os
import subprocess
import sys

import torch
import torch.nn as nn

import pytest

import bench
import bench_attention
import bench_measure
import bench_per_image
import lora
from bench import HEADER, KEEPS, REFS
from bench_measure import bench_config, forward_flops, loop_flops
from bench_per_image import PER_IMAGE, PER_IMAGE_HEADING
from model import Flux2, Flux2Config
from klein import n_keep


HERE = os.path.dirname(os.path.abspath(__file__))
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def test_quick_run_reports_every_point(tmp_path):
    """--quick writes bench-quick/ (never the committed report) and prints no profiler noise."""
    cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--quick"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    md, png = tmp_path / "bench-quick" / "BENCHMARKS.md", tmp_path / "bench-quick" / "benchmarks.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-quick"]
    assert "USDT" not in done.stdout + done.stderr and "profiler" not in done.stdout + done.stderr
    assert "unavailable" not in done.stdout  # the memory measurement ran
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
    ideal = [dense / loop_flops(cfg, 512, 1024, 6 * n_keep(k, 1024), kv=False) for k in KEEPS]
    ideal_kv = [dense / loop_flops(cfg, 512, 1024, 6 * n_keep(k, 1024), kv=True) for k in KEEPS]
    assert ideal[0] == 1.0 and all(a < b for a, b in zip(ideal, ideal[1:]))
    assert all(a < b for a, b in zip(ideal_kv, ideal_kv[1:])) and all(k > n for k, n in zip(ideal_kv, ideal))


def test_quick_per_image_section_replaces_its_own(tmp_path):
    """--per-image writes only its section into an existing report: the rest stays, an old section goes."""
    md = tmp_path / "report.md"
    md.write_text(f"# Report\n\nintro\n\n{PER_IMAGE_HEADING}\n\nold numbers\n\n## Other\n\nkeep me\n")
    cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--quick", "--per-image", "--out-md", str(md)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    text = md.read_text()
    assert text.startswith("# Report\n\nintro\n\n## Other\n\nkeep me\n") and "old numbers" not in text
    assert text.count(PER_IMAGE_HEADING) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    for n, (prompts, seeds) in PER_IMAGE.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {n} | {prompts} x {seeds} |"))
        assert all(float(v) > 0 for v in row.split("|")[3:7]), row  # ours dense, ours sparse + KV, floor, diffusers
    diff = float(text.split("max rel. difference ")[1].split(")")[0])
    assert diff < 1e-4  # ours with every reference token + KV computes what diffusers' KV loop computes


def test_end_to_end_per_image_times_every_run(monkeypatch):
    """The end-to-end part of --per-image (tiny pipeline from disk: ours dense, ours keep 0.1 + KV,
    diffusers' KV pipeline) times every N it is given, each round logged."""
    monkeypatch.setattr(bench_per_image, "PER_IMAGE", {1: (1, 1), 2: (1, 2)})
    logged = []
    rows = bench_per_image.end_to_end_per_image(2, logged.append)
    assert [(r["n"], r["prompts"], r["seeds"]) for r in rows] == [(1, 1, 1), (2, 1, 2)]
    for r in rows:
        assert all(0 < r[w] < 60 for w in ("dense", "sparse_kv", "diffusers_kv")), r
    assert logged == ["  end to end: round 1/2 done", "  end to end: round 2/2 done"]


@pytest.mark.parametrize("args,message", [
    (["--refs", "0"], "--refs"), (["--rounds", "0"], "--rounds"), (["--threads", "0"], "--threads"),
    (["--size", "100"], "--size"), (["--size", "0"], "--size"), (["--text-tokens", "0"], "--text-tokens"),
    (["--device", "bogus"], "--device"), (["--out-md", "{d}/x.txt"], "x.txt"), (["--out-png", "{d}/x.md"], "x.md"),
    (["--quick", "--config", "klein-4b"], "--config"), (["--per-image", "--refs", "2"], "--refs"),
    (["--rounds", "x"], "--rounds"), (["--out-md", "{d}/folder.md"], "folder.md"),
    (["--quick", "--rounds", "-1"], "--rounds"), (["--quick", "--size", "128"], "--size"), (["--rounds", "-1"], "--rounds"),
    (["--memory", "--refs", "2"], "--refs"), (["--memory", "--config", "klein-4b"], "--config"),
    (["--memory", "--per-image"], "--per-image"), (["--memory", "--out-png", "{d}/x.png"], "--out-png"),
    (["--attention-cost", "--per-image"], "--attention-cost"), (["--attention-cost", "--refs", "2"], "--refs"),
    (["--many-refs", "--refs", "2"], "--refs"), (["--many-refs", "--per-image"], "--many-refs"),
    (["--many-refs", "--out-png", "{d}/x.png"], "--out-png"),
])  # fmt: skip
def test_bad_options(tmp_path, capsys, monkeypatch, args, message):
    """One `error:` line naming the option, a non-zero exit, nothing written, before any model is built."""
    monkeypatch.setattr(bench, "build_model", lambda *a: pytest.fail("the benchmark started"))
    (tmp_path / "folder.md").mkdir()
    with pytest.raises(SystemExit) as exit:
        bench.main([a.format(d=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code != 0 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["folder.md"]


@pytest.mark.parametrize("kv_pattern", [False, True])
def test_memory_plan_equals_measured_peak(kv_pattern):
    """The plan from shapes (meta device) is within 20% of the profiler's measured peak of the same step
    on the CPU: sampling with the KV cache, LoRA training with and without gradient checkpointing."""
    from memory_plan import activation_peak

    cfg = Flux2Config(in_channels=16, hidden_size=128, num_heads=2, depth=1, depth_single=2, context_dim=32, axes_dim=(16, 16, 16, 16))
    cases = [dict(kv=True)] if not kv_pattern else [dict(train=True, kv=True), dict(train=True, kv=True, checkpointing=True)]
    for kw in cases + ([dict(train=True), dict(train=True, checkpointing=True)] if not kv_pattern else []):
        planned = activation_peak(cfg, 8, 64, 96, rank=4, dtype=torch.float32, **kw)
        measured = bench_measure.peak_bytes(activation_peak(cfg, 8, 64, 96, rank=4, device="cpu", dtype=torch.float32, **kw), torch.device("cpu"))
        assert abs(planned - measured) <= 0.2 * measured, (kw, planned, measured)


def test_memory_plan_weights_and_cache():
    """Weight bytes from the meta model: klein-4B's 3.88B parameters in bf16, 8-bit at most 0.55x of it;
    the cache is 2 (K, V) x blocks x tokens x hidden bf16 values, as the model stores it."""
    from memory_plan import kv_cache_bytes, weight_bytes
    from model import KVCache

    cfg = Flux2Config.from_name("klein-4b")
    with torch.device("meta"):
        assert weight_bytes(cfg, 16) == 2 * sum(p.numel() for p in Flux2(cfg).parameters())
    assert weight_bytes(cfg, 8) <= 0.55 * weight_bytes(cfg, 16)
    with torch.device("meta"):
        model = Flux2(cfg).requires_grad_(False)
    lora.inject(model, rank=16)
    assert weight_bytes(cfg, 16, rank=16) - weight_bytes(cfg, 16) == 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    tiny = Flux2Config(in_channels=16, hidden_size=64, num_heads=2, depth=1, depth_single=2, context_dim=32, axes_dim=(8, 8, 8, 8))
    model = Flux2(tiny).bfloat16()
    cache = KVCache()
    g = torch.Generator().manual_seed(0)
    img, txt, ref = (torch.randn(1, n, c, generator=g).bfloat16() for n, c in ((16, 16), (8, 32), (20, 16)))
    ids = torch.zeros(16, 4, dtype=torch.long)
    with torch.no_grad():
        model(img, ids, txt, torch.zeros(8, 4, dtype=torch.long), torch.tensor([0.5]).bfloat16(), ref=ref,
              ref_ids=torch.zeros(20, 4, dtype=torch.long), kv_cache=cache)  # fmt: skip
    held = sum(t.numel() * t.element_size() for kv in cache.kv for t in kv)
    assert kv_cache_bytes(tiny, 20) == held


def test_attention_cost_quick_writes_its_section(tmp_path):
    """--attention-cost --quick: one section, every row measured and next to its FLOP ideal."""
    md = tmp_path / "B.md"
    md.write_text("# Sparse Context benchmark\n\n## Another section\n\nkept\n")
    bench.main(["--attention-cost", "--quick", "--out-md", str(md)])
    text = md.read_text()
    assert "## Another section\n\nkept" in text and text.count(bench_attention.ATTENTION_HEADING) == 1
    rows = [line for line in text.splitlines() if line.startswith("| scoring") or line.startswith("| speedup")]
    assert len(rows) == 4 and all(float(r.split("|")[3].strip().rstrip("x")) > 0 for r in rows)


def test_quick_many_refs_section(tmp_path):
    """--many-refs --quick: its own section, every point of 4 and 16 references, and the published speedups
    beside the FLOP ideal of the same tokens at klein-9B's shapes (bench_measure.loop_flops)."""
    md = tmp_path / "B.md"
    md.write_text("# Sparse Context benchmark\n\n## Another section\n\nkept\n")
    bench.main(["--many-refs", "--quick", "--out-md", str(md)])
    text = md.read_text()
    assert "## Another section\n\nkept" in text and text.count(bench.MANY_HEADING) == 1
    for refs in bench.MANY_REFS:
        for keep in bench.MANY_KEEPS:
            for cache in ("none", "kv"):
                assert f"| {refs} | {keep:g} | {refs * n_keep(keep, 16)} | {cache} |" in text
    k9 = Flux2Config.from_name("klein-9b")
    ideal = lambda refs, keep, kv, steps: (loop_flops(k9, 512, 4096, refs * 4096, False, steps)
                                           / loop_flops(k9, 512, 4096, refs * n_keep(keep, 4096), kv, steps))  # fmt: skip
    assert "| 4 | 14.2x | " in text and f"keep 1/16 (the same 256 tokens a reference): {ideal(16, 1 / 16, False, 4):.1f}x" in text
    assert "| 50 | 18.3x | " in text and f"+ KV cache: {ideal(16, 1 / 16, True, 50):.1f}x" in text
    assert "| 1.85-2.66x | " in text and f"keep 1 + KV cache: {ideal(4, 1.0, True, 4):.2f}x" in text
    assert "not in this run" not in text  # the measured ratios beside them come from this run


def test_8bit_random_model_is_the_planned_layout():
    """build_model(weights=...) lays out quant.Linear8 blocks as quant.from_pretrained does: the bytes the
    memory plan counts, weights of the 16-bit layers' spread."""
    from memory_plan import weight_bytes
    from quant import Linear8, dequantize

    cfg = Flux2Config(in_channels=16, hidden_size=128, num_heads=2, depth=1, depth_single=2, context_dim=32, axes_dim=(16, 16, 16, 16))
    for kind in ("int8", "fp8"):
        model = bench_measure.build_model(cfg, torch.device("cpu"), torch.bfloat16, weights=kind)
        layers = [m for n, m in model.named_modules() if isinstance(m, Linear8)]
        assert len(layers) == 8 + 2 * 2  # a double block: 2 streams x (qkv, proj, 2 MLP); a single one: linear1, linear2
        assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == weight_bytes(cfg, 8)
        std = dequantize(layers[0].weight, layers[0].weight_scale, torch.float32).std().item()
        assert abs(std * layers[0].in_features**0.5 - 1) < 0.05, (kind, std)
