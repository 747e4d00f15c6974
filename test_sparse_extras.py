"""layouts.py and train_extras.py: each trainer's layout, built small here, converts to the manifest the
same examples written by hand give; the validation loss is fixed and shards exactly across processes;
preview sheets appear at their steps and a resumed run does not draw them again; bad options are one
`error:` line before any model loads. (test_sparse_train's torchrun test runs both extras in 2 processes.)"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import layouts
import train
import train_extras
from data import CachedDataset, ManifestError, read_manifest
from files import load_image
from klein import n_keep
from model import Flux2
from text_encoder import TextEncoder
from tiny import smooth_image
from vae import AutoEncoder

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# Layouts


def source_examples(n=6, seed=0):
    """n examples: target = its first reference inverted (same size: an edit), every third with a second
    reference of another size (subject-driven)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ref = smooth_image(rng, 64 if i % 2 == 0 else 96, 64)
        refs = [ref] + ([smooth_image(rng, 80, 64)] if i % 3 == 0 else [])
        out.append(dict(prompt=f"prompt {i}", target=Image.fromarray(255 - np.array(ref)), refs=refs))
    return out


def task_of(ex):
    return "edit" if len(ex["refs"]) == 1 else "subject"


def hand_written(path, records):
    """The manifest a person would write: {prompt, target, references, task} a line, paths as given."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def fields(examples):
    return [(e.prompt, e.target, e.references, e.task) for e in examples]


def test_ai_toolkit_equals_manifest(tmp_path, capsys):
    """An ai-toolkit dataset: targets (one in a subfolder) with .txt captions (one missing: empty prompt),
    control folders (a .jpg among the .png); hidden and _controls folders and non-images ignored; a
    target without any control image is one bad entry, named, counted, skipped with --skip-bad."""
    examples = source_examples()
    images, c1, c2 = (tmp_path / "ait" / d for d in ("images", "control", "control2"))
    for d in (images / "sub", images / ".hidden", images / "_controls", c1, c2):
        d.mkdir(parents=True)
    expected = []
    for i, ex in enumerate(examples):
        target = images / ("sub" if i == 5 else "") / f"ex{i}.png"
        ex["target"].save(target)
        if i != 4:
            target.with_suffix(".txt").write_text(ex["prompt"] + "\n")
        refs = [c1 / (f"ex{i}.jpg" if i == 1 else f"ex{i}.png")] + ([c2 / f"ex{i}.png"] if len(ex["refs"]) > 1 else [])
        for path, ref in zip(refs, ex["refs"]):
            ref.save(path, quality=95) if path.suffix == ".jpg" else ref.save(path)
        expected.append(dict(prompt="" if i == 4 else ex["prompt"], target=str(target), references=list(map(str, refs)), task=task_of(ex)))
    # in path order: images/ex0..4.png, then images/sub/ex5.png
    examples[0]["target"].save(images / ".hidden" / "junk.png")
    examples[0]["target"].save(images / "_controls" / "junk.png")
    (images / "notes.md").write_text("not an image")
    lonely = images / "lonely.png"
    examples[0]["target"].save(lonely)
    with pytest.raises(ManifestError) as e:
        layouts.convert("ai-toolkit", str(images), str(tmp_path / "m.jsonl"), controls=[str(c1), str(c2)])
    assert str(e.value) == f"{lonely}: no control image lonely.* (.jpg/.jpeg/.png/.webp) in {c1}, {c2}"
    layouts.convert("ai-toolkit", str(images), str(tmp_path / "m.jsonl"), skip_bad=True, controls=[str(c1), str(c2)])
    assert "skipped 1 bad entry" in capsys.readouterr().err
    got = read_manifest(str(tmp_path / "m.jsonl"))
    assert fields(got) == fields(read_manifest(str(hand_written(tmp_path / "hand.jsonl", expected))))
    assert [e.task for e in got] == ["subject", "edit", "edit", "subject", "edit", "edit"]  # inferred
    layouts.convert("ai-toolkit", str(images), str(tmp_path / "s.jsonl"), task="subject", skip_bad=True, controls=[str(c1), str(c2)])
    assert {e.task for e in read_manifest(str(tmp_path / "s.jsonl"))} == {"subject"}  # given


def test_musubi_equals_manifest(tmp_path, monkeypatch, capsys):
    """A musubi-tuner JSONL: control_path, control_path_0.. in their numbers' order (0000 is 0), image_path_0,
    absolute paths, paths relative to the working directory first, else to the JSONL; bad lines named by
    line, counted."""
    examples = source_examples()
    (tmp_path / "set" / "img").mkdir(parents=True)
    (tmp_path / "cwd" / "img").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    lines, expected = [], []
    for i, ex in enumerate(examples):
        base = "cwd" if i == 2 else "set"  # example 2 lives under the working directory
        names = [f"img/t{i}.png"] + [f"img/r{i}_{k}.png" for k in range(len(ex["refs"]))]
        for name, image in zip(names, [ex["target"], *ex["refs"]]):
            image.save(tmp_path / base / name)
        paths = [str(tmp_path / base / n) for n in names]
        written = paths if i == 1 else names  # example 1 absolute, the others relative
        line = dict(image_path=written[0], caption=ex["prompt"])
        if len(written) == 2:
            line["control_path"] = written[1]
        elif i == 0:  # numbered out of order in the file
            line |= {"control_path_1": written[2], "control_path_0": written[1]}
        else:
            line |= {"control_path_0001": written[2], "control_path_0000": written[1]}
        if i == 4:
            line["image_path_0"] = line.pop("image_path")
        lines.append(json.dumps(line))
        expected.append(dict(prompt=ex["prompt"], target=paths[0], references=paths[1:], task=task_of(ex)))
    bad = ['{"image_path": "img/t0.png", ', json.dumps(dict(image_path="img/t0.png", control_path="img/r0_0.png")),
           json.dumps(dict(image_path="img/t0.png", caption="x", control_path_a="img/r0_0.png")),
           json.dumps(dict(image_path="img/none.png", caption="x", control_path="img/r0_0.png"))]  # fmt: skip
    jsonl = tmp_path / "set" / "edit.jsonl"
    jsonl.write_text("\n".join(lines[:3] + [""] + bad + lines[3:]) + "\n")
    with pytest.raises(ManifestError) as e:
        layouts.convert("musubi", str(jsonl), str(tmp_path / "m.jsonl"))
    problems = str(e.value).splitlines()
    assert problems[0] == f"4 bad entries in {jsonl} (--skip-bad skips them):"
    assert [p.split(": ")[0] for p in problems[1:]] == [f"{jsonl} line {n}" for n in (5, 6, 7, 8)]
    assert "bad JSON" in problems[1] and "missing field 'caption'" in problems[2]
    assert "control_path_<number>" in problems[3] and "image not found" in problems[4]
    layouts.convert("musubi", str(jsonl), str(tmp_path / "m.jsonl"), skip_bad=True)
    assert "skipped 4 bad entries" in capsys.readouterr().err
    assert fields(read_manifest(str(tmp_path / "m.jsonl"))) == fields(read_manifest(str(hand_written(tmp_path / "hand.jsonl", expected))))


def hf_rows(tmp_path, examples):
    """The examples' images as PNG files in tmp_path/png and as PNG bytes."""
    (tmp_path / "png").mkdir()
    rows = []
    for i, ex in enumerate(examples):
        row = {}
        for name, image in zip(["target"] + [f"ref{k}" for k in range(len(ex["refs"]))], [ex["target"], *ex["refs"]]):
            path = tmp_path / "png" / f"{i}_{name}.png"
            image.save(path)
            row[name] = dict(bytes=path.read_bytes(), path=path.name)
        rows.append(row)
    return rows


def test_hf_parquet_equals_manifest(tmp_path):
    """A parquet dataset as the hub stores one (images embedded, columns image, input, more, text): the
    stored images are written out as they are; a row without its reference is one bad entry."""
    datasets = pytest.importorskip("datasets")
    examples = source_examples()
    rows = hf_rows(tmp_path, examples)
    features = datasets.Features(image=datasets.Image(), input=datasets.Image(), more=datasets.List(datasets.Image()),
                                 text=datasets.Value("string"))  # fmt: skip
    table = dict(image=[r["target"] for r in rows], input=[r["ref0"] for r in rows],
                 more=[[r["ref1"]] if "ref1" in r else [] for r in rows], text=[ex["prompt"] for ex in examples])  # fmt: skip
    table = {k: v + [v[0] if k != "input" else None] for k, v in table.items()}  # row 6: no reference
    (tmp_path / "ds" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ManifestError, match=f"{tmp_path / 'ds'} split train row 6: no image for input"):
        layouts.convert("hf", str(tmp_path / "ds"), str(tmp_path / "m.jsonl"), cond_columns=["input", "more"], caption_column="text")
    records = layouts.convert("hf", str(tmp_path / "ds"), str(tmp_path / "m.jsonl"), skip_bad=True, cond_columns=["input", "more"],
                              caption_column="text")  # fmt: skip
    got = read_manifest(str(tmp_path / "m.jsonl"))
    assert sorted(os.listdir(tmp_path / "m-images"))[:3] == ["000000.input.0.png", "000000.more.0.png", "000000.target.png"]
    expected = [dict(prompt=ex["prompt"], target=str(tmp_path / "png" / f"{i}_target.png"), task=task_of(ex),
                     references=[str(tmp_path / "png" / f"{i}_ref{k}.png") for k in range(len(ex["refs"]))])
                for i, ex in enumerate(examples)]  # fmt: skip
    want = read_manifest(str(hand_written(tmp_path / "hand.jsonl", expected)))
    assert len(records) == len(got) == len(want) == 6
    for a, b in zip(got, want):  # the same examples; the images are copies, byte for byte
        assert (a.prompt, a.task, len(a.references)) == (b.prompt, b.task, len(b.references))
        for p, q in zip([a.target, *a.references], [b.target, *b.references]):
            assert open(p, "rb").read() == open(q, "rb").read()


def test_hf_image_folder_equals_manifest(tmp_path):
    """An image folder (metadata.jsonl: file_name, cond_file_name, extra_file_names): the manifest names
    the folder's own files."""
    pytest.importorskip("datasets")
    examples = source_examples()
    folder = tmp_path / "ds"
    folder.mkdir()
    lines, expected = [], []
    for i, ex in enumerate(examples):
        names = [f"t{i}.png", f"c{i}.png"] + ([f"e{i}.png"] if len(ex["refs"]) > 1 else [])
        for name, image in zip(names, [ex["target"], *ex["refs"]]):
            image.save(folder / name)
        lines.append(json.dumps(dict(file_name=names[0], cond_file_name=names[1], extra_file_names=names[2:], edit_prompt=ex["prompt"])))
        expected.append(dict(prompt=ex["prompt"], target=str(folder / names[0]), references=[str(folder / n) for n in names[1:]], task=task_of(ex)))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    layouts.convert("hf", str(folder), str(tmp_path / "m.jsonl"), cond_columns=["cond", "extra"], caption_column="edit_prompt")
    assert fields(read_manifest(str(tmp_path / "m.jsonl"))) == fields(read_manifest(str(hand_written(tmp_path / "hand.jsonl", expected))))
    with pytest.raises(ValueError, match="no column 'caption'; its columns: image, cond, extra, edit_prompt"):
        layouts.convert("hf", str(folder), str(tmp_path / "m.jsonl"), cond_columns=["cond"], caption_column="caption")


def test_datasets_is_imported_only_for_the_hf_layout(tmp_path, monkeypatch):
    code = "import sys, layouts; assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True).returncode == 0
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match="needs the datasets library: pip install datasets"):
        layouts.convert("hf", str(tmp_path), str(tmp_path / "m.jsonl"), cond_columns=["c"], caption_column="t")


def run_cli(main, argv):
    """main(argv): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):
                err.write(code + "\n")
                code = 1
    return code, out.getvalue(), err.getvalue()


def one_error(code, err):
    assert code not in (0, None), err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]], err
    assert "Traceback" not in err


def test_layouts_cli(tmp_path):
    examples = source_examples(n=2)
    (tmp_path / "img").mkdir()
    for i, ex in enumerate(examples):
        ex["target"].save(tmp_path / "img" / f"t{i}.png")
        ex["refs"][0].save(tmp_path / "img" / f"r{i}.png")
    jsonl = hand_written(tmp_path / "musubi.jsonl", [dict(image_path=f"img/t{i}.png", caption="p", control_path=f"img/r{i}.png") for i in range(2)])
    code, out, _ = run_cli(layouts.main, ["musubi", str(jsonl), "--out", str(tmp_path / "m.jsonl")])
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'm.jsonl'}: 2 examples (2 edit, 0 subject), 2 references"
    for argv in (["ai-toolkit", str(tmp_path / "img"), "--out", str(tmp_path / "x.jsonl")],  # no --control
                 ["ai-toolkit", str(tmp_path / "nowhere"), "--control", str(tmp_path), "--out", str(tmp_path / "x.jsonl")],
                 ["musubi", str(jsonl), "--out", str(tmp_path / "no" / "x.jsonl")],
                 ["musubi", str(jsonl), "--out", str(tmp_path / "x.jsonl"), "--task", "style"],
                 ["hf", str(tmp_path), "--cond-image-column", "c", "--out", str(tmp_path / "x.jsonl")],  # no --caption-column
                 ["tar", str(tmp_path), "--out", str(tmp_path / "x.jsonl")]):  # fmt: skip
        code, _, err = run_cli(layouts.main, argv)
        one_error(code, err)
        assert not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# The validation loss


def test_validation_sigmas_are_training_quantiles():
    """The 4 fixed sigmas split training's shifted logit-normal draws into 8 equal parts (every other edge)."""
    for tokens in (16, 4096):
        draws = torch.tensor([train.sample_sigma(train.generator("q", k), tokens) for k in range(8000)])
        below = [(draws < s).float().mean().item() for s in train.validation_sigmas(tokens)]
        assert np.allclose(below, train.VAL_QUANTILES, atol=0.015), below


def test_validation_loss_is_fixed_and_shards_exactly(klein, monkeypatch):
    """The same numbers on every call; dense and sparse share each example's sigma and noise, sparse keeps
    n_keep(keep) tokens of each reference; two processes compute disjoint halves of the loss table whose
    sum gives the one-process means bitwise."""
    root, _, cache = klein
    data = CachedDataset(str(cache))
    model = Flux2.from_pretrained(str(root))
    cpu = torch.device("cpu")
    one = train.validation_losses(model, data, 0.1, 2, False, 0, 1, cpu)
    assert one == train.validation_losses(model, data, 0.1, 2, False, 0, 1, cpu) and one[0] != one[1]
    item = data[0]
    dense, sparse = (train.validation_example(item, 0, 1, k) for k in (None, [0.1, 0.1]))
    sigma = torch.tensor(train.validation_sigmas(16)[1])  # item 0: a 4 x 4 target
    assert torch.equal(dense["noise"], sparse["noise"]) and torch.equal(dense["s"], sigma) and torch.equal(sparse["s"], sigma)
    assert sparse["ref"].shape[0] == sum(n_keep(0.1, r.shape[1] * r.shape[2]) for r in item["refs"]) < dense["ref"].shape[0]
    tables = []
    monkeypatch.setattr(train.dist, "all_reduce", lambda t: tables.append(t.clone()))
    for rank in (0, 1):
        train.validation_losses(model, data, 0.1, 2, False, rank, 2, cpu)
    assert ((tables[0] != 0) ^ (tables[1] != 0)).all()  # every entry computed once
    total = tables[0] + tables[1]
    assert (total[..., 0].mean().item(), total[..., 1].mean().item()) == one


# ----------------------------------------------------------------------------------------------
# Previews, validation and resume in train.py


def preview_file(root, path):
    img = root / "data" / "img"
    lines = [dict(prompt="invert the colours", references=[str(img / "ref0.png")]),
             dict(prompt="make it a negative", references=[str(img / "ref3.png"), str(img / "extra3.png")], seed=3, task="subject")]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def small_cache(cache, folder, n=2):
    """A copy of the cache holding its first n examples: a short validation pass."""
    shutil.copytree(cache, folder)
    (folder / "index.json").write_text(json.dumps(json.loads((cache / "index.json").read_text())[:n]))
    return folder


def extras_args(root, cache, out, previews, val, *extra):
    return ["--model", str(root), "--data", str(cache), "--out", str(out), "--steps", "5", "--save-every", "2", "--rank", "2",
            "--lr", "2e-3", "--warmup", "2", "--val-data", str(val), "--val-every", "2", "--sample-file", str(previews),
            "--sample-every", "2", *extra]  # fmt: skip


def untimed(path):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")} for line in open(path)]


def test_previews_and_validation_resume(klein, tmp_path, monkeypatch):
    """Sheets at steps 0, 2, 4 and the last (5), validation losses logged at the same steps, the loss plot
    beside the LoRA. A run killed in the save of step 4 (after that step's sheet) resumes from step 2: it
    draws step 5 only (step 4's sheet is kept, not drawn again) and ends with the uninterrupted run's files."""
    root, _, cache = klein
    previews, val = preview_file(root, tmp_path / "previews.jsonl"), small_cache(cache, tmp_path / "val")
    train.main(extras_args(root, cache, tmp_path / "a", previews, val))
    a = tmp_path / "a"
    assert sorted(os.listdir(a / "samples")) == [f"step_00000{s}.png" for s in (0, 2, 4, 5)]
    log = [json.loads(line) for line in open(a / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5] and "loss" not in log[0]
    assert [r["step"] for r in log if "val_dense" in r] == [r["step"] for r in log if "sample_seconds" in r] == [0, 2, 4, 5]
    assert all(r["val_seconds"] > 0 and r["sample_seconds"] > 0 for r in log if "val_dense" in r)
    assert Image.open(a / "loss.png").format == "PNG"
    sheet = Image.open(a / "samples" / "step_000005.png")
    assert sheet.size == (6 + 6 * (train_extras.CELL + 6), 28 + 2 * (14 + train_extras.CELL + 6))  # 2 previews, up to 2 references

    saves, draws, save, draw = [], [], train.save, train_extras.draw_sheet
    monkeypatch.setattr(train_extras, "draw_sheet", lambda title, *a: draws.append(title) or draw(title, *a))

    def killed_in_second_save(*args):
        saves.append(args[3])
        if len(saves) == 2:
            raise KeyboardInterrupt
        return save(*args)

    monkeypatch.setattr(train, "save", killed_in_second_save)
    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train.main(extras_args(root, cache, b, previews, val))
    assert draws == ["step 0", "step 2", "step 4"] and saves == [2, 4]
    drawn = (b / "samples" / "step_000004.png").stat()
    monkeypatch.setattr(train, "save", save)
    train.main(extras_args(root, cache, b, previews, val, "--resume"))
    assert draws == ["step 0", "step 2", "step 4", "step 5"]
    again = (b / "samples" / "step_000004.png").stat()
    assert (again.st_ino, again.st_mtime_ns) == (drawn.st_ino, drawn.st_mtime_ns)
    for name in ["pytorch_lora_weights.safetensors", "loss.png"] + [f"samples/step_00000{s}.png" for s in (0, 2, 4, 5)]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert untimed(a / "log.jsonl") == untimed(b / "log.jsonl")


def test_validation_does_not_depend_on_the_seed(klein, tmp_path):
    """Two runs with different --seed: their step-0 validation losses (the base model) are equal, their
    training losses are not."""
    root, _, cache = klein
    logs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        train.main(["--model", str(root), "--data", str(cache), "--out", str(out), "--steps", "1", "--seed", str(seed),
                    "--val-data", str(cache)])  # fmt: skip
        logs.append([json.loads(line) for line in open(out / "log.jsonl")])
    assert [logs[k][0]["val_dense"] for k in (0, 1)] == [logs[0][0]["val_dense"]] * 2
    assert logs[0][1]["loss"] != logs[1][1]["loss"]


# ----------------------------------------------------------------------------------------------
# Bad options: one error line, before any model loads, nothing written


def bad_line(root, path, line):
    path.write_text(json.dumps(dict(prompt="p", references=[str(root / "data" / "img" / "ref0.png")])) + "\n" + line + "\n")
    return path


CASES = [  # (id, extra train.py arguments, what the error says); V: --val-data; S: --sample-file
    ("val-keep-alone", ["--val-keep", "0.2"], "--val-keep cannot apply without --val-data"),
    ("val-every-alone", ["--val-every", "5"], "--val-every cannot apply without --val-data"),
    ("sample-options-alone", ["--sample-every", "5", "--sample-steps", "4"], "--sample-every, --sample-steps cannot apply without --sample-file"),
    ("val-every-0", ["V", "--val-every", "0"], "--val-every must be in [1, "),
    ("val-keep-0", ["V", "--val-keep", "0"], "--val-keep must be in (0, 1]"),
    ("val-keep-1.5", ["V", "--val-keep", "1.5"], "--val-keep must be in (0, 1]"),
    ("val-keep-nan", ["V", "--val-keep", "nan"], "--val-keep must be in (0, 1]"),
    ("val-every-str", ["V", "--val-every", "often"], "--val-every: invalid int value"),
    ("sample-every-negative", ["S", "--sample-every=-2"], "--sample-every must be in [1, "),
    ("sample-keep-nan", ["S", "--sample-keep", "nan"], "--sample-keep must be in (0, 1]"),
    ("sample-steps-0", ["S", "--sample-steps", "0"], "--sample-steps must be in [1, 1000]"),
    ("sample-steps-huge", ["S", "--sample-steps", "5000"], "--sample-steps must be in [1, 1000]"),
    ("val-data-missing", ["--val-data", "{case}/nowhere"], "no such manifest or cache folder"),
    ("val-data-bad-line", ["--val-data", "{case}/bad.jsonl"], "bad.jsonl line 1: unknown task 'style'"),
    ("val-data-not-a-cache", ["--val-data", "{case}"], "is not a latent cache (no index.json)"),
    ("val-manifest-model-not-a-repository", ["--val-data", "{manifest}", "--model", "{root}/transformer"],
     "--val-data (a manifest to cache) needs --model to be a klein repository folder"),
    ("sample-file-missing", ["--sample-file", "{case}/nowhere.jsonl"], "--sample-file not found"),
    ("sample-file-folder", ["--sample-file", "{case}"], "is a folder, not a file"),
    ("sample-file-bad-json", ["--sample-file", "BAD{"], "line 2: bad JSON"),
    ("sample-file-unknown-field", ["--sample-file", 'BAD{"prompt": "p", "references": ["x.png"], "keep": 0.5}'], "line 2: unknown field(s) 'keep'"),
    ("sample-file-no-references", ["--sample-file", 'BAD{"prompt": "p", "references": []}'], "line 2: field 'references' must be a non-empty list"),
    ("sample-file-image-missing", ["--sample-file", 'BAD{"prompt": "p", "references": ["nowhere.png"]}'], "line 2: image not found"),
    ("sample-file-task", ["--sample-file", 'BAD{"prompt": "p", "references": ["x.png"], "task": "style"}'], "line 2: unknown task 'style'"),
    ("sample-file-prompt-int", ["--sample-file", 'BAD{"prompt": 1, "references": ["x.png"]}'], "line 2: field 'prompt' must be a str"),
    ("sample-file-model-not-a-repository", ["S", "--model", "{root}/transformer"], "--sample-file needs --model to be a klein repository folder"),
]


@pytest.mark.parametrize("name,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_extras_options(klein, tmp_path, monkeypatch, name, extra, message):
    root, manifest, cache = klein
    for cls in (Flux2, AutoEncoder, TextEncoder):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded before the options were checked"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(prompt="p", target=str(root / "data/img/target0.png"),
                                                        references=[str(root / "data/img/ref0.png")], task="style")) + "\n")  # fmt: skip
    good = preview_file(root, tmp_path / "previews.jsonl")
    args = []
    for a in extra:
        if a.startswith("BAD"):
            args.append(str(bad_line(root, tmp_path / "case.jsonl", a[3:])))
        else:
            args += {"V": ["--val-data", str(cache)], "S": ["--sample-file", str(good)]}.get(a, [a.format(case=tmp_path, root=root, manifest=manifest)])
    (tmp_path / "x.png").write_bytes((root / "data" / "img" / "ref0.png").read_bytes())
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(root))
    argv = ["--model", str(root), "--data", str(cache), "--out", str(tmp_path / "out"), "--steps", "2"]
    code, _, err = run_cli(train.main, argv + args)
    print(f"\n{name}: {err.strip().splitlines()[-1]}")
    one_error(code, err)
    assert message in err.strip().splitlines()[-1]
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(root))) == before


def test_sample_file_lists_every_bad_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": 1}\n\n[]\n{"prompt": "p", "references": ["a.png"]}\n')
    with pytest.raises(ValueError) as e:
        train_extras.read_sample_file(str(tmp_path / "p.jsonl"))
    lines = str(e.value).splitlines()
    assert lines[0] == f"3 bad lines in --sample-file {tmp_path / 'p.jsonl'}:"
    assert [line.split(": ")[0].rsplit(" ", 1)[1] for line in lines[1:]] == ["1", "3", "4"]


def test_loss_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    train_extras.plot_losses([dict(step=1, loss=1.0)], str(tmp_path / "loss.png"), 0.1)
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "loss.png").exists()
    monkeypatch.undo()
    train_extras.plot_losses([dict(step=0, val_dense=2.0, val_sparse=2.1), dict(step=1, loss=1.0)], str(tmp_path / "loss.png"), 0.1)
    assert load_image(str(tmp_path / "loss.png")).size == (700, 400)


# ----------------------------------------------------------------------------------------------
# Kills: a run with validation and previews, SIGKILLed where the extras write, ends as the uninterrupted one


def killed_at(point, run):
    """run() in a forked child, SIGKILLed at `point`: (file name, "written" | "renamed"), the temporary of
    files.write_atomic for that name complete or renamed over it, or ("log", step), right after that
    step's log line is appended. Returns the child's exit status (-9: killed there)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            name, when = point
            replace, append_log = os.replace, train.append_log

            def atomic_replace(src, dst, *a, **k):
                if os.path.basename(dst) == name and when == "written":
                    os.kill(os.getpid(), signal.SIGKILL)
                replace(src, dst, *a, **k)
                if os.path.basename(dst) == name and when == "renamed":
                    os.kill(os.getpid(), signal.SIGKILL)

            def append(out, record):
                append_log(out, record)
                if name == "log" and record["step"] == when:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace, train.append_log = atomic_replace, append
            with open(os.devnull, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                run()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def same_run(a, b):
    """Two run folders hold the same files: bytes, but checkpoint.pt's tensors (torch.save stamps an id) and
    log.jsonl without the seconds each hook took."""
    files = lambda d: sorted(os.path.relpath(os.path.join(r, n), d) for r, _, ns in os.walk(d) for n in ns)  # noqa: E731
    assert files(a) == files(b)
    for rel in files(a):
        if rel == "checkpoint.pt":
            x, y = (torch.load(d / rel, weights_only=True) for d in (a, b))
            assert x["step"] == y["step"] and all(torch.equal(x["lora"][k], y["lora"][k]) for k in x["lora"])
        elif rel == "log.jsonl":
            assert untimed(a / rel) == untimed(b / rel)
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_extras_survive_kills(klein, tmp_path):
    """Killed as a sheet is written and after it is renamed (step 0: before any checkpoint; step 2: before
    that step's checkpoint), as the loss plot is written and after (before the last checkpoint), and after
    a log line with validation losses: `--resume` ends with the uninterrupted run's files."""
    root, _, cache = klein
    (tmp_path / "previews.jsonl").write_text(json.dumps(dict(prompt="p", references=[str(root / "data/img/ref0.png")])) + "\n")
    val = small_cache(cache, tmp_path / "val")
    argv = lambda out, *extra: ["--model", str(root), "--data", str(cache), "--out", str(out), "--steps", "3", "--save-every", "2",
                                "--rank", "2", "--lr", "2e-3", "--val-data", str(val), "--val-every", "2",
                                "--sample-file", str(tmp_path / "previews.jsonl"), "--sample-every", "2", *extra]  # fmt: skip
    assert killed_at(("none", None), lambda: train.main(argv(tmp_path / "reference"))) == 0
    points = [("step_000000.png", "renamed"), ("step_000002.png", "written"), ("step_000002.png", "renamed"),
              ("loss.png", "written"), ("loss.png", "renamed"), ("log", 2)]  # fmt: skip
    for k, point in enumerate(points):
        out = tmp_path / f"kill{k}"
        assert killed_at(point, lambda: train.main(argv(out))) == -signal.SIGKILL, point
        train.main(argv(out, "--resume"))
        same_run(tmp_path / "reference", out)
