"""Reproduce Sparse Context's claims end to end on a CPU, in a world small enough for two cores.

    python reproduce.py --ignore-gate    # the committed run (about 72 min from scratch on 2 cores): REPRODUCTION.md, reproduction/*
    python reproduce.py --stage base     # pretrain the base and print its per-prompt competence gate, then stop
    python reproduce.py --quick --ignore-gate  # every stage in under a minute, into repro-quick/ (a test runs it)
    python reproduce.py --split val --ignore-gate  # the same on the validation photograph, into repro-val/

--quick alone stops at the competence gate (exit 1): its 20-step base is far below it, so a smoke run of
every stage needs --ignore-gate; so does the full run, whose base is 5.7 dB short on one validation
prompt (REPRODUCTION.md says so first). The committed report is never touched by --quick or --split val.

The world. Images are 256x256 crops (random scale, position, flip; a crop may magnify its photograph
up to 2x, so structure spans several tokens) of real photographs bundled with scikit-image; whole
photographs are held out: TEST for the reported numbers, VAL for every choice, the rest for training.
A token is a 16x16 patch as in klein, so every reference is a 16x16-token grid (256 tokens; keep 0.1
keeps 26, one in every 3x3 tokens or so, as klein keeps 410 of a 1024 px reference's 4,096); the codec
is fixed: each patch becomes its 4x4 colour thumbnail (48 values, scaled to about unit variance), and
decoding upsamples the thumbnails. The true target of every metric is the decoded codec of the target,
so the codec's own loss counts against no model. Three tasks, told apart by the prompt embedding (a
fixed random (4, 32) tensor per prompt, standing in for Qwen3):
  - edit (spatially aligned, one reference): grayscale, invert the colours, draw its outlines (the
    Sobel magnitude of the thumbnails' grey: structure, not colour, a function of the reference's
    tokens and their neighbours);
  - subject (one reference, not aligned): a 128 px subject cut from a photograph sits in the
    bottom-right quarter of a blurred photograph; the target shows it centred on grey, or centred
    and mirrored (every target token comes from another place of the reference);
  - multi (2-3 references): a scene and one or two subject images as above; the target is the scene
    with the first subject in its top-left quadrant and the second in its bottom-right.
A compact reference is the reference image downscaled 2, 3 or 4x per side (klein.compact_reference:
8x8, 5x5 or 4x4 tokens) at ids spanning the full grid, encoded by the same codec.

The models, all through the project's code: a small `Flux2` pretrained from scratch on dense references
(its own short full-parameter loop, with train.py's loss and per-example draws) and saved as a BFL
single file; then `train.py` itself, as users run it, for every LoRA: drop (the default keep range),
control (no dropping: same steps, so more training is not mistaken for drop training), drop --kv
(sampled with the KV cache, against the base sampled with the KV cache) and compact (train.py
--compact 2 3 4: references downscaled instead of dropped, the same steps, rank, data and seed). The
drop LoRA is also scored at half scale (drop@0.5: the dense-quality rule). Evaluation: the sampler's
`denoise`, `token_selectors.select_reference_tokens` for every selection (the coverage-first rule,
beyond the paper, is the study's own), PSNR and SSIM from compare.py.

This file is the command line and the run's stages, top to bottom (main): the world, the base, the gate
and the redundancy check, the fine-tunes, the evaluation, the timing, the report. The study's own
files: study_world.py (photographs, tasks, codec, examples, the training cache), study_eval.py
(selection, sampling, metrics, the gate, the redundancy check, the timing), study_report.py (verdicts,
tables, figures, REPRODUCTION.md); none imports this file.
"""

import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import lora
from data import CachedDataset
from files import ArgumentParser, write_atomic
from model import Flux2, Flux2Config
from study_eval import GATE_DB, calibrate_topi, dense_scores, evaluate, gate, grey_floor, redundancy, summarize, time_sampling
from study_report import gate_table, image_grid, plot_losses, plot_quality, plot_speed, redundancy_table, verdicts, write_report
from study_world import CHANNELS, COMPACT, CONTEXT, TASKS, WORLD, make_split, write_cache
from train import flow_matching_loss, forward_groups, generator, training_example

SETTINGS = {
    "full": dict(cfg=dict(hidden_size=128, num_heads=2, depth=1, depth_single=3), base_steps=4000, base_batch=8,
                 base_lr=1e-3, tune_steps=200, tune_warmup=20, tune_batch=16, tune_lr=1e-3, rank=16, train_pool=3072,
                 test_per_task=16, seeds=3, sample_steps=8, timing_rounds=3, timing_examples=4, keeps=(1.0, 0.25, 0.1, 0.05)),
    "quick": dict(cfg=dict(hidden_size=32, num_heads=2, depth=1, depth_single=1), base_steps=20, base_batch=8,
                  base_lr=1e-3, tune_steps=3, tune_warmup=1, tune_batch=4, tune_lr=1e-3, rank=4, train_pool=32,
                  test_per_task=2, seeds=1, sample_steps=2, timing_rounds=1, timing_examples=1, keeps=(1.0, 0.1, 0.05)),
}  # fmt: skip
# Why the base is trained this way: what the validation photograph showed (one seed, PSNR at keep 1, edit /
# subject / multi; a uniform grey image scores 15.0 / 21.2 / 14.9 dB there). Written into the report.
WORLD_CHOICES = """\
This world replaced an 8x8-token one (128 px images, 64 px subjects; below, for the record) in which keep 0.1
kept 6 tokens: there the no-model fill of the kept tokens scored no better than the no-drop control and the
coarse layout fell as much as the detail, so claim 1 could not show. The tasks, photographs, codec, model and
learning rate were kept; on the validation photograph, before any base was trained:
- the side doubled to 256 px (16x16 tokens per reference, 26 kept at keep 0.1), the subject to 128 px;
- crops: with crops no smaller than the image side (content shrunk 1-2x) the fill of a random keep-0.1
  selection beat grey by +1.90 / +1.74 / +1.88 dB (edit / subject / multi; coarse 4x4 layout +8.36 / +8.48 /
  +8.06 dB); with crops down to half the side (magnified up to 2x) +2.35 / +2.55 / +2.60 dB (coarse +8.55 /
  +8.30 / +8.60): taken, the structure then spans more tokens;
- the redundancy check's thresholds (1 dB over grey; coarse within 3 dB of the dense base's) were fixed then;
- the base: 4000 steps of 8 instead of 6000 (a step of 8 takes about 0.5 s on 2 cores here, 4x the tokens of
  the old world: 4000 steps took 32.7 min, 6000 would leave no room in 90 minutes for the rest). It passes the
  gate on 6 of 7 validation prompts; the mirrored subject is +6.10 dB over grey, 3.9 dB short (table below).
  A longer base did not fit the budget, so the committed run goes on with --ignore-gate and says so first.

The 8x8-token world, for the record. The first committed run used 4 heads and 700 base steps of 32 examples. That world was not informative: on
the validation photograph the base scored 15.6 / 21.4 / 15.9 dB at keep 1 (edit / subject / multi), within
0.2-1.0 dB of a uniform grey image (15.0 / 21.2 / 14.9 dB). The world was changed on the validation photograph
only, the tasks and photographs kept:
- 2 heads instead of 4 (head dim 64: 16 RoPE dimensions per position axis, 8 frequencies instead of 4, so
  neighbouring tokens are easier to tell apart): 16.4 / 22.1 / 16.6 dB at 700 steps x 32;
- then 2800 steps of 8 examples instead of 700 of 32 (the same examples seen, about the same time):
  18.5 / 22.6 / 20.6 dB at keep 1. Tried and rejected there: learning rate 3e-3 (4 heads, 600 x 32: lower
  training loss, worse samples); RoPE theta 20 instead of klein's 2000 (2800 x 8: 15.3 / 21.1 / 16.9 dB).

Then the competence gate (issue 16): at least 10 dB above grey on every validation prompt. Margins over grey
per prompt below are outlines / invert / grayscale / subject / subject mirrored / multi with 2 / 3 references:
- width 192 with 3 heads of 64 (600 steps x 8, 5 min): +0.3 / +0.3 / -1.9 / -0.8 / -0.9 / +0.9 / +1.0 dB;
- width 128, a zero-initialised final projection, 4000 steps x 4 (warmup + cosine as before, 10 min):
  -0.9 / +1.3 / +6.5 / -0.3 / +0.3 / +3.4 / +2.1 dB, below 2800 x 8 per task (edit, multi) in the same time;
  the same at learning rate 2e-3 (6000 x 4) was within 1.5 dB of grey on every prompt after 2000 steps;
- the outline target was not a function of the reference's tokens (Sobel at 64 px, finer than the 4x4
  thumbnails: even the outline of what the tokens carry scored only 17.2 dB against it), so no model and no
  fill could reach it: it is now the Sobel magnitude of the thumbnails' grey (grey image 9.6 dB); with the
  subject also moved to one of four quadrants only (4000 x 4, zero-initialised projection): +4.0 / +4.5 /
  +2.9 / -1.6 / -1.3 / +3.3 / +2.0 dB. The quadrants did not make the subject learnable and were dropped;
  the new outline was kept (the last committed run's 2800 x 8 base).
None of these passed. What the base could not learn was the non-aligned subject's *search*: it learns the
per-token maps at the aligned position, and a move by a fixed offset, but not where a subject is. Measured on
the validation photograph with bases trained on one task family only (16 examples per prompt; margins over grey):
- subject only, 1500 steps x 8: the subject at a random token-aligned place (25 places) +2.0 / +2.5 dB (centred
  / mirrored); in one of four corners +1.4 / +2.4 dB after 1000 steps; always in the bottom-right quarter
  +16.8 / +12.2 dB. The subject now always sits in the reference's bottom-right quarter: the task stays
  non-aligned (every target token comes from another place of the reference, mirrored for one prompt) and
  a selector still has to tell the subject from the blurred background, but the model need not find it;
- edit only, 1200 steps x 8, outlines / invert / grayscale: +6.5 / +8.2 / +4.6 dB and still rising;
  QK-norm scales initialised at 4 instead of 1 (sharper attention from the start) made it worse (+3.9 / -1.7 /
  -2.0 dB), so the initialisation stays klein's;
- every task, the subject in the bottom-right quarter, 6000 steps x 8 (the budget the other stages leave;
  warmup + cosine as before): at 1500 / 3000 / 4500 / 6000 steps the lowest margin was -0.9 (invert), +6.2
  (invert), +9.8 (outlines) and +10.7 dB (outlines): this base, 18 minutes of one core, passes the gate on every
  validation prompt (table below, 32 examples per prompt)."""
# How long the fine-tunes are, and the schedule beyond the paper: chosen on the validation photograph.
TUNE_CHOICES = """\
Chosen on the validation photograph in this world (`python reproduce.py --split val --ignore-gate`, 16 examples
per task, 3 seeds): ToPi's re-score at step 6 of 8, the best mean over tasks (PSNR at keep 0.1 on the base,
edit / subject / multi: never 16.59 / 24.05 / 17.79 dB; step 2 16.59 / 24.06 / 17.77, step 4 16.59 / 24.07 /
17.84, step 6 16.60 / 24.03 / 18.01). The dense-quality rule is read from the run itself (its table below);
on validation: no LoRA at keep 1 (mean over tasks 29.01 dB, the drop LoRA at scale 0.5 25.40, at 1 20.95),
scale 0.5 below (keep 0.25 / 0.1 / 0.05: 20.93 / 19.32 / 18.61 dB against 20.88 / 19.06 / 18.40 without it and
19.56 / 18.67 / 18.10 at scale 1). The verdicts' rules, the drop-vs-compact one included, were fixed before
that run; on validation it found compact references ahead of dropping at every budget and task.

The fine-tunes (200 steps, learning rate 1e-3, rank 16, batch 16) were chosen in the 8x8-token world and kept
here without a new search. There, the fine-tunes' length and learning rate, on its base: drop and control trained on (the same command,
resumed), scored on the validation photograph at 100, 200, 400 and 800 LoRA steps (2 seeds; PSNR at keep 0.1
with the task-aware rule, edit / subject / multi; the base without a LoRA scores 16.24 / 23.92 / 16.22 dB there,
the no-model fill 15.02 / 23.70 / 16.51): drop 16.03 / 22.52 / 16.48, 16.19 / 23.25 / 17.14, 15.13 / 23.37 / 16.57,
15.16 / 23.34 / 16.36 dB; control 16.19 / 23.93 / 16.18, 16.21 / 23.93 / 16.20, 16.21 / 23.93 / 16.20, 16.17 /
23.94 / 16.23 dB. The control is flat from 100 steps; drop stops improving at 200 (edit and multi fall by 1.06
and 0.57 dB from 200 to 400, subject gains 0.12; the training loss still falls to about 400), so every
fine-tune is 200 steps (it was 400), with the same learning rate, rank, batch, warmup, seed and data.
Learning rate 3e-4 instead of 1e-3 (drop, 100 / 200 / 400 steps: 16.01 / 23.34 / 16.35, 16.07 / 22.66 / 16.64,
15.61 / 22.77 / 16.92 dB) was no better and was not taken. At keep 1 drop loses much of the base's dense
quality within 100 steps (edit / subject / multi 23.35 / 24.86 / 24.04 dB against the control's 29.90 / 39.16 /
36.16): it sees every reference token in only a tenth of its examples."""
MODELS = ("base", "control", "drop", "drop@0.5", "compact")  # drop@0.5: the drop LoRA at half scale (the dense-quality rule)
RESCORE_STEPS = (2, 4, 6)  # ToPi's temporal update: the steps (of 8) tried on validation
RESCORE_STEP = 6  # the one the test run uses: chosen on validation (TUNE_CHOICES)
TRAINING = ("cfg", "base_steps", "base_batch", "base_lr", "train_pool")  # what the cached base depends on
# Fine-tunes: only the keep settings differ (and --kv for the one sampled with the cache).
TUNES = {
    "control": ["--keep-range", "1", "1", "--keep-all-prob", "0"],
    "drop": [],  # train.py's defaults: keep ~ U(0.05, 0.25), all tokens with probability 0.1
    "drop-kv": ["--kv"],
    "compact": ["--compact", *map(str, COMPACT)],  # references downscaled 2, 3 or 4x instead of dropped (probability 0.9)
}


# ----------------------------------------------------------------------------------------------
# The base model and the fine-tunes


def base_config(settings):
    c = settings["cfg"]
    head = c["hidden_size"] // c["num_heads"]
    return Flux2Config(in_channels=CHANNELS, context_dim=CONTEXT, axes_dim=(head // 4,) * 4, **c)


def digest(key):
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def stamped(path, key):
    """Whether the stamp file at path records key: what a cached stage was made from."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return f.read() == key


def base_key(settings, seed):
    return json.dumps(dict(settings={k: settings[k] for k in TRAINING}, seed=seed, world=WORLD), sort_keys=True)


def pretrain(path, cache, settings, seed):
    """Full-parameter training from scratch on dense references, with train.py's loss and per-example
    draws, on the training cache (the fine-tunes' data). Saved as a BFL single file."""
    key = base_key(settings, seed)
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("settings") == key:
                return "cached"
    torch.manual_seed(seed)
    model = Flux2(base_config(settings))
    steps, batch, lr = settings["base_steps"], settings["base_batch"], settings["base_lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = CachedDataset(cache)
    items = [data[i] for i in range(len(data))]
    warmup = max(1, steps // 20)
    bar = tqdm(range(steps), desc="pretraining the base")
    for step in bar:
        pick = torch.randint(len(items), (batch,), generator=generator(seed, "base", step)).tolist()
        examples = [training_example(items[i], generator(seed, "base", step, j), None) for j, i in enumerate(pick)]
        for group in opt.param_groups:  # warmup, then cosine to a tenth
            p = max(0.0, (step - warmup) / max(1, steps - warmup))
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        opt.zero_grad()
        loss = sum(flow_matching_loss(model, grp, False, torch.device("cpu")).sum() for grp in forward_groups(examples, batch)) / batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(sd, tmp, metadata={"settings": key}))
    return "trained"


def fine_tune(name, base, cache, out, settings, seed, threads):
    """train.py as users run it, on `threads` CPU threads; a finished run is reused, a killed one resumed."""
    lora_file, checkpoint = os.path.join(out, "pytorch_lora_weights.safetensors"), os.path.join(out, "checkpoint.pt")
    cmd, marker = tune_command(name, base, cache, out, settings, seed), out + ".json"
    key = json.dumps(dict(command=cmd, base=base_key(settings, seed)))  # a new base or command: a new run
    if stamped(marker, key) and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["step"] == settings["tune_steps"] and os.path.isfile(lora_file):
            return cmd, "cached"
        cmd = cmd + ["--resume"]  # a killed run goes on from its last checkpoint
    else:
        shutil.rmtree(out, ignore_errors=True)
        write_atomic(marker, key)
    here = os.path.dirname(os.path.abspath(__file__))
    absolute = [os.path.abspath(a) if a in (base, cache, out) else a for a in cmd]  # train.py runs from here
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, os.path.join(here, "train.py"), *absolute[1:]], check=True, cwd=here, env=env)
    return cmd, "trained"


def tune_command(name, base, cache, out, settings, seed):
    common = ["train.py", "--model", base, "--data", cache, "--out", out, "--steps", str(settings["tune_steps"]),
              "--lr", str(settings["tune_lr"]), "--rank", str(settings["rank"]), "--batch-size", str(settings["tune_batch"]),
              "--warmup", str(settings["tune_warmup"]), "--save-every", str(settings["tune_steps"]),
              "--seed", str(seed)]  # fmt: skip
    return common + TUNES[name]


def load_model(base, lora_file=None, scale=1.0):
    model = Flux2.from_pretrained(base, dtype=torch.float32)
    return lora.transform(lora_file, scale)(model) if lora_file else model


# ----------------------------------------------------------------------------------------------
# The run, top to bottom


def main(argv=None):
    p = ArgumentParser(description="Reproduce Sparse Context's claims at CPU scale (see the module docstring).")
    p.add_argument("--quick", action="store_true", help="tiny world and a few steps: a smoke run of every stage")
    p.add_argument("--work", default=None, help="caches, base model and fine-tunes (default: repro-work, repro-quick/work)")
    p.add_argument("--report", default=None, help="folder of REPRODUCTION.md and its figures (default: . or repro-quick)")
    p.add_argument("--seed", type=int, default=0, help="seeds the base, the fine-tunes and the training world")
    p.add_argument("--split", choices=("test", "val"), default=None,
                   help="photographs to report on: val while choosing anything, test (default) for the committed report")
    p.add_argument("--stage", choices=("base", "all"), default="all",
                   help="base: pretrain the base and print its competence gate, then stop (one world iteration)")
    p.add_argument("--ignore-gate", action="store_true",
                   help="go on to the fine-tunes although the base fails the gate (the report says so first)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads (1 is much faster while other processes compete for the cores)")
    args = p.parse_args(argv)
    if not 1 <= args.threads <= 1024:
        p.error(f"--threads must be in [1, 1024], got {args.threads}")
    for name in ("ignore_gate", "split", "report"):  # --stage base stops at the gate: these cannot apply
        if args.stage == "base" and getattr(args, name) not in (None, False):
            p.error(f"--{name.replace('_', '-')}: --stage base stops at the validation gate and writes no report")
    args.split = args.split or "test"
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    report = args.report or ("repro-quick" if args.quick else "." if args.split == "test" else "repro-val")
    work = args.work or ("repro-quick/work" if args.quick else "repro-work")
    for name in (report, work):
        if os.path.exists(name) and not os.path.isdir(name):
            sys.exit(f"error: {name} exists and is not a folder")
    start, stages = time.perf_counter(), {}

    def lap(stage):
        stages[stage] = time.perf_counter() - sum(stages.values()) - start

    cache, base = os.path.join(work, "train-cache"), os.path.join(work, "base.safetensors")
    cache_key = json.dumps(dict(train_pool=settings["train_pool"], seed=args.seed, world=WORLD, compact=COMPACT, downscale="area"))
    if not stamped(cache + ".json", cache_key):
        shutil.rmtree(cache, ignore_errors=True)
        write_cache(cache, make_split("train", settings["train_pool"] // 3, args.seed))
        write_atomic(cache + ".json", cache_key)  # last: a killed run rebuilds the cache
    val = make_split("val", settings["test_per_task"], 4321)
    test = make_split("test", settings["test_per_task"], 1234) if args.split == "test" else val  # fixed examples and seeds
    lap("world")
    timings = os.path.join(work, "training-seconds.json")  # what the cached stages took when they ran
    trained = json.load(open(timings)) if os.path.isfile(timings) else {}
    status = pretrain(base, cache, settings, args.seed)
    print(f"base: {status}")
    lap("base")
    trained["base"] = stages["base"] if status == "trained" else trained.get("base")
    write_atomic(timings, json.dumps(trained))
    dense = dense_scores(load_model(base), val, settings)
    gates, check = {"val": gate(val, dense)}, redundancy(val, dense, settings["seeds"])
    failing = [k for k, (m, g) in gates["val"].items() if m - g < GATE_DB]
    print(gate_table(gates))
    print(redundancy_table(check))
    lap("gate")
    topi = calibrate_topi(load_model(base), val, os.path.join(work, f"topi-{digest(base_key(settings, args.seed))}.json"),
                          settings["sample_steps"])  # keyed by what made the base
    print(f"ToPi calibration of the base: block {topi['block']}, queries {topi['queries']}, sigma {topi['sigma']:.3f}")
    if failing and not args.ignore_gate:
        sys.exit(f"error: the dense base is less than {GATE_DB:g} dB above grey on {len(failing)} validation prompt(s) "
                 f"({'; '.join(failing)}): no claim about dropping can stand on it (--ignore-gate goes on anyway)")
    if args.stage == "base":
        return

    runs = {name: os.path.join(work, "runs", name) for name in TUNES}
    # One thread per train.py, as many at once as this run has threads: a small model's step gains less
    # from a second thread than from a second run beside it.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(args.threads, len(TUNES))) as pool:
        jobs = [pool.submit(fine_tune, name, base, cache, runs[name], settings, args.seed, 1) for name in TUNES]
        statuses = [job.result()[1] for job in jobs]
    lap("fine-tunes")
    trained["fine-tunes"] = stages["fine-tunes"] if "trained" in statuses else trained.get("fine-tunes")
    write_atomic(timings, json.dumps(trained))

    lora_file = lambda n: os.path.join(runs[n], "pytorch_lora_weights.safetensors")
    models = {"base": load_model(base)} | {n: load_model(base, lora_file(n)) for n in TUNES}
    models |= {"drop@0.5": load_model(base, lora_file("drop"), 0.5), "base-kv": models["base"]}
    if args.split == "test":
        gates["test"] = gate(test, dense_scores(models["base"], test, settings))
    rescore = RESCORE_STEPS if args.split == "val" else (RESCORE_STEP,)  # chosen on validation
    rescore = tuple(k for k in rescore if k < settings["sample_steps"]) or (settings["sample_steps"] // 2,)  # --quick: 2 steps
    results, images, truth = evaluate(models, test, settings, topi=topi, rescore_steps=rescore)
    s = summarize(results)
    floor = grey_floor(test, truth)
    lap("evaluation")
    speed = time_sampling(models["drop"], test, settings, 3) + time_sampling(models["drop"], test, settings, 6)
    lap("timing")

    os.makedirs(os.path.join(report, "reproduction"), exist_ok=True)
    figures = [os.path.join("reproduction", f) for f in ("quality_vs_keep.png", "quality_vs_speed.png", "lora_loss.png")]
    plot_quality(os.path.join(report, figures[0]), s, MODELS + ("drop-kv", "fill"), floor)
    plot_speed(os.path.join(report, figures[1]), s, speed)
    plot_losses(os.path.join(report, figures[2]), runs)
    for task in TASKS:
        figures.append(os.path.join("reproduction", f"grid_{task}.png"))
        image_grid(os.path.join(report, figures[-1]), task, test, images, truth)
    v = verdicts(s, results, speed)
    lap("report")
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads", command=shlex.join(["python", "reproduce.py", *(sys.argv[1:] if argv is None else argv)]),
                seconds=time.perf_counter() - start, stages=stages, cfg=settings["cfg"], settings=settings,
                params=sum(p.numel() for p in models["base"].parameters()), trained=trained, tune_cmd=shlex.join(tune_command("drop", base, cache, "OUT", settings, args.seed)),
                split=args.split, floor=floor, gates=gates, failing=failing, redundancy=check, topi=topi, rescore=rescore, cached=[k for k, st in (("base", status), ("fine-tunes", statuses))
                                                             if "trained" not in st])  # fmt: skip
    world = __doc__.split("The world.")[1].split("The models")[0].strip()  # the report quotes this docstring
    write_report(os.path.join(report, "REPRODUCTION.md"), figures, s, speed, v, info, MODELS + ("base-kv", "drop-kv", "fill"),
                 world, WORLD_CHOICES + "\n\n" + TUNE_CHOICES)
    results_json = {"|".join(map(str, k)): v for k, v in s.items()}
    write_atomic(os.path.join(report, "reproduction", "results.json"),
               json.dumps(dict(summary=results_json, speed=speed, verdicts=v, info=info), indent=1))
    for k, (verd, lines) in v.items():
        print(f"claim {k}: {verd}: " + "; ".join(lines))
    print(f"wrote {os.path.join(report, 'REPRODUCTION.md')} in {(time.perf_counter() - start) / 60:.1f} min: "
          + ", ".join(f"{k} {t:.0f} s" for k, t in stages.items()))  # fmt: skip


if __name__ == "__main__":
    main()
