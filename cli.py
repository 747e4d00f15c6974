"""What the sampling command lines share (sample.py, compare.py): their common options, the checks
of every value before any model loads (a bad one is one `error:` line naming its option), and the
Klein (checkpoint, 8-bit weights, LoRA, compile) and selector they build from those options.

The library (pipeline.py and what it imports) never sees a command line; only scripts import this.

May import: files, klein, checkpoints, model, lora, quant, token_selectors, pipeline, attention_selector,
calibrate.
"""

import functools
import sys

import torch

from attention_selector import QUERIES, AttentionSelector
from calibrate import load_calibration
from checkpoints import load_checkpoint
from files import DTYPES, check_number, check_writable, image_format
from klein import MAX_STEPS
from lora import check_lora_file
from lora import transform as lora_transform
from model import Flux2
from pipeline import LATENT_CAUSES, Klein, is_distilled, load_references, resolve_source, sampling_defaults, sampling_device
from quant import from_pretrained as load_8bit
from token_selectors import Selector

MAX_SIDE = 4096  # output pixels a side (klein generates up to 4 megapixels)
MAX_IMAGES = 10000  # images per run
COMPILE_BUCKET = 64  # with --compile, kept reference-token counts round up to a multiple of this


def add_common_args(p):
    """Options sample.py and compare.py share. None defaults let the checks tell given from default."""
    p.add_argument("--model", required=True, help="klein repository folder or hub id, e.g. black-forest-labs/FLUX.2-klein-4B (required)")
    p.add_argument("--ref", action="extend", nargs="+", default=[], metavar="IMAGE",
                   help="reference image(s), repeatable (--ref a.png b.png and --ref a.png --ref b.png both give two); "
                        "reference k gets position t = 10 (k + 1) (default: none)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps, 1 to {MAX_STEPS} (default: 4 distilled, 50 base)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, >= 1; 1 turns CFG off (default: 1 distilled, 4 base)")
    p.add_argument("--height", type=int, default=None, help=f"output height, 16 to {MAX_SIDE}, floored to a multiple of 16 (default: first reference's, else 1024)")
    p.add_argument("--width", type=int, default=None, help=f"output width, 16 to {MAX_SIDE}, floored to a multiple of 16 (default: first reference's, else 1024)")
    p.add_argument("--kv-cache", action="store_true", help="extract the reference K/V once and reuse them for every step and image (klein-9b-kv) (default: off)")
    p.add_argument("--task", default=None, choices=["edit", "subject"], help="task that picks the auto selector (default: edit)")
    p.add_argument("--uniform-mix", type=float, default=None, help="share of uniform probability mixed into the selector's, in [0, 1] (default: 0.25)")
    p.add_argument("--budget", default=None, choices=["uniform", "adaptive"], help="token budget across references: uniform (each its own --keep) or adaptive (one total split by structure) (default: uniform)")
    p.add_argument("--selection-seed", type=int, default=None, help="seed of the token selection, shared by every image (default: 0)")
    p.add_argument("--lora", default=None, help="LoRA file (diffusers, BFL/ai-toolkit or kohya format) (default: none)")
    p.add_argument("--lora-scale", type=float, default=None, help="LoRA strength, needs --lora (default: 1)")
    p.add_argument("--lora-merge", action="store_true",
                   help="merge the LoRA into 16-bit weights too (default: merged only into fp32 weights; bf16/fp16 ones keep "
                        "it unmerged, since a merge rounds updates below half a bf16 step away)")  # fmt: skip
    p.add_argument("--attention-queries", default=None, choices=QUERIES,
                   help="the attention selector's queries: target, text, both, or references (with --kv-cache: their mutual "
                        "attention, the same for every prompt) (default: target)")  # fmt: skip
    p.add_argument("--attention-block", type=int, default=None,
                   help="the block whose attention the attention selector reads, 0-based over double then single blocks (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights and activations; fp16 is refused (klein overflows it) (default: bf16 on GPU, fp32 on CPU)")


def check_sampling(prompts, seeds, n_refs, steps=None, guidance=None, height=None, width=None, keep=1.0,
                   uniform_mix=0.25, budget="uniform", kv_cache=False, save_selection=None, lora=None,
                   lora_scale=1.0, batch_size=1):  # fmt: skip
    """Every sampling value and combination, each error naming its option."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("give at least one prompt (--prompt or --prompts FILE), each a string")
    if not seeds:
        raise ValueError("give at least one seed")
    for s in seeds:
        check_number("--seed", s, 0, 2**63 - 1, integer=True)
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds repeats a seed: {list(seeds)}")
    check_number("number of images (prompts x seeds)", len(prompts) * len(seeds), 1, MAX_IMAGES, integer=True)
    if steps is not None:
        check_number("--steps", steps, 1, MAX_STEPS, integer=True)
    if guidance is not None:
        check_number("--guidance", guidance, 1)
    for option, v in (("--height", height), ("--width", width)):
        if v is not None:
            check_number(option, v, 16, MAX_SIDE, integer=True)
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep]
    for k in keeps:
        check_number("--keep", k, 0, 1, low_open=True)
    check_number("--uniform-mix", uniform_mix, 0, 1)
    check_number("--lora-scale", lora_scale)
    check_number("--batch-size", batch_size, 1, MAX_IMAGES, integer=True)
    if n_refs == 0:
        given = [o for o, v in (("--keep", keeps != [1.0]), ("--kv-cache", kv_cache), ("--save-selection", save_selection)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} cannot apply without a reference image (--ref)")
    elif len(keeps) not in (1, n_refs):
        raise ValueError(f"--keep has {len(keeps)} values for {n_refs} reference images: give one, or one per reference")
    if budget == "adaptive" and len(keeps) > 1:
        raise ValueError("--budget adaptive splits one total fraction across references by structure: give one "
                         "--keep value (or use --budget uniform for per-reference values)")  # fmt: skip
    if save_selection is not None:
        image_format(save_selection)
        check_writable(save_selection, "--save-selection")
    if lora is not None:
        check_lora_file(lora)


def check_common(args, sparse, attention=False):
    """Checks of the shared options that need no model weights; returns (device, dtype). sparse: tokens
    are dropped; attention: the attention selector runs."""
    if not args.ref:
        given = [o for o, v in (("--task", args.task), ("--uniform-mix", args.uniform_mix), ("--budget", args.budget),
                                ("--selection-seed", args.selection_seed), ("--kv-cache", args.kv_cache)) if v is not None and v is not False]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} cannot apply without a reference image (--ref)")
    elif not sparse:
        given = [o for o, v in (("--task", args.task), ("--uniform-mix", args.uniform_mix), ("--budget", args.budget),
                                ("--selection-seed", args.selection_seed)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} cannot apply with --keep 1 (no token is dropped)")
    if args.lora is None and (args.lora_scale is not None or args.lora_merge):
        raise ValueError(f"{'--lora-scale' if args.lora_scale is not None else '--lora-merge'} cannot apply without --lora")
    if args.selection_seed is not None:
        check_number("--selection-seed", args.selection_seed, 0, 2**63 - 1, integer=True)
    calibration, rescore = getattr(args, "attention_calibration", None), getattr(args, "attention_rescore_step", None)
    given = [o for o, v in (("--attention-queries", args.attention_queries), ("--attention-block", args.attention_block),
                            ("--attention-calibration", calibration), ("--attention-rescore-step", rescore)) if v is not None]  # fmt: skip
    if given and not (attention and sparse):
        raise ValueError(f"{', '.join(given)} cannot apply without the attention selector and a keep below 1")
    if calibration is not None and (args.attention_queries is not None or args.attention_block is not None):
        raise ValueError("--attention-calibration sets the block and queries: give it or --attention-block/--attention-queries, not both")
    device, dtype = sampling_device(args.device, args.dtype)  # its errors name "device"/"dtype": fail() adds the --
    try:
        load_references(args.ref)  # every reference exists, is an image and has a usable size
    except (OSError, ValueError) as e:
        raise ValueError(f"--ref: {e}") from None
    folder = resolve_source(args.model)
    is_distilled(folder)
    cfg = load_checkpoint(getattr(args, "transformer", None) or folder)[0]  # the config, checked; weights memory-mapped, unread
    if args.attention_block is not None:
        check_number("--attention-block", args.attention_block, 0, cfg.depth + cfg.depth_single - 1, integer=True)
    if calibration is not None:
        kv = load_calibration(calibration, cfg.depth + cfg.depth_single)["kv_cache"]
        if kv is not None and kv != bool(args.kv_cache):
            raise ValueError(f"attention calibration file {calibration} was calibrated {'with' if kv else 'without'} --kv-cache "
                             f"(the references' attention pattern): sample {'with' if kv else 'without'} it, or calibrate again")  # fmt: skip
    if rescore is not None:
        check_rescore_step(rescore, sampling_defaults(folder, args.steps, args.guidance)[0])
    return device, dtype


# the library's words for what an option sets -> the options
FLAGS = {LATENT_CAUSES: "the LoRA (--lora, --lora-scale), non-finite transformer weights, or --guidance"}


def flagged(e):
    """A library error, its words for an option replaced by the option's name (for the `error:` line)."""
    message = str(e)
    for words, flags in FLAGS.items():
        message = message.replace(words, flags)
    return type(e)(message)


def check_rescore_step(step, steps):
    if steps < 2:
        raise ValueError(f"--attention-rescore-step needs at least 2 denoising steps (--steps), not {steps}")
    check_number("--attention-rescore-step", step, 1, steps - 1, integer=True)


def warn_slow_dtype(device, dtype):
    if device.type == "cpu" and dtype != torch.float32:
        print(f"warning: {str(dtype).removeprefix('torch.')} on a CPU without native bf16 (AVX512-BF16, AMX) is many "
              "times slower than fp32 (the VAE up to 100x); use --dtype fp32 unless memory is short", file=sys.stderr)  # fmt: skip


def compiled(model):
    """torch.compile of the transformer forward (fullgraph, static shapes): a run's shapes are fixed, so it
    compiles once (twice with the KV cache: extraction and cached steps)."""
    model.compile(fullgraph=True, dynamic=False)
    return model


def build_klein(args, batch_size=1, compile=False, weights=None, transformer=None):
    """The pipeline.Klein of the checked options: --model, --transformer, --weights, --lora, --compile."""
    transforms = []
    if args.lora:
        transforms.append(lora_transform(args.lora, 1.0 if args.lora_scale is None else args.lora_scale,
                                         True if args.lora_merge else None))  # fmt: skip
    if compile:
        transforms.append(compiled)
    load = Flux2.from_pretrained if weights is None else functools.partial(load_8bit, weights=weights)
    return Klein(args.model, transformer=transformer, load=load, transforms=tuple(transforms), batch_size=batch_size)


def build_selector(args, name, compile=False, calibration=None):
    """The selector of the checked options: name "auto" takes canny for --task edit, saliency for subject;
    "attention" the AttentionSelector (its block, queries and sigma from the options or a calibration).
    With --compile each kept count rounds up to a multiple of COMPILE_BUCKET (or all tokens), so a
    process sampling many keeps compiles a bounded number of shapes."""
    if name == "auto":  # structure for editing, the salient subject for personalization
        name = "canny" if (args.task or "edit") == "edit" else "saliency"
    rule = Selector(name, 0.25 if args.uniform_mix is None else args.uniform_mix, args.budget or "uniform",
                    args.selection_seed or 0, COMPILE_BUCKET if compile else 1)  # fmt: skip
    if name != "attention":
        return rule
    how = calibration or dict(block=args.attention_block or 0, queries=args.attention_queries or "target", sigma=None)
    return AttentionSelector(rule, how["queries"], how["block"], how["sigma"])

