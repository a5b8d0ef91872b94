"""How long `bitnet-jax serve` takes to answer: from its launch to `/health` answering 200, on a
first start (a fresh compilation cache folder: every program compiled, in child processes) and on
a second one (the programs loaded from that folder).

    python benchmarks/serve_first_start.py MODEL_FOLDER [--max-batch 8] [--port 8771]

For a small model: `bitnet-jax convert tests/fixtures/hf/packed_bitlinear /tmp/tiny` gives the
test suite's. Prints one line: the first start's seconds, then the second's.
"""

import argparse
import os
import subprocess
import tempfile
import time
import urllib.request


def seconds_to_answer(command: list[str], env: dict, port: int) -> float:
    start = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.1)
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode} before answering")
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--port", type=int, default=8771)
    args = parser.parse_args()
    command = ["bitnet-jax", "serve", "--model", args.model, "--max-batch", str(args.max_batch)]
    command += ["--port", str(args.port)]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, BITNET_JAX_CACHE=cache)
        first, second = (seconds_to_answer(command, env, args.port) for _ in range(2))
    print(f"first start {first:.1f} s, second {second:.1f} s")


if __name__ == "__main__":
    main()
