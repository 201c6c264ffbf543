"""Try every bad input of experiments/reliability/README.md against the real entry point, in a scratch directory,
and print the table: command, what the user sees (the last line of stderr, or of stdout), exit status.

    PYTHONPATH=src python experiments/reliability/bad_inputs.py [--scratch DIR] > table.md

Needs a few minutes on 2 CPU cores: it trains a 6-batch stage 1 and a 4-batch stage 2 to have runs to abuse.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["trainer=cpu", "logger=csv", "data.batch_size=8", "trainer.limit_val_batches=1", "trainer.val_check_interval=3",
        "callbacks.progress.refresh_rate=0"]
STAGE2 = ["module.scale_estimation_batches=1", "module.num_log_images=0", "module.sampling.steps=2"]
AE = ["stage=autoencoder", "run_name=ae", *TINY, "module.image_log_every=0"]
LDM = ["stage=diffusion", "run_name=ldm", *TINY, *STAGE2]


def run(args: list[str], cwd: Path) -> tuple[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "lightning_ldm", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode == 0:  # what the run said about the point in question
        said = [line.strip() for line in result.stdout.splitlines()
                if line.startswith(("Resumed at batch", "warning", "First stage:", "Done."))]
        return "; ".join(said), 0
    lines = [line for line in result.stderr.splitlines() if line.strip()] or [""]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1] if errors else lines[-1]).strip(), result.returncode


def signalled(args: list[str], cwd: Path, signum: int, after_lines: int = 3, meanwhile=None) -> tuple[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "lightning_ldm", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cwd / "outputs" / args[0].split("=")[1] / args[1].split("=")[1] / "csv" / "metrics.csv"
    lines_before = metrics.read_text().count("\n") if metrics.exists() else 0
    while process.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") > lines_before + after_lines):
        time.sleep(0.5)  # until this process is training (the CSV logger flushes every few batches)
    if meanwhile is not None:
        meanwhile()
    process.send_signal(signum)
    _, err = process.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.strip()] or [""]
    return lines[-1].strip(), process.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", default=None)
    cwd = Path(parser.parse_args().scratch or tempfile.mkdtemp(prefix="ldm-bad-inputs-"))
    cwd.mkdir(parents=True, exist_ok=True)
    rows = []

    def row(label: str, args: list[str], outcome: tuple[str, int]) -> None:
        seen, code = outcome
        shown = " ".join(args).replace(" ".join(TINY), "$TINY")
        rows.append(f"| {label} | `{shown}` | {seen.replace('|', '/')} | {code} |")
        print(rows[-1], file=sys.stderr, flush=True)

    row("stage 1 (setup)", [*AE, "max_steps=6"], run([*AE, "max_steps=6"], cwd))
    row("stage 2 (setup)", [*LDM, "max_steps=4"], run([*LDM, "max_steps=4"], cwd))
    ckpt1 = cwd / "outputs/autoencoder/ae/checkpoints/last.ckpt"
    ckpt2 = cwd / "outputs/diffusion/ldm/checkpoints/last.ckpt"
    cases = [
        ("resume with a new lr (applied)", [*AE, "max_steps=8", "module.lr=1e-5"]),
        ("resume with another architecture", [*AE, "max_steps=10", "autoencoder=kl-f2-small"]),
        ("resume stage 2 with another target", [*LDM, "max_steps=6", "module.prediction=eps"]),
        ("resume with another seed", [*AE, "max_steps=10", "seed=3"]),
        ("stage-2 checkpoint resumed in stage 1", ["stage=autoencoder", "run_name=x", *TINY, f"resume={ckpt2}"]),
        ("stage-1 checkpoint as stage 2's first stage", ["stage=diffusion", "run_name=y", *TINY, *STAGE2,
                                                          f"autoencoder.path={ckpt1}"]),
        ("max_steps=0", ["stage=autoencoder", "run_name=z", *TINY, "max_steps=0"]),
        ("negative lr", ["stage=autoencoder", "run_name=z", *TINY, "module.lr=-1"]),
        ("progress bar off (README)", [*AE, "max_steps=8", "+trainer.enable_progress_bar=false"]),
        ("logger node without _target_", ["stage=autoencoder", "run_name=z", "logger=none", "+logger.csv.save_dir=x"]),
        ("output folder not writable", ["stage=autoencoder", "run_name=z", *TINY, "paths.output_root=/sys/ldm-outputs"]),
        ("sample.batch_size=0", ["stage=sample", "sample.batch_size=0"]),
        ("sample.num_samples=0", ["stage=sample", "sample.num_samples=0"]),
        ("sample.num_samples=-3", ["stage=sample", "sample.num_samples=-3"]),
        ("sample.steps=0", ["stage=sample", "sample.steps=0"]),
        ("missing checkpoint", ["stage=sample", "sample.ckpt=nowhere.ckpt"]),
        ("unknown key", ["stage=autoencoder", "module.lrr=1"]),
    ]
    for label, args in cases:
        row(label, args, run(args, cwd))
    long_run = [*AE, "max_steps=100000"]
    second = [*AE, "max_steps=100000", "seed=2"]
    row("SIGTERM during stage 1", long_run,
        signalled(long_run, cwd, signal.SIGTERM,
                  meanwhile=lambda: row("a second command on the same run", second, run(second, cwd))))
    row("Ctrl-C during stage 1", long_run, signalled(long_run, cwd, signal.SIGINT))
    unfinished = ["stage=diffusion", "run_name=ldm2", *TINY, *STAGE2, "max_steps=4"]
    row("stage 2 when the only stage 1 never finished", unfinished, run(unfinished, cwd))
    print(f"`$TINY` = `{' '.join(TINY)}`\n")
    print("| case | command | what the user sees | exit status |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
