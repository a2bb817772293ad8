"""Where one training step's time goes, and what step-level levers buy on this machine.

    .venv/bin/python scripts/train_step.py --preset cpu --json results/train_step_cpu.json

One full-fine-tuning step (forward, cross-entropy, backward, Adam) of the preset's model at its
image and batch size, on random images (timing only), measured side by side in one process:
NCHW; channels-last (``train.channels_last``, the trainer's default); channels-last with Adam's
fused CPU kernel; channels-last under ``torch.compile``, compiled cold in a fresh inductor cache
as each new graph of a search would be (the compile is in the first two steps' time). Then
the operators that take a channels-last step's time (torch.profiler). It explains the ceiling of
``make bench``: what the exact levers cannot remove is the convolutions' and BatchNorms' own work.
"""
import argparse
import atexit
import copy
import json
import os
import shutil
import statistics
import tempfile
import time

COMPILE_CACHE = tempfile.mkdtemp(prefix="train_step-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = COMPILE_CACHE  # before torch is imported: a cold compile
atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from biotune import config as cfg  # noqa: E402
from biotune.models import create_model  # noqa: E402


def step_function(net, optimizer, images, labels):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    return step


def milliseconds_per_step(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return times


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=list(cfg.PRESETS))
    parser.add_argument("--model", default=None, help="default: the preset's model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant, after 2 warm-up steps")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    parser.add_argument("--json", help="write the rows and the profile to this file")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        config = cfg.resolve(args.preset, overrides={"model.name": args.model} if args.model else None)
        pretrained = create_model(config.model.name, 10, config.model.weights).net  # a wrong name fails here
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    size, batch = config.data.image_size, config.train.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    variants = [("NCHW", torch.contiguous_format, False, False), ("channels_last", torch.channels_last, False, False),
                ("channels_last + fused Adam", torch.channels_last, True, False)]
    if not args.no_compile:
        variants.append(("channels_last + torch.compile", torch.channels_last, False, True))
    rows = []
    for name, fmt, fused, compiled in variants:
        net = copy.deepcopy(pretrained).to(memory_format=fmt).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=config.train.base_lr, fused=fused or None)
        started = time.perf_counter()
        step = step_function(torch.compile(net) if compiled else net, optimizer,
                             images.contiguous(memory_format=fmt), labels)
        step()
        step()
        warm_up = time.perf_counter() - started
        times = milliseconds_per_step(step, args.steps)
        rows.append({"variant": name, "ms_per_step": round(statistics.median(times), 1),
                     "images_per_s": round(batch / statistics.median(times) * 1000, 1),
                     "warm_up_s": round(warm_up, 1)})
        print(rows[-1], flush=True)
        if name == "channels_last":
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                milliseconds_per_step(step, 3)
            events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in events)
            top = [{"operator": e.key, "share": round(e.self_cpu_time_total / total, 3)} for e in events[:8]]
    base = next(row["ms_per_step"] for row in rows if row["variant"] == "NCHW")
    for row in rows:
        row["speedup_vs_nchw"] = round(base / row["ms_per_step"], 2)
    print(f"\n{config.model.name}, {size} px, batch {batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for row in rows:
        print(f"  {row['variant']:32s} {row['ms_per_step']:8.1f} ms/step {row['images_per_s']:8.1f} images/s "
              f"{row['speedup_vs_nchw']:5.2f}x NCHW  (first two steps {row['warm_up_s']} s)")
    print("channels_last step, share of operator time:")
    for entry in top:
        print(f"  {entry['operator']:40s} {entry['share']:.1%}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model": config.model.name, "image_size": size, "batch_size": batch,
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
                       "channels_last_profile": top}, file, indent=2)
