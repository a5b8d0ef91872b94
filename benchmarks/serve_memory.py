"""Whole-process peak RSS of serving a converted 2B4T-shaped folder, as `bitnet-jax generate` does.

    python benchmarks/serve_memory.py [--prompt-tokens 100] [--new-tokens 64] [--keep DIR]

Writes random 2B4T-shaped packed weights (the serving default, int8-tied: 852 MB) to a converted
folder, then, in a fresh process: reads the folder's shapes, compiles the generate program from
them, loads the weights, and generates twice (streaming). It prints the resident memory after
each step and the process's lifetime high-water mark (VmHWM, nothing reset), in MB of 10^6 bytes.
`bitnet-jax bench generate` reports the peak from after the weights are built; this is the
number a user of a converted folder sees.
"""

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import importlib, sys
import numpy as np
generate_module = importlib.import_module("bitnet_jax.serve.generate")  # bitnet_jax.serve.generate is the function
from bitnet_jax.serve.packed_folder import load_packed, read_packed_folder

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 / 1e6 for line in f if line.startswith(key))

def report(step):
    print(f"{step:28s} resident {status('VmRSS'):6.0f} MB   peak so far {status('VmHWM'):6.0f} MB", flush=True)

folder, prompt_tokens, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report("imports")
config, shapes = read_packed_folder(folder)
prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_tokens))
generate_module.compile_generate(config, shapes, prompt, new_tokens, streaming=True)
report("compiled from shapes")
config, params = load_packed(folder)
report("weights loaded")
for i in range(2):
    generate_module.generate(config, params, prompt, new_tokens, on_tokens=lambda tokens: None)
    report(f"generated ({i + 1})")
print(f"lifetime peak: {status('VmHWM'):.0f} MB")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keep", help="write the folder here (and reuse it if it is there)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or os.path.join(tmp, "2b4t-random-packed")
        if not os.path.isfile(os.path.join(folder, "model.safetensors")):
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    (
                        "import sys; from bitnet_jax.model.config import BitNetConfig; "
                        "from bitnet_jax.bench.serve import random_packed_params; "
                        "from bitnet_jax.serve.packed_folder import save_packed; "
                        "config = BitNetConfig.preset('b1.58-2b4t'); "
                        "save_packed(sys.argv[1], config, random_packed_params(config, lm_head='int8-tied'))"
                    ),
                    folder,
                ],
                check=True,
            )
        subprocess.run([sys.executable, "-c", CHILD, folder, str(args.prompt_tokens), str(args.new_tokens)], check=True)


if __name__ == "__main__":
    main()
