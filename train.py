"""Train a Sparse Context LoRA for FLUX.2 [klein]: references lose most of their tokens at random.

    python train.py --model black-forest-labs/FLUX.2-klein-base-4B --data data/train.jsonl --out runs/sc
    torchrun --nproc_per_node 8 train.py --model ... --data runs/sc/cache --out runs/sc

--data is a latent cache folder (data.py) or a JSONL manifest. A manifest is first cached into
OUT/cache with the VAE and text encoder of --model, which are then freed: training holds only the
transformer. Under torchrun, cache first (`python data.py MANIFEST --model ... --out CACHE`).

One step takes a global batch of G = batch_size x grad_accum x processes examples:
  - example i at step n draws everything from its own generator, seeded by (seed, n, i): sigma,
    noise, and for each reference a keep fraction f ~ U(keep_range) and which tokens survive
    (uniform, without replacement; survivors keep their original ids), or, with probability
    keep_all_prob, keeps every reference token (never seeing dense references costs dense quality);
  - its loss is the mean over target tokens of |v - (e - x0)|^2 at x_s = (1 - s) x0 + s e;
  - the step minimizes the mean over the G examples: each process backpropagates its share divided
    by G, and the LoRA gradients are summed across processes.
Nothing random depends on which process holds an example, so the update equals the one-process
update with the same G (up to float summation order), and a resumed run repeats an uninterrupted one.

Sigma: logit-normal (mean 0, std 1), then klein's exponential shift s' = e^mu / (e^mu + 1/s - 1)
with mu = sample.empirical_mu(target tokens, 50): training puts its sigmas where klein's sampler
spends its steps at that resolution (50 is the base models' step count, the ones one fine-tunes).
References may differ per example in size and kept count; examples of one step that agree in
target grid share a forward (up to batch_size), their references padded to the longest and the
padding masked out of attention (model ref_mask).
"""

import argparse
import gc
import hashlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

import lora
from data import CachedDataset, encode_manifest, write_atomic
from model import Flux2
from sample import empirical_mu, grid_ids, text_ids
from vae import pack

MU_STEPS = 50  # the step count whose schedule shift training follows (base klein's default)
CHECKPOINT, LORA_FILE, LOG = "checkpoint.pt", "pytorch_lora_weights.safetensors", "log.jsonl"
# what defines a run: --resume refuses to change these (the number of processes may change)
RUN = (
    "rank", "alpha", "targets", "lr", "weight_decay", "warmup", "max_grad_norm", "keep_range", "keep_all_prob", "kv", "seed",
)  # fmt: skip


def generator(*key):
    """A CPU generator seeded by a hash of the key, e.g. (seed, step, example index)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_sigma(g, num_tokens):
    """Logit-normal sigma, shifted like klein's schedule for a target of num_tokens tokens."""
    s = torch.sigmoid(torch.randn((), generator=g, dtype=torch.float64)).item()
    e = math.exp(empirical_mu(num_tokens, MU_STEPS))
    return e / (e + (1 / s - 1))


def drop_references(refs, g, keep_range, keep_all_prob):
    """Reference latents [(C, h, w)] -> surviving tokens (M, C) and their original ids (M, 4)."""
    keep_all = torch.rand((), generator=g).item() < keep_all_prob
    tokens, ids = [], []
    for k, z in enumerate(refs):
        h, w = z.shape[1:]
        x, i = pack(z[None])[0], grid_ids(h, w, t=10 * (k + 1))  # (h * w, C), (h * w, 4)
        if not keep_all:
            lo, hi = keep_range
            f = lo + (hi - lo) * torch.rand((), generator=g).item()
            keep = torch.randperm(h * w, generator=g)[: max(1, round(f * h * w))].sort().values
            x, i = x[keep], i[keep]
        tokens.append(x)
        ids.append(i)
    return torch.cat(tokens), torch.cat(ids)


def training_example(item, g, keep_range, keep_all_prob):
    """One example's tensors for one step; everything random comes from g, in a fixed order."""
    h, w = item["target"].shape[1:]
    x0 = pack(item["target"][None].float())[0]  # (N, C)
    s = sample_sigma(g, h * w)
    noise = torch.randn(x0.shape, generator=g)
    ref, ref_ids = drop_references(item["refs"], g, keep_range, keep_all_prob)
    txt = item["txt"].float()
    return dict(x0=x0, noise=noise, s=torch.tensor(s), img_ids=grid_ids(h, w), ref=ref.float(), ref_ids=ref_ids, txt=txt)


def forward_groups(examples, size):
    """Examples that can share one forward (same target grid and text length), <= size each."""
    groups = {}
    for e in examples:
        groups.setdefault((e["x0"].shape, e["txt"].shape), []).append(e)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def flow_matching_loss(model, examples, kv, device):
    """Per-example loss (B,) of examples of equal target and text shapes, in one forward."""
    stack = lambda k: torch.stack([e[k] for e in examples]).to(device)
    pad = lambda k: torch.nn.utils.rnn.pad_sequence([e[k] for e in examples], batch_first=True).to(device)
    counts = [e["ref"].shape[0] for e in examples]
    mask = None  # padding keys masked out when the examples kept different numbers of reference tokens
    if len(set(counts)) > 1:
        mask = (torch.arange(max(counts))[None] < torch.tensor(counts)[:, None]).to(device)
    x0, noise, s = stack("x0"), stack("noise"), stack("s").float()
    x_t = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    txt, txt_ids = stack("txt"), text_ids(examples[0]["txt"].shape[0]).to(device)
    v = model(x_t, stack("img_ids"), txt, txt_ids, s, ref=pad("ref"), ref_ids=pad("ref_ids"), kv_pattern=kv, ref_mask=mask)
    return (v.float() - (noise - x0)).pow(2).mean(dim=(1, 2))


def epoch_batches(buckets, size, seed, epoch):
    """The global batches of one epoch: every bucket (target grid) shuffled and cut into batches of
    `size`, the remainders pooled into mixed batches, the batch order shuffled. The batch count is the
    same every epoch, and the result depends on (seed, epoch) only, so every process agrees on it."""
    g = generator(seed, "epoch", epoch)
    batches, rest = [], []
    for key in sorted(buckets):
        idx = [buckets[key][i] for i in torch.randperm(len(buckets[key]), generator=g)]
        cut = len(idx) - len(idx) % size
        batches += [idx[i : i + size] for i in range(0, cut, size)]
        rest += idx[cut:]
    batches += [rest[i : i + size] for i in range(0, len(rest), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


# ----------------------------------------------------------------------------------------------
# Running


def init_distributed():
    """(rank, world size, device). torchrun sets WORLD_SIZE; NCCL on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def open_data(args, world, device):
    if os.path.isdir(args.data):
        return CachedDataset(args.data)
    if world > 1:
        raise ValueError(f"under torchrun --data must be a cache folder; cache the manifest first: "
                         f"python data.py {args.data} --model {args.model} --out CACHE")
    data = encode_manifest(args.data, args.model, os.path.join(args.out, "cache"), args.max_area, args.skip_bad, device)
    gc.collect()  # the encoders are gone: free their memory before the transformer loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return data


def save_checkpoint(path, model, opt, step, run):
    """LoRA, optimizer, step and settings. No RNG state: every draw is keyed by (seed, step, example),
    so the step is all a resumed run needs to repeat the uninterrupted one."""
    lora_params = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = dict(step=step, run=run, lora=lora_params, optimizer=opt.state_dict())
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, model, opt, run, device):
    """Restore LoRA and optimizer; returns the step to continue from."""
    state = torch.load(path, map_location=device, weights_only=True)
    changed = [f"{k} {state['run'].get(k)} -> {v}" for k, v in run.items() if state["run"].get(k) != v]
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint's: {', '.join(changed)}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state["lora"][n])
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def train(args):
    rank, world, device = init_distributed()
    try:
        run_training(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_training(args, rank, world, device):
    checkpoint = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(checkpoint) and not args.resume:
        raise ValueError(f"{args.out} already holds a run: pass --resume to continue it, or choose another --out")
    if args.resume and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {args.out}")
    data = open_data(args, world, device)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 weights, float32 LoRA, autocast
    model = Flux2.from_pretrained(args.model, dtype=dtype, device=device)
    channels, text_dim = data[0]["target"].shape[0], data[0]["txt"].shape[-1]
    if (channels, text_dim) != (model.cfg.in_channels, model.cfg.context_dim):
        raise ValueError(f"the cache does not fit the model: latents of {channels} channels and text of {text_dim} "
                         f"(the transformer takes {model.cfg.in_channels} and {model.cfg.context_dim})")
    model.requires_grad_(False)
    lora.inject(model, args.targets, args.rank, args.alpha, args.seed)
    model.gradient_checkpointing = args.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # zeros, not None: a process without examples in a step still sums its share
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    G = args.batch_size * args.grad_accum * world
    run = {k: getattr(args, k) for k in RUN} | dict(targets=list(args.targets), keep_range=list(args.keep_range))
    run["global_batch"] = G
    start = load_checkpoint(checkpoint, model, opt, run, device) if args.resume else 0
    log_path = os.path.join(args.out, LOG)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        lines = []
        if args.resume and os.path.exists(log_path):
            with open(log_path) as f:
                lines = [line for line in f if json.loads(line)["step"] <= start]
        with open(log_path, "w") as f:  # a resumed run drops what came after its checkpoint
            f.writelines(lines)

    buckets = data.buckets()
    per_epoch = len(epoch_batches(buckets, G, args.seed, 0))
    epoch, batches = None, None
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="training"):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(buckets, G, args.seed, epoch)
        batch = batches[step % per_epoch]
        mine = batch[rank::world]
        draws = [generator(args.seed, step, i) for i in mine]  # keyed by the example, not by the process
        examples = [training_example(data[i], g, args.keep_range, args.keep_all_prob) for i, g in zip(mine, draws)]

        opt.zero_grad(set_to_none=False)
        loss_sum = torch.zeros(1, device=device)
        for group in forward_groups(examples, args.batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses = flow_matching_loss(model, group, args.kv, device)
            (losses.sum() / len(batch)).backward()
            loss_sum += losses.detach().sum()
        if world > 1:  # sum the shares of all processes: the gradient of the mean over the G examples
            flat = torch.cat([p.grad.flatten() for p in params] + [loss_sum])
            dist.all_reduce(flat)
            for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
            loss_sum = flat[-1:]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

        if rank == 0:
            with open(log_path, "a") as f:
                record = dict(step=step + 1, loss=loss_sum.item() / len(batch), lr=lr, grad_norm=grad_norm.item())
                f.write(json.dumps(record) + "\n")
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                save_checkpoint(checkpoint, model, opt, step + 1, run)
                lora.save_lora(model, os.path.join(args.out, LORA_FILE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a Sparse Context LoRA (random reference-token dropping) for klein.")
    p.add_argument("--model", required=True, help="klein repository folder, transformer folder, BFL file or hub id")
    p.add_argument("--data", required=True, help="latent cache folder (data.py) or JSONL manifest (cached to OUT/cache)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl, pytorch_lora_weights.safetensors")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run continues to this many)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    p.add_argument("--targets", nargs="+", default=list(lora.DEFAULT_TARGETS),
                   help="glob patterns of the Linear layers to adapt, BFL names (default: diffusers' klein trainer's)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warmup, then constant")
    p.add_argument("--batch-size", type=int, default=1,
                   help="at most this many examples per forward; they stack when their target grids agree")
    p.add_argument("--grad-accum", type=int, default=1, help="each process takes batch-size x grad-accum examples per step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the LoRA gradient to this norm")
    p.add_argument("--keep-range", type=float, nargs=2, default=[0.05, 0.25], metavar=("LO", "HI"),
                   help="each reference keeps a fraction ~ U(LO, HI) of its tokens")
    p.add_argument("--keep-all-prob", type=float, default=0.1, help="probability that an example keeps all reference tokens")
    p.add_argument("--kv", action="store_true", help="train in the KV pattern: references at t = 0 attend only to references")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward: less memory")
    p.add_argument("--save-every", type=int, default=250, help="write checkpoint and LoRA every this many steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the LoRA init, the data order and every per-example draw")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--max-area", type=int, default=1024 * 1024, help="when caching a manifest: largest image area in pixels")
    p.add_argument("--skip-bad", action="store_true", help="when caching a manifest: skip bad lines instead of stopping")
    args = p.parse_args(argv)
    lo, hi = args.keep_range
    if not 0 < lo <= hi <= 1:
        p.error(f"--keep-range needs 0 < LO <= HI <= 1, got {lo} {hi}")
    if not 0 <= args.keep_all_prob <= 1:
        p.error(f"--keep-all-prob must be in [0, 1], got {args.keep_all_prob}")
    for name in ("steps", "rank", "batch_size", "grad_accum", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
