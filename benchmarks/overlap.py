"""How much of a slow remote reward's time does scoring during sampling hide? Iteration time with the reward scorer's
``overlap`` off and on, on the demo and on the tiny SD3.5 recipe, trained on a fake VLM judge (the UnifiedReward
protocol) on 127.0.0.1 that takes a set time per request.

    python benchmarks/overlap.py                       # about 2 min on 2 CPU cores
    python benchmarks/overlap.py --latency 0.05 0.2

The judge runs in a process of its own, as a real server would (in the trainer's process its threads would compete
for the interpreter lock). Each setting runs ``--iterations`` GRPO iterations (the first, warm-up, is left out)
with no evaluation. Columns: seconds per iteration; ``reward``: seconds the training thread spends on rewards
(scoring inline, ``time/reward_inline_s``, plus waiting after the last micro-batch, ``time/reward_s``); ``rest``:
the iteration without them (sampling, decoding, update), which overlap must not slow; ``hidden``: the share of the
sequential reward time that overlap removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from precise_lightning.callbacks import RewardScorer  # noqa: E402
from precise_lightning.rewards import UnifiedReward  # noqa: E402
from precise_lightning.tiny import write_tiny  # noqa: E402


def serve(latency: float) -> None:
    """Run the judge until killed; its port on the first line of stdout."""
    server = judge_server(latency)
    print(server.server_address[1], flush=True)
    threading.Event().wait()


def judge_server(latency: float) -> ThreadingHTTPServer:
    """An OpenAI-compatible judge answering after ``latency`` s, scores drawn from the request's size (so groups
    are not flat)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            a, c, s = (len(body) // 7) % 5 + 1, (len(body) // 11) % 5 + 1, (len(body) // 13) % 5 + 1
            text = f"Alignment Score (1-5): {a}\nCoherence Score (1-5): {c}\nStyle Score (1-5): {s}"
            reply = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_judge(latency: float) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(latency)], stdout=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{int(process.stdout.readline())}"


class IterationTimes(Callback):
    def __init__(self) -> None:
        self.seconds, self.waits = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        metrics = trainer.callback_metrics
        self.waits.append(float(metrics["time/reward_s"]) + float(metrics["time/reward_inline_s"]))


SETTINGS = {
    "demo": ["--config", "configs/digits_precise.yaml", "--model.micro_batch_size", "16"],  # 8 micro-batches
    "sd35 tiny": ["--config", "configs/sd35_precise.yaml", "--config", "configs/tiny_cpu.yaml",
                  "--model.micro_batch_size", "2"],  # 4 micro-batches
}


def measure(setting: str, root: Path, url: str, overlap: bool, iterations: int, in_flight: int) -> tuple:
    run = cli.main([*SETTINGS[setting], "--model_root", str(root), "--trainer.logger", "false",
                    "--trainer.default_root_dir", tempfile.mkdtemp(), "--trainer.enable_progress_bar", "false",
                    "--trainer.limit_val_batches", "0", "--model.eval_at_start", "false",
                    "--trainer.max_steps", str(2 * iterations)], run=False)  # 2 optimizer steps per iteration
    scorer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RewardScorer))
    scorer.rewards, scorer.weights, scorer.metrics = {"judge": UnifiedReward(url, max_in_flight=in_flight)}, \
        {"judge": 1.0}, {}
    scorer.overlap = overlap
    times = IterationTimes()
    run.trainer.callbacks.append(times)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    seconds, waits = times.seconds[1:], times.waits[1:]
    return sum(seconds) / len(seconds), sum(waits) / len(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.05, 0.2], help="seconds per request")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=8, help="UnifiedReward.max_in_flight")
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)  # the judge's own process
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve)
    root = write_tiny(Path(tempfile.mkdtemp()) / "tiny")
    print("| setting | s/request | overlap | s/iteration | reward s | rest s | hidden |")
    print("|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        for latency in args.latency:
            judge, url = start_judge(latency)
            off = measure(setting, root, url, False, args.iterations, args.in_flight)
            on = measure(setting, root, url, True, args.iterations, args.in_flight)
            judge.kill()
            for name, (seconds, wait) in [("off", off), ("on", on)]:
                hidden = f"{1 - on[1] / off[1]:.0%}" if name == "on" else ""
                print(f"| {setting} | {latency} | {name} | {seconds:.2f} | {wait:.2f} | {seconds - wait:.2f} | "
                      f"{hidden} |", flush=True)


if __name__ == "__main__":
    main()
