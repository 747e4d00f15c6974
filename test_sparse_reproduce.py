"""reproduce.py's machinery (never its research outcome): the split, the fine-tunes, the evaluation, --quick."""

import json
import math

import pytest
import torch
from PIL import Image

import reproduce as R
from model import Flux2
from train import flow_matching_loss, generator, training_example


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    R.main(["--quick", "--ignore-gate", "--work", str(root / "work"), "--report", str(root / "report")])
    return root


def test_training_examples_come_only_from_training_photographs(monkeypatch):
    # Every photograph is one flat colour of its own: any pixel of a training reference must be a
    # training photograph's colour (crops, blur, flips and pasting of flat images keep colours exact).
    names = [n for split in ("train", "val", "test") for n in R.PHOTOS[split]]
    value = {n: (i + 1) / (len(names) + 1) for i, n in enumerate(names)}
    monkeypatch.setattr(R, "photo", lambda n: torch.full((3, 300, 400), value[n]))
    allowed = torch.tensor([value[n] for n in R.PHOTOS["train"]])
    assert not set(R.PHOTOS["train"]) & (set(R.PHOTOS["test"]) | set(R.PHOTOS["val"]))
    for ex in R.make_split("train", 6, seed=0):
        for ref in ex["refs"]:
            seen = ref.unique()
            assert torch.isclose(seen[:, None], allowed[None], atol=1e-6).any(1).all(), ex["task"]


def test_quick_run_writes_every_table_and_figure(quick_run):
    report = (quick_run / "report" / "REPRODUCTION.md").read_text()
    for k in range(1, 5):
        assert f"**Claim {k}: " in report
    for task in R.TASKS:
        assert f"### {task}" in report and f"SSIM ({task})" in report
    assert report.startswith("# Reproduction") and "The dense base failed the competence gate" in report.split("- date")[0]
    for name in ("quality_vs_keep", "quality_vs_speed", "lora_loss", "grid_edit", "grid_subject", "grid_multi"):
        path = quick_run / "report" / "reproduction" / f"{name}.png"
        assert f"reproduction/{name}.png" in report
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    results = json.loads((quick_run / "report" / "reproduction" / "results.json").read_text())
    models = {key.split("|")[0] for key in results["summary"]}
    assert models == {"base", "control", "drop", "drop-mix", "base-kv", "drop-kv", "fill"}
    assert all(math.isfinite(m[0]) for v in results["summary"].values() for m in v.values())
    assert {(r["refs"], r["kv"]) for r in results["speed"]} == {(3, False), (3, True), (6, False), (6, True)}
    # the model-aware selectors ran on exactly the models they are for, at every keep below 1
    for sel, names in R.MODEL_AWARE.items():
        scored = {tuple(key.split("|")[:2]) for key in results["summary"] if key.split("|")[2] == sel}
        assert scored == {(n, t) for n in names for t in R.TASKS}, sel


def test_topi_calibration_is_saved_once_and_is_the_best_of_its_table(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Flux2(R.base_config(R.SETTINGS["quick"]))
    val = R.make_split("val", 2, 4321)
    path = tmp_path / "topi.json"
    got = R.calibrate_topi(model, val, str(path), 4)
    table = json.loads(path.read_text())["table"]
    assert len({row["sigma"] for row in table}) == 2  # steps 0 and 2 of 4
    best = max(table, key=lambda r: r["spearman"])
    assert (got["block"], got["queries"], got["sigma"]) == (best["block"], best["queries"], best["sigma"])
    import calibrate

    monkeypatch.setattr(calibrate, "calibrate_attention", lambda *a, **k: pytest.fail("recalibrated"))
    assert R.calibrate_topi(model, val, str(path), 4) == got  # reused from the file


def test_training_cache_holds_only_training_photographs(quick_run):
    index = json.loads((quick_run / "work" / "train-cache" / "index.json").read_text())
    assert index and all(set(e["photos"]) <= set(R.PHOTOS["train"]) for e in index)


def test_fine_tunes_differ_only_in_their_keep_settings(quick_run):
    runs = {}
    for name in R.TUNES:
        state = torch.load(quick_run / "work" / "runs" / name / "checkpoint.pt", weights_only=True)
        runs[name] = state["run"]
    keep = {"keep_range", "keep_all_prob", "kv"}
    for name, run in runs.items():
        assert {k: v for k, v in run.items() if k not in keep} == {k: v for k, v in runs["drop"].items() if k not in keep}
    assert runs["control"]["keep_range"] == [1.0, 1.0] and runs["control"]["keep_all_prob"] == 0
    assert runs["drop"]["keep_range"] == [0.05, 0.25] and not runs["drop"]["kv"]
    assert runs["drop-kv"]["kv"] and runs["drop-kv"]["keep_range"] == runs["drop"]["keep_range"]


def test_evaluation_of_a_model_on_its_training_example_beats_noise():
    # Overfit a tiny model on one example; evaluate() must score it well against that example's
    # true target and badly against the same example with a noise target.
    torch.manual_seed(0)
    ex = R.make_split("val", 1, seed=7)[0]
    model = Flux2(R.base_config(R.SETTINGS["quick"]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    item = R.as_item(ex)
    for step in range(300):
        opt.zero_grad()
        flow_matching_loss(model, [training_example(item, generator("overfit", step), None)], False, "cpu").mean().backward()
        opt.step()
    model.eval()
    settings = dict(R.SETTINGS["quick"], seeds=1, keeps=(1.0,), sample_steps=8)
    # noise the codec keeps: one random colour per thumbnail pixel (4x4 image pixels)
    noise = torch.rand(3, R.SIZE // 4, R.SIZE // 4, generator=torch.Generator().manual_seed(0))
    noisy = dict(ex, target=noise.repeat_interleave(4, 1).repeat_interleave(4, 2))
    own, _, _ = R.evaluate({"m": model}, [ex], settings)
    on_noise, _, _ = R.evaluate({"m": model}, [noisy], settings)
    key = ("m", "edit", "random", 1.0, 0)
    assert own[key]["psnr"] > on_noise[key]["psnr"] + 3
    assert own[key]["ssim"] > on_noise[key]["ssim"]


def test_a_fine_tune_is_reused_only_for_the_same_base_and_command(tmp_path, monkeypatch):
    settings, out, calls = R.SETTINGS["quick"], tmp_path / "runs" / "drop", []

    def train_py(cmd, **kwargs):  # stands in for the train.py subprocess: a finished run's files
        calls.append(cmd)
        out.mkdir(exist_ok=True)
        torch.save({"step": settings["tune_steps"]}, out / "checkpoint.pt")
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")

    monkeypatch.setattr(R.subprocess, "run", train_py)
    args = ("drop", str(tmp_path / "base.safetensors"), str(tmp_path / "cache"), str(out))
    assert R.fine_tune(*args, settings, 0, 1)[1] == "trained" and "--resume" not in calls[-1]
    assert R.fine_tune(*args, settings, 0, 1)[1] == "cached" and len(calls) == 1
    torch.save({"step": 1}, out / "checkpoint.pt")  # killed after its first checkpoint
    assert R.fine_tune(*args, settings, 0, 1)[1] == "trained" and calls[-1][-1] == "--resume"
    (out / "old.txt").write_text("from the run on the previous base")
    new_base = dict(settings, base_steps=settings["base_steps"] + 1)
    assert R.fine_tune(*args, new_base, 0, 1)[1] == "trained" and "--resume" not in calls[-1]
    assert not (out / "old.txt").exists() and len(calls) == 3
    assert R.fine_tune(*args, settings, 1, 1)[1] == "trained" and len(calls) == 4  # another seed: another command


def test_the_gate_refuses_an_untrained_base(tmp_path, capsys):
    # 20 steps of a 32-wide model: far below the gate on every prompt, so nothing after it may run.
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as stop:
        R.main(["--quick", "--stage", "base", "--work", str(work)])
    assert "error: the dense base is less than" in str(stop.value)
    for prompt in R.EDITS + R.SUBJECTS:
        assert prompt in capsys.readouterr().out or prompt in str(stop.value)
    with pytest.raises(SystemExit):
        R.main(["--quick", "--work", str(work), "--report", str(tmp_path / "report")])
    assert not (work / "runs").exists() and not (tmp_path / "report").exists()


def test_options_that_cannot_apply_to_the_base_stage_are_errors(tmp_path, capsys):
    for extra in (["--ignore-gate"], ["--split", "val"], ["--report", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as stop:
            R.main(["--quick", "--stage", "base", "--work", str(tmp_path / "w"), *extra])
        assert stop.value.code == 2 and f"error: {extra[0]}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_fill_matches_a_hand_built_fill():
    # 3x3 tokens of one channel, values 0..8. Aligned (an edit): kept corners 0 and 8; every token takes
    # the nearer one (on a tie the one feeding the first target token).
    target = torch.arange(9.0).view(1, 3, 3)
    aligned = torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(9)], 1)
    got = R.nearest_fill(target, aligned, [torch.tensor([0, 8])])
    assert got.view(3, 3).tolist() == [[0, 0, 0], [0, 0, 8], [0, 8, 8]]
    # Not aligned: the middle row is made from the top row of the reference, mirrored; the rest
    # needs no reference (grey background) and stays exact.
    src = torch.full((9, 2), -1)
    src[3:6, 0], src[3:6, 1] = 0, torch.tensor([2, 1, 0])
    got = R.nearest_fill(target, src, [torch.tensor([1])])  # reference token 1 feeds target token 4
    assert got.view(3, 3).tolist() == [[0, 1, 2], [4, 4, 4], [6, 7, 8]]
    got = R.nearest_fill(target, src, [torch.tensor([0, 2, 5, 7])])  # 5 and 7 lie outside the source
    assert got.view(3, 3).tolist() == [[0, 1, 2], [3, 3, 5], [6, 7, 8]]  # token 4: a tie, the first target token
    assert R.nearest_fill(target, src, [torch.tensor([4])]).view(3, 3)[1].tolist() == [0, 0, 0]  # nothing kept: grey


def test_the_source_map_says_where_every_target_token_comes_from():
    # Subject and multi targets are copies of reference tokens (mirrored in one prompt): the map must
    # point at tokens equal to the target's, thumbnail for thumbnail.
    for ex in R.make_split("val", 4, seed=3):
        if ex["task"] == "edit":
            continue
        item = R.as_item(ex)
        target = item["target"].flatten(1).T
        for k, ref in enumerate(item["refs"]):
            mine = (ex["src"][:, 0] == k).nonzero()[:, 0]
            tokens = ref.flatten(1).T[ex["src"][mine, 1]]
            if ex["prompt"] == R.SUBJECTS[1]:
                tokens = tokens.view(-1, 3, R.THUMB, R.THUMB).flip(-1).flatten(1)
            assert len(mine) and torch.allclose(tokens, target[mine], atol=1e-5), (ex["prompt"], k)
        assert (ex["src"][:, 0] < 0).sum() == (48 if ex["task"] == "subject" else 0)


def test_every_fine_tune_logged_its_loss_curve(quick_run):
    for name in R.TUNES:
        log = (quick_run / "work" / "runs" / name / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == list(range(1, R.SETTINGS["quick"]["tune_steps"] + 1))


def test_the_share_of_the_gap_is_per_seed_and_undefined_without_a_gap():
    res = {("drop", "edit", "canny", 0.1, 0): {"psnr": 12.0}, ("control", "edit", "canny", 0.1, 0): {"psnr": 10.0},
           ("drop", "edit", "canny", 0.1, 1): {"psnr": 11.0}, ("control", "edit", "canny", 0.1, 1): {"psnr": 11.0}}  # fmt: skip
    assert R.gap_shares(res, "edit", "canny", top=14.0) == [0.5, 0.0]  # (12 - 10) / (14 - 10), (11 - 11) / (14 - 11)
    assert R.gap_shares(res, "edit", "canny", top=11.05) is None  # seed 1's control is at the ceiling: no gap


def test_the_report_names_every_test_prompt_below_the_margin_and_only_those():
    gates = {"val": {R.EDITS[0]: (40.0, 10.0)}, "test": {R.EDITS[0]: (19.9, 10.0), R.EDITS[1]: (20.0, 10.0), R.MULTI: (5.0, 10.0)}}
    (line, _) = R.gate_shortfalls(gates)
    assert R.EDITS[0] in line and R.MULTI in line and R.EDITS[1] not in line and "outlines are" not in line
    assert R.gate_shortfalls({"val": gates["val"]}) == [] and R.gate_shortfalls({"test": {R.EDITS[1]: (20.0, 10.0)}}) == []
