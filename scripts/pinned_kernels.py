"""Whether the CPU kernels can be pinned so that a training run gives the same weights, bit for bit,
whatever instruction set the CPU offers; and what pinning costs.

    python scripts/pinned_kernels.py [--epochs 20] [--repeat 1] [--only NAME ...]

Each configuration runs in its own process (the libraries choose their kernels when they load, from
the environment): the micro target's fine-tuning (the shipped micro base, the micro sets of draw 0,
the micro recipe) for ``--epochs`` epochs on one thread, no recall checks. A "machine" is emulated by
capping what each library may use (``ATEN_CPU_CAPABILITY`` for torch's own kernels,
``MKL_ENABLE_INSTRUCTIONS`` for MKL, ``ONEDNN_MAX_CPU_ISA`` for oneDNN), as a CPU without AVX-512
would; a "pin" is what the project would set on every machine. Prints, per configuration, the sha256
of the trained weights, the training time and the largest weight difference from the first
configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# An older machine of the same family, for the pins below AVX2.
AVX_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX", "ONEDNN_MAX_CPU_ISA": "AVX"}
PIN_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
PIN_COMPATIBLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}

CONFIGURATIONS: dict[str, dict[str, str]] = {
    "native": {},
    "native, deterministic algorithms": {"PINNED_DETERMINISTIC": "1"},
    "AVX2 machine": AVX2_MACHINE,
    "only torch kernels at avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "only MKL at AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "only oneDNN at AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "only MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "only MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2,STRICT"},
    "pin AVX2, native": PIN_AVX2,
    "pin AVX2, AVX2 machine": {**AVX2_MACHINE, **PIN_AVX2},
    "pin compatible, native": PIN_COMPATIBLE,
    "pin compatible, AVX machine": {**AVX_MACHINE, **PIN_COMPATIBLE},
}


def train(epochs: int, out: Path) -> dict:
    """The workload, in this process (the environment was set by the parent)."""
    import torch

    if os.environ.get("PINNED_DETERMINISTIC"):
        torch.use_deterministic_algorithms(True)
    from safetensors.torch import save_file

    from unlearnlm.bench.fitting import torch_threads
    from unlearnlm.bench.sizes import RECIPES
    from unlearnlm.bench.target import fine_tune, fine_tune_schedules
    from unlearnlm.data.sets import draw_sets, pool_texts, pretraining_pool

    recipe = RECIPES["micro"]
    sets = draw_sets(size="micro", seed=0, draw=0)
    rows = sets.training_rows()
    schedule, _ = fine_tune_schedules(recipe, len(rows), len(rows))
    schedule.max_epochs = epochs
    base = Path(__file__).resolve().parents[1] / "src" / "unlearnlm" / "resources" / "base" / "micro"
    with torch_threads(1):
        started = time.perf_counter()
        model, _, log = fine_tune(base, pool_texts(pretraining_pool()), rows, None, recipe, 0, False, "micro", schedule)
        seconds = time.perf_counter() - started
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}  # tied weights: copies
    save_file(state, out)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(state[name].numpy().tobytes())
    return {"sha256": digest.hexdigest()[:16], "seconds": seconds, "steps": log["steps"],
            "capability": torch.backends.cpu.get_cpu_capability()}


def max_difference(first: Path, other: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(other)
    return max(float((a[name] - b[name]).abs().max()) for name in a if a[name].is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (the times' spread)")
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train(args.epochs, Path(args.child))))
        return
    names = args.only or list(CONFIGURATIONS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as scratch:
        weights = {name: Path(scratch) / f"{index}.safetensors" for index, name in enumerate(names)}
        for _ in range(args.repeat):  # configurations interleaved, so that a change in load hits them alike
            for name in names:
                env = {key: value for key, value in os.environ.items() if key not in KNOBS}
                env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **CONFIGURATIONS[name])
                command = [sys.executable, __file__, "--epochs", str(args.epochs), "--child", str(weights[name])]
                completed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                results[name].append(json.loads(completed.stdout.strip().splitlines()[-1]))
        for name in names:
            first = results[name][0]
            seconds = ", ".join(f"{result['seconds']:.1f}" for result in results[name])
            same = len({result["sha256"] for result in results[name]}) == 1
            print(f"{name:34s} torch kernels {first['capability']:8s} weights {first['sha256']}"
                  f"{'' if same else ' (repeats differ)'} ({first['steps']} steps; {seconds} s) max |diff| from "
                  f"{names[0]!r}: {max_difference(weights[names[0]], weights[name]):.3g}")

if __name__ == "__main__":
    main()
