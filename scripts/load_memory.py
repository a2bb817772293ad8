"""A process's memory while it loads a 32-px dataset for a 224-px model, per ``data.store_at``.

    .venv/bin/python scripts/load_memory.py --images 20000 --store-at native input

Each measurement runs in a fresh process: 20,000 random 32-px colour images (an .npz in a
temporary folder) loaded twice for ResNet-50's input (the second load maps the cache the first
wrote) and one batch of 96 made the model's input. Printed per setting: resident memory added,
and the peak added since the imports (Linux's VmHWM, reset first), in MB.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MEASURE = """
from pathlib import Path
from biotune.data import load_dataset
from biotune.models import model_preprocess

def kib(field):
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)).split()[1]) * 1024

preprocess = model_preprocess("resnet50")
Path("/proc/self/clear_refs").write_text("5")  # the peak counts from here, not from the imports
before = kib("VmRSS:")
for _ in range(2):
    dataset = load_dataset({path!r}, preprocess, root={root!r}, store_at={store_at!r})
    dataset.to_input(dataset.train.images[:96])
print(round((kib("VmRSS:") - before) / 2**20), round((kib("VmHWM:") - before) / 2**20))
"""


def measure(images: int, store_at: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "small.npz"
        rng = np.random.default_rng(0)
        np.savez(path, train_images=rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
                 train_labels=np.arange(images) % 10)
        results = {}
        for setting in store_at:
            script = MEASURE.format(path=str(path), root=str(Path(folder) / setting), store_at=setting)
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise SystemExit(f"load_memory.py: the {setting} measurement failed:\n{done.stderr}")
            resident, peak = map(int, done.stdout.split())
            results[setting] = {"resident_mb": resident, "peak_mb": peak}
        return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--store-at", nargs="+", choices=("native", "input"), default=["native", "input"])
    args = parser.parse_args()
    print(json.dumps({"images": args.images, **measure(args.images, args.store_at)}, indent=2))
