"""Run management for train.py: its processes, its output folder and what --resume needs. train.py is the
loop; this file is what lets that loop run under torchrun, be killed at any instant and resumed exactly.

  - processes: `run_processes` (torchrun starts one process per GPU; alone, there is no process group;
    an error in one process ends them all), `node_first` (one download per node), `open_data` (process 0
    caches a manifest while the others wait);
  - before any model loads, `check_run` reads --out, the transformer's config, the LoRA layout (on the
    meta device) and the checkpoint, and refuses what does not fit this run;
  - outputs: `save` writes the checkpoint, then the LoRA file, each atomically; the checkpoint is the
    truth and records the LoRA file's hash. `resume` restores it and repairs what a kill left in --out:
    temporaries, an older LoRA file, log lines after the checkpoint's step or cut short.

May import: the standard library, torch, files, data, checkpoints, model, lora. Not train.py (it imports this).
"""

import contextlib
import datetime
import gc
import hashlib
import io
import json
import os
import sys

import torch
import torch.distributed as dist

import lora
from checkpoints import load_checkpoint
from data import CachedDataset, check_out_dir, encode_manifest, read_manifest
from files import STALE_TEMP, check_file, field, read_json, remove_stale_temps, write_atomic
from model import Flux2, Flux2Config

CHECKPOINT, LORA_FILE, LOG = "checkpoint.pt", "pytorch_lora_weights.safetensors", "log.jsonl"
CACHES = ("cache", "val-cache")  # --data and --val-data manifests, cached
EXTRAS = ("samples", "loss.png")  # train_extras' outputs: what a run writes before its first save, beside LOG
MAX_OPTIMIZER_STEPS = 10**8  # bounds --steps, --warmup and --save-every
DIST_TIMEOUT_MINUTES = 240  # caching a large manifest on process 0 takes hours; NCCL's default is 10 minutes
# what defines a run: --resume refuses to change these (the number of processes may change)
RUN = (
    "rank", "alpha", "targets", "lr", "weight_decay", "warmup", "max_grad_norm", "keep_range", "keep_all_prob", "compact", "kv", "seed",
    "weights",
)  # fmt: skip


class NonFiniteError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Processes


def init_distributed(timeout_minutes=DIST_TIMEOUT_MINUTES):
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR; NCCL on
    GPUs, gloo on CPUs."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cuda = torch.cuda.is_available()
    world = env["WORLD_SIZE"] or "1"
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"WORLD_SIZE={world!r} must be a positive integer")
    if int(world) == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    unset = [k for k, v in env.items() if not (v or "").strip()]
    if unset or not env["LOCAL_RANK"].isdigit():
        raise ValueError(f"WORLD_SIZE={world} without {', '.join(unset) or 'a valid LOCAL_RANK'}: "
                         f"start the processes with torchrun --nproc_per_node {world} train.py ...")
    local = int(env["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    # the timeout bounds every collective, the barrier while process 0 caches a manifest included
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def run_processes(fn, args):
    """fn(args, rank, world, device) in this process, alone or as one of torchrun's. An error in one of
    several processes ends it at once, with its message: the others would wait in their next collective,
    and torchrun stops them all."""
    rank, world, device = init_distributed(args.dist_timeout)
    try:
        fn(args, rank, world, device)
    except BaseException as e:
        if world > 1:
            print(f"error: process {rank}: {e}" if isinstance(e, (ValueError, OSError)) else f"process {rank} failed: {e!r}",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(1)
        raise
    if world > 1:
        dist.destroy_process_group()


def barrier(world):
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def node_first(world):
    """Process 0 of each node runs the block first, the node's others after it: a hub id is fetched once per node."""
    first = os.environ.get("LOCAL_RANK", "0") == "0"
    if not first:
        barrier(world)
    yield
    if first:
        barrier(world)


def open_data(args, rank, world, device, data=None, cache="cache"):
    """The training examples (data: another --data, e.g. --val-data, cached into OUT/<cache>): a cache
    folder as it is; a manifest cached into OUT/cache first, by process 0 while the others wait."""
    data = args.data if data is None else data
    if os.path.isdir(data):
        return CachedDataset(data)
    read_manifest(data, args.skip_bad)  # every line checked, on every process, before any model loads
    cache = os.path.join(args.out, cache)
    problem = None
    if rank == 0:
        try:
            encode_manifest(data, args.model, cache, args.max_area, args.skip_bad, device, args.compact)
        except (ValueError, OSError) as e:
            problem = str(e)
        gc.collect()  # the encoders are gone: free their memory before the transformer loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if world > 1:  # the others wait for process 0, and learn whether it succeeded
        message = [problem]
        dist.broadcast_object_list(message, src=0)
        problem = message[0]
    if problem is not None:
        raise ValueError(problem)
    return CachedDataset(cache)


# ----------------------------------------------------------------------------------------------
# Checks: everything is read and validated before any model loads


def check_run(args, rank, world):
    """(transformer config, run settings, checkpoint state or None: start at step 0), all checked against
    each other before any model loads; None when a --resume'd run already reached --steps and its LoRA
    file is current (a requeued job that had finished: nothing to do)."""
    state = check_out(args)
    with node_first(world):
        fields, _ = load_checkpoint(args.model)  # the transformer's config, checked; weights memory-mapped, unread
    cfg = Flux2Config(**fields)
    index = os.path.join(args.model, "model_index.json")
    if rank == 0 and os.path.isfile(index) and read_json(index).get("is_distilled") is True:
        print(f"warning: {args.model} is a step-distilled checkpoint (model_index.json: is_distilled); the flow-matching "
              "loss spans every sigma, which distilled klein was not trained on: train a base one "
              "(FLUX.2-klein-base-4B, -base-9B)", file=sys.stderr)  # fmt: skip
    with torch.device("meta"):  # the LoRA layout, without weights: checks --targets and the checkpoint
        probe = Flux2(cfg).requires_grad_(False)
    lora.inject(probe, args.targets, args.rank, args.alpha, args.seed)
    shapes = {n: p.shape for n, p in probe.named_parameters() if p.requires_grad}
    run = {k: getattr(args, k) for k in RUN} | dict(targets=list(args.targets), keep_range=list(args.keep_range))
    run["global_batch"] = args.batch_size * args.grad_accum * world
    if state is not None:
        check_checkpoint(state, os.path.join(args.out, CHECKPOINT), run, shapes)
        start = state["step"]
        if args.steps < start:
            raise ValueError(f"--steps {args.steps}: the run in {args.out} is already at step {start}; "
                             f"pass --steps {start} or more")
        lora_path = os.path.join(args.out, LORA_FILE)
        if args.steps == start and lora_is_current(lora_path, state):
            if rank == 0:
                print(f"the run in {args.out} is already at step {start} (--steps): nothing to do; its LoRA: {lora_path}")
            return None
    barrier(world)  # every process has looked at --out before process 0 writes anything
    return cfg, run, state


def check_out(args):
    """The checkpoint state to resume from, or None to start at step 0, from what --out holds."""
    check_out_dir(args.out)
    checkpoint = os.path.join(args.out, CHECKPOINT)
    if os.path.lexists(checkpoint):
        if not args.resume:
            raise ValueError(f"{args.out} already holds a run: pass --resume to continue it, or choose another --out")
        return read_checkpoint(checkpoint)
    held = sorted(n for n in (os.listdir(args.out) if os.path.isdir(args.out) else []) if not STALE_TEMP.fullmatch(n))
    if args.resume and os.path.isdir(args.out) and set(held) <= {LOG, *CACHES, *EXTRAS}:
        print(f"{args.out} has no {CHECKPOINT} yet (the run stopped before its first save): starting at step 0", file=sys.stderr)
        return None
    if args.resume:
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {args.out}")
    if set(held) - set(CACHES):  # OUT/cache alone: a manifest caching that was interrupted, resumable
        raise ValueError(f"--out {args.out} holds {', '.join(held)} but no {CHECKPOINT}: choose an empty or new folder "
                         f"(or pass --resume if a run of this command was interrupted before its first save)")
    return None


def read_checkpoint(path):
    """checkpoint.pt as plain tensors and numbers (weights_only: loading runs no code), its structure
    checked; one error naming the file (and field) whatever is wrong with it."""
    check_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read checkpoint {path} (damaged, or not written by train.py): {reason}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} must hold a dict, got {type(state).__name__}")
    if field(state, "step", path) > MAX_OPTIMIZER_STEPS:
        raise ValueError(f"{path}: field 'step' is {state['step']}, above {MAX_OPTIMIZER_STEPS}")
    for name in ("run", "lora", "optimizer"):
        field(state, name, path, dict)
    field(state, "lora_file_sha256", path, str)
    return state


def check_checkpoint(state, path, run, shapes):
    """A checkpoint fits this run: the same settings, a finite LoRA of the shapes `shapes` ({name: shape},
    in parameter order), AdamW state for those parameters. Non-finite values are refused: resuming
    them would only train NaN further."""
    changed = [f"{k} {state['run'].get(k)} -> {v}" for k, v in run.items() if state["run"].get(k) != v]
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint's: {', '.join(changed)}")
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state["lora"].items()}
    if got != {k: tuple(s) for k, s in shapes.items()}:
        wrong = sorted(set(got) ^ set(shapes) | {k for k in got if k in shapes and got[k] != tuple(shapes[k])})
        raise ValueError(f"{path}: field 'lora' does not fit the model and LoRA settings ({len(wrong)} tensors, e.g. {wrong[0]})")
    opt = state["optimizer"]
    groups, per_param = opt.get("param_groups"), opt.get("state")
    sizes = list(shapes.values())
    ok = isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
    ok = ok and groups[0].get("params") == list(range(len(sizes))) and isinstance(per_param, dict)
    ok = ok and all(
        i in range(len(sizes)) and isinstance(s, dict) and set(s) == {"step", "exp_avg", "exp_avg_sq"}
        and all(isinstance(s[k], torch.Tensor) for k in s) and s["step"].numel() == 1
        and tuple(s["exp_avg"].shape) == tuple(s["exp_avg_sq"].shape) == tuple(sizes[i])
        for i, s in per_param.items()
    )  # fmt: skip
    if not ok:
        raise ValueError(f"{path}: field 'optimizer' is not AdamW state for this LoRA")
    tensors = list(state["lora"].values()) + [t for s in per_param.values() for t in s.values()]
    if not all(t.is_floating_point() and torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"{path} holds non-finite or non-float values: it cannot be resumed")


def lora_is_current(path, state):
    """Whether the LoRA file is the one the checkpoint implies (a kill between the two leaves the old one)."""
    try:
        with open(check_file(path, "LoRA file"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == state["lora_file_sha256"]
    except (OSError, ValueError):
        return False


def read_log(path, last_step):
    """The lines of log.jsonl up to last_step: a resumed run drops what came after its checkpoint, and
    a line a kill cut short."""
    if not os.path.exists(path):
        return []
    check_file(path, "log")
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(step, int) and step <= last_step and line.endswith("\n"):
                kept.append(line)
    return kept


# ----------------------------------------------------------------------------------------------
# Outputs: the log, the checkpoint and the LoRA file


def append_log(out, record):
    """One line of OUT/log.jsonl. The first creates --out: bad data found in step 1 leaves nothing behind."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOG), "a") as f:
        f.write(json.dumps(record) + "\n")


def save(out, model, opt, step, run):
    """The checkpoint (LoRA, optimizer, step, settings), then the LoRA file. The checkpoint is the truth and
    records the LoRA file's hash, so --resume sees whether a kill left an older LoRA file behind.
    No RNG state: every draw is keyed by (seed, step, example), so the step is all a resumed run needs
    to repeat the uninterrupted one."""
    blob = lora.lora_file(model)
    lora_params = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = dict(step=step, run=run, lora=lora_params, optimizer=opt.state_dict(), lora_file_sha256=hashlib.sha256(blob).hexdigest())
    buffer = io.BytesIO()  # a file object: the archive inside is named the same every time
    torch.save(state, buffer)
    write_atomic(os.path.join(out, CHECKPOINT), buffer.getvalue())
    write_atomic(os.path.join(out, LORA_FILE), blob)


def resume(out, state, model, opt, rank):
    """The step to start from: 0, or a checked checkpoint's, its LoRA and AdamW state loaded into model and
    opt. Process 0 then repairs what a kill left in out: temporaries, a LoRA file older than the
    checkpoint (the kill fell between the two writes), log lines after the checkpoint's step (all of
    them, starting over) or cut short."""
    lora_path, log_path = os.path.join(out, LORA_FILE), os.path.join(out, LOG)
    start, stale = 0, False
    if state is not None:
        stale = not lora_is_current(lora_path, state)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["lora"][n])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    if rank == 0:
        remove_stale_temps(out)
        if stale:  # a kill between checkpoint and LoRA file: finish that save
            lora.save_lora(model, lora_path)
        if os.path.exists(log_path):  # no checkpoint: the run starts over, its step-0 line (train_extras) too
            write_atomic(log_path, "".join(read_log(log_path, start if state is not None else -1)))
    return start
