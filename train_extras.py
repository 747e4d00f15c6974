"""What train.py does beside training, plugged into its loop as hooks: a validation loss, preview sheets and
a loss plot. Each hook is called as hook(record, model) after every optimizer step with that step's log
record (step, loss, ...), and once before the first step of a run with {"step": 0}, on every process; it
returns the fields it adds to the record ({} when the step is not one of its own).

    --val-data V [--val-every 100] [--val-keep 0.1]   validation loss, dense and sparse, logged as val_dense, val_sparse
    --sample-file F [--sample-every 250] [--sample-keep 0.1] [--sample-steps 20]   OUT/samples/step_XXXXXX.png
    (with --val-data) OUT/loss.png: the training and validation losses, drawn at the last step

Validation: every held-out example (a manifest, cached into OUT/val-cache, or a cache) at 4 fixed sigmas,
the midpoints of the quartiles of training's sigma distribution (logit-normal, shifted for the example's
target size), with noise and kept tokens drawn from generators keyed by ("val", example, sigma): the same
draws at every step, in every run and whatever --seed, so two runs' curves compare exactly. Dense keeps
every reference token; sparse keeps --val-keep of each, uniformly (training's rule). The loss is
train.py's own flow_matching_loss of train.training_example, in the --kv pattern if training uses it. Work
is cut into forwards (examples of one shape, at most --batch-size) the same way for any number of
processes, dealt out round-robin, and every process's per-example losses are summed across processes into
a table where each entry has one contributor (x + 0 = x): the logged means are bitwise the one-process ones.

Previews: a JSONL file, one preview a line, paths relative to it:
    {"prompt": "make the jacket red", "references": ["in/jacket.png"], "seed": 0, "task": "edit"}
seed (default 0) fixes the noise and the token selection; task picks the selector as sample.py's --task
does (edit: canny, subject: saliency; default edit). Each preview is sampled with the current LoRA dense
and keeping --sample-keep of each reference, at the first reference's size, with --sample-steps steps and
the checkpoint's guidance (base klein: CFG 4). One sheet per step: a row per preview, its references, the
dense image, the kept tokens and the sparse image. Process 0 draws it; a sheet that exists (drawn before a
kill) is not drawn again. The seconds each hook took are logged (val_seconds, sample_seconds).

Memory: the preview prompts and references are encoded once, before the transformer loads (the text
encoder, 8B parameters for klein-9B, is loaded and freed then, as data.py's caching does). The VAE
(84M parameters, 0.16 GiB in bf16, next to the 9B transformer's 16.9 GiB) stays loaded on process 0 to decode
every sheet: loading it again for each sheet would cost seconds of disk reads for nothing.

May import: train_run, data, files, klein, pipeline, vae, token_selectors. Not train.py, which imports this file:
the validation loss, made of train.py's own example and loss, lives there (train.validation_losses).
"""

import json
import os
import sys
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import CachedDataset, check_image, json_object, read_manifest
from files import check_file, remove_stale_temps, write_atomic
from klein import MAX_STEPS
from pipeline import (
    decode_latents,
    encode_inputs,
    encode_references,
    gather_references,
    load_references,
    output_size,
    resolve_source,
    sample_latents,
    sampling_defaults,
)
from token_selectors import Selector, draw_selection
from train_run import LOG, MAX_OPTIMIZER_STEPS, read_log
from vae import AutoEncoder

SELECTORS = {"edit": "canny", "subject": "saliency"}  # sample.py's --task rule
SAMPLE_FIELDS = {"prompt": str, "references": list, "seed": int, "task": str}
SHEETS, PLOT = "samples", "loss.png"
CELL = 192  # pixels of a sheet's image cell

# ----------------------------------------------------------------------------------------------
# Options: added to train.py's parser, checked before anything is read


def add_options(p):
    g = p.add_argument_group("validation and previews (train_extras.py)")
    g.add_argument("--val-data", default=None,
                   help="held-out examples: a latent cache folder or a JSONL manifest (cached to OUT/val-cache) (default: none)")
    g.add_argument("--val-every", type=int, default=None, help="validation loss every this many steps, and at step 0 and the last (default: 100)")
    g.add_argument("--val-keep", type=float, default=None, help="the sparse validation loss keeps this fraction of every reference (default: 0.1)")
    g.add_argument("--sample-file", default=None,
                   help="previews: JSONL of {prompt, references, seed, task} (train_extras.py) (default: none)")
    g.add_argument("--sample-every", type=int, default=None, help="a preview sheet every this many steps, and at step 0 and the last (default: 250)")
    g.add_argument("--sample-keep", type=float, default=None, help="the sparse previews keep this fraction of every reference (default: 0.1)")
    g.add_argument("--sample-steps", type=int, default=None, help=f"denoising steps of a preview, 1 to {MAX_STEPS} (default: 20)")


def check_options(p, args):
    """The values and combinations of add_options' options (p.error: one error line); fills the defaults."""
    for source, options, defaults in (("--val-data", ("val_every", "val_keep"), (100, 0.1)),
                                      ("--sample-file", ("sample_every", "sample_keep", "sample_steps"), (250, 0.1, 20))):  # fmt: skip
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) is not None]
        if getattr(args, source[2:].replace("-", "_")) is None:
            if given:
                p.error(f"{', '.join(given)} cannot apply without {source}")
            continue
        for o, d in zip(options, defaults):
            setattr(args, o, d if getattr(args, o) is None else getattr(args, o))
    for name, high in (("val_every", MAX_OPTIMIZER_STEPS), ("sample_every", MAX_OPTIMIZER_STEPS), ("sample_steps", MAX_STEPS)):
        if getattr(args, name) is not None and not 1 <= getattr(args, name) <= high:
            p.error(f"--{name.replace('_', '-')} must be in [1, {high}], got {getattr(args, name)}")
    for name in ("val_keep", "sample_keep"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")


def check_files(args):
    """--val-data and --sample-file read and checked, and --model able to encode them, before any model loads."""
    if args.val_data is not None:
        if not os.path.exists(args.val_data):
            raise FileNotFoundError(f"--val-data {args.val_data}: no such manifest or cache folder")
        if os.path.isdir(args.val_data):
            CachedDataset(args.val_data)
        else:
            read_manifest(args.val_data, args.skip_bad)
            check_repository(args.model, "--val-data (a manifest to cache)")
    if args.sample_file is not None:
        read_sample_file(args.sample_file)
        check_repository(args.model, "--sample-file")


def check_repository(model, option):
    """A local --model must be a klein repository folder (vae/, text_encoder/, tokenizer/) to encode images and prompts."""
    if os.path.exists(model):
        missing = [d for d in ("vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(model, d))]
        if missing:
            raise ValueError(f"{option} needs --model to be a klein repository folder; {model} has no {', '.join(d + '/' for d in missing)}")


def read_sample_file(path):
    """The previews of a sample file, every line checked; bad lines are one ValueError naming each, with a count."""
    check_file(path, "--sample-file")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--sample-file {path} is not UTF-8 text (byte {e.start})") from None
    previews, errors = [], []
    for line, text in enumerate(lines, start=1):
        if text.strip():
            preview, problem = sample_line(text, folder)
            if problem:
                errors.append(f"{path} line {line}: {problem}")
            else:
                previews.append(preview)
    if errors:
        head = [] if len(errors) == 1 else [f"{len(errors)} bad lines in --sample-file {path}:"]
        raise ValueError("\n".join(head + errors))
    if not previews:
        raise ValueError(f"--sample-file {path} holds no preview")
    return previews


def sample_line(text, folder):
    record, problem = json_object(text)
    if problem:
        return None, problem
    unknown = sorted(set(record) - set(SAMPLE_FIELDS))
    if unknown:
        return None, f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(SAMPLE_FIELDS)}"
    record = dict(seed=0, task="edit") | record
    for name, kind in SAMPLE_FIELDS.items():
        if name not in record:
            return None, f"missing field {name!r}"
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return None, f"field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}"
    if not record["references"] or not all(isinstance(r, str) for r in record["references"]):
        return None, "field 'references' must be a non-empty list of image paths"
    if record["task"] not in SELECTORS:
        return None, f"unknown task {record['task']!r}; expected one of {', '.join(SELECTORS)}"
    if not 0 <= record["seed"] < 2**63:
        return None, f"field 'seed' must be in [0, 2^63), got {record['seed']}"
    record["references"] = [os.path.join(folder, r) for r in record["references"]]
    problem = next((p for p in map(check_image, record["references"]) if p), None)
    return (None, problem) if problem else (record, None)


# The hooks


def is_due(step, every, last):
    """A hook's step: every `every` steps, step 0 and the last."""
    return step % every == 0 or step == last


class Previews:
    """Preview sheets every --sample-every steps (and at step 0 and the last), drawn by process 0."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.previews = read_sample_file(args.sample_file)
        folder = resolve_source(args.model)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.steps, self.guidance = sampling_defaults(folder, args.sample_steps, None)
        self.images = [load_references(p["references"]) for p in self.previews]
        with torch.no_grad():  # the text encoder now, once, and never beside the transformer; the VAE stays
            self.txts, self.neg, _ = encode_inputs(folder, [p["prompt"] for p in self.previews], [], self.guidance > 1, dtype, device)
            self.vae = AutoEncoder.from_pretrained(folder, dtype=dtype, device=device)
            self.encoded = [encode_references(self.vae, images, device, dtype) for images in self.images]
        self.kept = [Selector(SELECTORS[p["task"]], seed=p["seed"])(images, [args.sample_keep] * len(images))
                     for p, images in zip(self.previews, self.images)]  # fmt: skip
        self.folder = os.path.join(args.out, SHEETS)
        remove_stale_temps(self.folder)  # a kill while a sheet was written

    def __call__(self, record, model):
        step = record["step"]
        if not is_due(step, self.args.sample_every, self.args.steps):
            return {}
        path = os.path.join(self.folder, f"step_{step:06d}.png")
        if os.path.exists(path):
            tqdm.write(f"step {step}: {path} was drawn before the run was resumed; not drawn again")
            return {}
        start = time.perf_counter()
        rows = []
        for preview, images, encoded, kept in zip(self.previews, self.images, self.encoded, self.kept):
            h, w = output_size(images, None, None)
            dense, sparse = (self.sample(model, preview, encoded, k, h, w) for k in ([None] * len(images), kept))
            rows.append((preview["prompt"], images, kept, dense, sparse))
        write_atomic(path, draw_sheet(f"step {step}", rows, self.args.sample_keep))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return dict(sample_seconds=round(time.perf_counter() - start, 3))

    @torch.no_grad()
    def sample(self, model, preview, encoded, kept, h, w):
        ref, ref_ids = gather_references(encoded, kept)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            latents = sample_latents(model, [(preview["prompt"], preview["seed"])], self.txts, h, w, self.steps, ref, ref_ids,
                                     guidance=self.guidance, neg=self.neg)  # fmt: skip
            return decode_latents(self.vae, latents, h, w)[0]


def fit(image, size=CELL):
    """image scaled to fit a size x size cell, centred on grey."""
    scale = size / max(image.size)
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (size, size), (128, 128, 128))
    cell.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return cell


def draw_sheet(title, rows, keep):
    """One sheet: a row per preview (prompt, references, dense image, kept tokens, sparse image)."""
    n = max(len(images) for _, images, _, _, _ in rows)
    heads = ["references"] + [""] * (n - 1) + ["dense"] + [f"kept tokens (keep {keep})"] + [""] * (n - 1) + [f"keep {keep}"]
    pad, text = 6, 14
    width, row_height = pad + len(heads) * (CELL + pad), text + CELL + pad
    sheet = Image.new("RGB", (width, 2 * text + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 2), title, fill="black")
    for c, head in enumerate(heads):
        draw.text((pad + c * (CELL + pad), text + 2), head, fill="black")
    for r, (prompt, images, kept, dense, sparse) in enumerate(rows):
        top = 2 * text + r * row_height
        draw.text((pad, top + 1), prompt[: width // 7], fill="black")
        blank = Image.new("RGB", (CELL, CELL), "white")
        selected = [draw_selection(im, k) if k is not None else im for im, k in zip(images, kept)]
        cells = [*images, *[blank] * (n - len(images)), dense, *selected, *[blank] * (n - len(images)), sparse]
        for c, image in enumerate(cells):
            sheet.paste(fit(image) if image is not blank else blank, (pad + c * (CELL + pad), top + text))
    return sheet


class LossPlot:
    """OUT/loss.png at the last step: the training loss (and its running mean) and the validation losses, by step.
    Drawn before the last save, so a kill between the two draws it again, the same, on --resume."""

    def __init__(self, out, steps, keep):
        self.out, self.steps, self.keep = out, steps, keep

    def __call__(self, record, model):
        if record["step"] == self.steps:
            records = [json.loads(line) for line in read_log(os.path.join(self.out, LOG), self.steps - 1)] + [record]
            plot_losses(records, os.path.join(self.out, PLOT), self.keep)
        return {}


def plot_losses(records, path, keep):
    """The losses of log records as a PNG at path, atomically; without matplotlib (a dev dependency), a message."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install matplotlib)", file=sys.stderr)
        return
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps, loss = [r["step"] for r in records if "loss" in r], [r["loss"] for r in records if "loss" in r]
    if loss:
        ax.plot(steps, loss, color="0.7", lw=0.8, label="training loss")
        window = len(loss) // 20
        if window > 1:
            mean = [sum(loss[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(loss))]
            ax.plot(steps, mean, color="0.2", lw=1.2, label=f"training loss, running mean of {window} steps")
    val = [r for r in records if "val_dense" in r]
    ax.plot([r["step"] for r in val], [r["val_dense"] for r in val], "o-", color="tab:blue", label="validation, dense")
    ax.plot([r["step"] for r in val], [r["val_sparse"] for r in val], "s-", color="tab:orange", label=f"validation, keep {keep}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
