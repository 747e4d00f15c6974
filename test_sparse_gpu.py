"""gpu_check.py: the whole command on this CPU at its tiny shapes (every path a GPU run takes, so it cannot
rot), a broken check making it fail by name, a part over the budget skipped, and its bad options."""

import os
import subprocess
import sys

import pytest
import torch

import gpu_check
import model
from gpu_check import COMPILED_POINTS, KEEPS, REFS
from klein import n_keep

HERE = os.path.dirname(os.path.abspath(__file__))
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def test_smoke_run_writes_every_section(tmp_path):
    """`python gpu_check.py --out X` on a CPU: tiny shapes, exit 0, every check passed, every speed point
    (next to its FLOP ideal and its memory plan), klein-9B's stand-in with 8-bit weights, the compiled
    points at three graphs each; nothing written but X."""
    out = tmp_path / "GPU.md"
    cmd = [sys.executable, os.path.join(HERE, "gpu_check.py"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GPU.md"]
    text = out.read_text()
    for heading in ("# GPU check", "## Checks", "## Speed: ", "## Memory: ", "## Compiled: "):
        assert heading in text, heading
    assert "- verdict: all " in text and "FAILED" not in text and "torch " in text and "TF32" in text
    checks = [line for line in text.splitlines() if line.startswith("| ") and "| ok |" in line]
    for name in ("sdpa_lse output, bf16", "cached_attention (one cache shared by the batch)", "Linear8 int8", "Linear8 fp8",
                 "KV cache = the KV pattern", "torch.compile (cli.compiled, Inductor) = eager"):  # fmt: skip
        assert any(name in line for line in checks), name
    assert any("flash_attention_for_cpu" in line for line in checks)  # the kernel that ran is named
    side_tokens = (gpu_check.shapes(True).size // 16) ** 2
    for refs in REFS:
        for keep in KEEPS:
            for cache in ("none", "kv"):
                row = next(line for line in text.splitlines() if line.startswith(f"| {refs} | {keep:g} | {refs * n_keep(keep, side_tokens)} | {cache} |"))
                measured, planned, ratio = row.split("|")[-4:-1]
                assert float(measured) > 0 and float(planned) > 0 and 0.5 < float(ratio) < 2, row  # the plan is near the profiler's peak
    memory = text.split("## Memory: ")[1].split("## ")[0]
    assert memory.count("\n| ") == 6 and "training in all" in memory  # header and 5 rows
    compiled = text.split("## Compiled: ")[1]
    for refs, keep in COMPILED_POINTS:
        for cache in ("none", "kv"):
            assert f"| {refs} | {keep:g} | {cache} | 3, " in compiled  # a step, an extract and a cached graph, shared by loop and step


def test_broken_check_fails_by_name(tmp_path, monkeypatch, capsys):
    """cached_attention returning wrong values: the attention and KV-cache checks fail and are named, the
    others pass, status 1; a section that raises is a failing check; --budget 1 skips every timed part
    and says so. GPU.md is written all the same."""
    real = model.cached_attention
    monkeypatch.setattr(model, "cached_attention", lambda *a: real(*a) * 1.1)

    def boom(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "nine_b_section", boom)
    out = tmp_path / "GPU.md"
    with pytest.raises(SystemExit) as exit:
        gpu_check.main(["--budget", "1", "--out", str(out)])
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "cached_attention (a cache per image)" in err and "KV cache = the KV pattern" in err
    assert "memory section: raised RuntimeError: boom" in err and "Linear8" not in err and "sdpa_lse" not in err
    text = out.read_text()
    assert "- verdict: FAILED: " in text and text.count("**FAILED**") == err.count(";") + 1
    assert all(f"{refs} references: skipped: " in text for refs in REFS) and "--budget 1 s left" in text


@pytest.mark.parametrize("args,message", [
    (["--rounds", "0"], "--rounds"), (["--rounds", "x"], "--rounds"), (["--budget", "0"], "--budget"),
    (["--device", "bogus"], "--device"), (["--out", "{d}/x.txt"], "x.txt"), (["--out", "{d}/nowhere/x.md"], "nowhere"),
    (["--out", "{d}/folder.md"], "folder.md"), (["--bogus"], "--bogus"),
    *([(["--device", "cuda"], "--device")] if not torch.cuda.is_available() else []),
])  # fmt: skip
def test_bad_options(tmp_path, capsys, monkeypatch, args, message):
    """One `error:` line naming the option, status 1, nothing written, before anything is built."""
    monkeypatch.setattr(gpu_check, "run_checks", lambda *a: pytest.fail("the checks started"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.md").mkdir()
    with pytest.raises(SystemExit) as exit:
        gpu_check.main([a.format(d=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["folder.md"]
