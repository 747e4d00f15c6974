"""reproduce.py's machinery (never its research outcome): the split, the fine-tunes, the evaluation, --quick;
the study's own coverage-first selection rule (study_eval.select_covered)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import reproduce as R
import study_eval as E
import study_report as P
import study_world as W
import token_selectors as ts
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
    names = [n for split in ("train", "val", "test") for n in W.PHOTOS[split]]
    value = {n: (i + 1) / (len(names) + 1) for i, n in enumerate(names)}
    monkeypatch.setattr(W, "photo", lambda n: torch.full((3, 300, 400), value[n]))
    allowed = torch.tensor([value[n] for n in W.PHOTOS["train"]])
    assert not set(W.PHOTOS["train"]) & (set(W.PHOTOS["test"]) | set(W.PHOTOS["val"]))
    for ex in W.make_split("train", 6, seed=0):
        for ref in ex["refs"]:
            seen = ref.unique()
            assert torch.isclose(seen[:, None], allowed[None], atol=1e-6).any(1).all(), ex["task"]


def test_quick_run_writes_every_table_and_figure(quick_run):
    report = (quick_run / "report" / "REPRODUCTION.md").read_text()
    for k in range(1, 6):
        assert f"**Claim {k}: " in report
    for section in ("## The redundancy check (validation)", "## Beyond the paper: dropping or compact references?",
                    "## What to do about dense quality"):  # fmt: skip
        assert section in report
    for task in W.TASKS:
        assert f"### {task}" in report and f"SSIM ({task})" in report
    assert report.startswith("# Reproduction") and "The dense base failed the competence gate" in report.split("- date")[0]
    for name in ("quality_vs_keep", "quality_vs_speed", "lora_loss", "grid_edit", "grid_subject", "grid_multi"):
        path = quick_run / "report" / "reproduction" / f"{name}.png"
        assert f"reproduction/{name}.png" in report
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    results = json.loads((quick_run / "report" / "reproduction" / "results.json").read_text())
    models = {key.split("|")[0] for key in results["summary"]}
    assert models == {"base", "control", "drop", "drop@0.5", "compact", "base-kv", "drop-kv", "fill"}
    # drop against compact at the same token count, in every task and at every factor
    for task in W.TASKS:
        for f in W.COMPACT:
            b = E.compact_budget(f)
            for key in (("compact", task, f"compact{f}", b), ("drop", task, E.AWARE[task], b), ("base", task, f"compact{f}", b)):
                assert "|".join(map(str, key)) in results["summary"], key
    assert all(math.isfinite(m[0]) for v in results["summary"].values() for m in v.values())
    assert {(r["refs"], r["kv"]) for r in results["speed"]} == {(3, False), (3, True), (6, False), (6, True)}
    # the model-aware selectors ran on exactly the models they are for, at every keep below 1
    for sel, names in E.MODEL_AWARE.items():
        scored = {tuple(key.split("|")[:2]) for key in results["summary"] if key.split("|")[2] == sel}
        assert scored == {(n, t) for n in names for t in W.TASKS}, sel


def test_topi_calibration_is_saved_once_and_is_the_best_of_its_table(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Flux2(R.base_config(R.SETTINGS["quick"]))
    val = W.make_split("val", 2, 4321)
    path = tmp_path / "topi.json"
    got = E.calibrate_topi(model, val, str(path), 4)
    table = json.loads(path.read_text())["table"]
    assert len({row["sigma"] for row in table}) == 2  # steps 0 and 2 of 4
    best = max(table, key=lambda r: r["spearman"])
    assert (got["block"], got["queries"], got["sigma"]) == (best["block"], best["queries"], best["sigma"])
    import calibrate

    monkeypatch.setattr(calibrate, "calibrate_attention", lambda *a, **k: pytest.fail("recalibrated"))
    assert E.calibrate_topi(model, val, str(path), 4) == got  # reused from the file


def test_training_cache_holds_only_training_photographs(quick_run):
    index = json.loads((quick_run / "work" / "train-cache" / "index.json").read_text())
    assert index and all(set(e["photos"]) <= set(W.PHOTOS["train"]) for e in index)


def test_fine_tunes_differ_only_in_their_keep_settings(quick_run):
    runs = {}
    for name in R.TUNES:
        state = torch.load(quick_run / "work" / "runs" / name / "checkpoint.pt", weights_only=True)
        runs[name] = state["run"]
    keep = {"keep_range", "keep_all_prob", "kv", "compact"}
    for name, run in runs.items():
        assert {k: v for k, v in run.items() if k not in keep} == {k: v for k, v in runs["drop"].items() if k not in keep}
    assert runs["control"]["keep_range"] == [1.0, 1.0] and runs["control"]["keep_all_prob"] == 0
    assert runs["drop"]["keep_range"] == [0.05, 0.25] and not runs["drop"]["kv"]
    assert runs["drop-kv"]["kv"] and runs["drop-kv"]["keep_range"] == runs["drop"]["keep_range"]
    assert runs["compact"]["compact"] == list(W.COMPACT) and runs["compact"]["keep_all_prob"] == runs["drop"]["keep_all_prob"]
    assert runs["drop"]["compact"] == []


def test_evaluation_of_a_model_on_its_training_example_beats_noise():
    # Overfit a tiny model on one example; evaluate() must score it well against that example's
    # true target and badly against the same example with a noise target.
    torch.manual_seed(0)
    ex = W.make_split("val", 1, seed=7)[0]
    model = Flux2(R.base_config(R.SETTINGS["quick"]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    item = W.as_item(ex)
    for step in range(300):
        opt.zero_grad()
        flow_matching_loss(model, [training_example(item, generator("overfit", step), None)], False, "cpu").mean().backward()
        opt.step()
    model.eval()
    settings = dict(R.SETTINGS["quick"], seeds=1, keeps=(1.0,), sample_steps=8)
    # noise the codec keeps: one random colour per thumbnail pixel (4x4 image pixels)
    noise = torch.rand(3, W.SIZE // 4, W.SIZE // 4, generator=torch.Generator().manual_seed(0))
    noisy = dict(ex, target=noise.repeat_interleave(4, 1).repeat_interleave(4, 2))
    own, _, _ = E.evaluate({"base": model}, [ex], settings)
    on_noise, _, _ = E.evaluate({"base": model}, [noisy], settings)
    key = ("base", "edit", "random", 1.0, 0)
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
    out = capsys.readouterr().out
    val = W.make_split("val", R.SETTINGS["quick"]["test_per_task"], 4321)  # the prompts --quick's few examples hold
    for prompt in {E.prompt_of(ex) for ex in val}:
        assert prompt in out or prompt in str(stop.value)
    with pytest.raises(SystemExit):
        R.main(["--quick", "--work", str(work), "--report", str(tmp_path / "report")])
    assert not (work / "runs").exists() and not (tmp_path / "report").exists()


def test_options_that_cannot_apply_to_the_base_stage_are_errors(tmp_path, capsys):
    for extra in (["--ignore-gate"], ["--split", "val"], ["--report", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as stop:
            R.main(["--quick", "--stage", "base", "--work", str(tmp_path / "w"), *extra])
        assert stop.value.code == 1 and f"error: {extra[0]}" in capsys.readouterr().err  # one status for every bad value
    assert not any(tmp_path.iterdir())


def test_the_redundancy_check_applies_its_rule():
    # A dense model with no coarse layout at all (0 dB): only the fill's margin over grey decides; one far
    # above any fill (99 dB): no task passes, whatever the fill.
    val = W.make_split("val", 2, 4321)
    low = E.redundancy(val, [(0.0, 0.0, 0.0)] * len(val), 1)
    high = E.redundancy(val, [(0.0, 0.0, 99.0)] * len(val), 1)
    for task in W.TASKS:
        assert low[task]["passed"] == (low[task]["fill"] - low[task]["grey"] >= E.REDUNDANCY_DB[0])
        assert not high[task]["passed"] and high[task]["dense_coarse"] == 99.0
        assert low[task]["fill"] == high[task]["fill"] and low[task]["grey_coarse"] < low[task]["fill_coarse"]


def test_the_fill_matches_a_hand_built_fill():
    # 3x3 tokens of one channel, values 0..8. Aligned (an edit): kept corners 0 and 8; every token takes
    # the nearer one (on a tie the one feeding the first target token).
    target = torch.arange(9.0).view(1, 3, 3)
    aligned = torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(9)], 1)
    got = E.nearest_fill(target, aligned, [torch.tensor([0, 8])])
    assert got.view(3, 3).tolist() == [[0, 0, 0], [0, 0, 8], [0, 8, 8]]
    # Not aligned: the middle row is made from the top row of the reference, mirrored; the rest
    # needs no reference (grey background) and stays exact.
    src = torch.full((9, 2), -1)
    src[3:6, 0], src[3:6, 1] = 0, torch.tensor([2, 1, 0])
    got = E.nearest_fill(target, src, [torch.tensor([1])])  # reference token 1 feeds target token 4
    assert got.view(3, 3).tolist() == [[0, 1, 2], [4, 4, 4], [6, 7, 8]]
    got = E.nearest_fill(target, src, [torch.tensor([0, 2, 5, 7])])  # 5 and 7 lie outside the source
    assert got.view(3, 3).tolist() == [[0, 1, 2], [3, 3, 5], [6, 7, 8]]  # token 4: a tie, the first target token
    assert E.nearest_fill(target, src, [torch.tensor([4])]).view(3, 3)[1].tolist() == [0, 0, 0]  # nothing kept: grey


def test_the_source_map_says_where_every_target_token_comes_from():
    # Subject and multi targets are copies of reference tokens (mirrored in one prompt): the map must
    # point at tokens equal to the target's, thumbnail for thumbnail.
    for ex in W.make_split("val", 4, seed=3):
        if ex["task"] == "edit":
            continue
        item = W.as_item(ex)
        target = item["target"].flatten(1).T
        for k, ref in enumerate(item["refs"]):
            mine = (ex["src"][:, 0] == k).nonzero()[:, 0]
            tokens = ref.flatten(1).T[ex["src"][mine, 1]]
            if ex["prompt"] == W.SUBJECTS[1]:
                tokens = tokens.view(-1, 3, W.THUMB, W.THUMB).flip(-1).flatten(1)
            assert len(mine) and torch.allclose(tokens, target[mine], atol=1e-5), (ex["prompt"], k)
        grey = (W.SIZE // 16) ** 2 - (W.SUB // 16) ** 2  # every target token outside the subject
        assert (ex["src"][:, 0] < 0).sum() == (grey if ex["task"] == "subject" else 0)


def test_every_fine_tune_logged_its_loss_curve(quick_run):
    for name in R.TUNES:
        log = (quick_run / "work" / "runs" / name / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == list(range(1, R.SETTINGS["quick"]["tune_steps"] + 1))


def test_the_share_of_the_gap_is_per_seed_and_undefined_without_a_gap():
    res = {("drop", "edit", "canny", 0.1, 0): {"psnr": 12.0}, ("control", "edit", "canny", 0.1, 0): {"psnr": 10.0},
           ("drop", "edit", "canny", 0.1, 1): {"psnr": 11.0}, ("control", "edit", "canny", 0.1, 1): {"psnr": 11.0}}  # fmt: skip
    assert P.gap_shares(res, "edit", "canny", top=14.0) == [0.5, 0.0]  # (12 - 10) / (14 - 10), (11 - 11) / (14 - 11)
    assert P.gap_shares(res, "edit", "canny", top=11.05) is None  # seed 1's control is at the ceiling: no gap


def test_the_report_names_every_test_prompt_below_the_margin_and_only_those():
    gates = {"val": {W.EDITS[0]: (40.0, 10.0)}, "test": {W.EDITS[0]: (19.9, 10.0), W.EDITS[1]: (20.0, 10.0), W.MULTI: (5.0, 10.0)}}
    (line, _) = P.gate_shortfalls(gates)
    assert W.EDITS[0] in line and W.MULTI in line and W.EDITS[1] not in line and "outlines are" not in line
    assert P.gate_shortfalls({"val": gates["val"]}) == [] and P.gate_shortfalls({"test": {W.EDITS[1]: (20.0, 10.0)}}) == []


# The coverage-first rule: the study's own selection rule (study_eval), beyond the paper.


def _cells(idx, grid_w, side):
    return [(i // grid_w // side, i % grid_w // side) for i in idx.tolist()]


def test_coverage_keeps_one_token_per_cell_and_follows_scores_inside():
    # 16x16 tokens, k = 16 -> 4x4-token cells, exactly one kept token in each.
    rng = np.random.default_rng(0)
    scores = torch.zeros(16, 16)
    scores[::2, ::2] = torch.from_numpy(rng.random((8, 8))).float() + 0.1  # only every other token scores
    for seed in range(5):
        idx = E.sample_covered(scores.flatten(), 16, seed, uniform_mix=0.0, grid_w=16)
        assert sorted(_cells(idx, 16, 4)) == [(r, c) for r in range(4) for c in range(4)]
        assert (scores.flatten()[idx] > 0).all()  # inside a cell the scores decide
        assert torch.equal(idx, E.sample_covered(scores.flatten(), 16, seed, uniform_mix=0.0, grid_w=16))


def test_coverage_spreads_tokens_where_the_paper_rule_concentrates_them():
    # All the score in one quadrant: the paper's rule puts nearly everything there, coverage first
    # still keeps a token in every cell; per image it goes through select_covered.
    image = np.zeros((256, 256, 3), np.uint8)
    image[:128, :128] = (np.indices((128, 128)).sum(0) % 8 < 4)[..., None] * 255  # stripes: edges, top left only
    plain = ts.select_reference_tokens([image], 1 / 16, "canny", seed=1)[0]
    cover = E.select_covered([image], 1 / 16, "canny", seed=1)[0]
    assert len(plain) == len(cover) == 16
    assert len(set(_cells(cover, 16, 4))) == 16
    assert sum(r < 2 and c < 2 for r, c in _cells(plain, 16, 4)) >= 12
    assert E.select_covered([image], 1.0, "canny")[0].tolist() == list(range(256))


def test_coverage_keeps_the_counts_of_every_selector_for_given_scores():
    # Scores from elsewhere (the model's attention) go through the same counts as the paper's rule.
    images = [np.zeros((256, 256, 3), np.uint8), np.full((128, 320, 3), 90, np.uint8), np.zeros((192, 288, 3), np.uint8)]
    sizes = [im.shape[0] // 16 * im.shape[1] // 16 for im in images]
    scores = [torch.linspace(0, 1, n) ** 2 for n in sizes]
    cover = E.select_covered(images, 0.2, "attention", seed=3, scores=scores)
    assert [len(k) for k in cover] == [max(1, round(0.2 * n)) for n in sizes]
