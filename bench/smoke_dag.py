"""Benchmark: the smoke DAG, cold and cached, against its targets.

Runs `pipeline run configs/smoke.yaml` twice in a fresh workdir and prints
per-stage seconds and the ratios that matter: cold time against the 300 s goal
(600 s bar), cached time against the 90 s bar, and cached over cold.

    .venv/bin/python bench/smoke_dag.py [--workdir DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_COLD_S, BAR_COLD_S, BAR_CACHED_S = 300.0, 600.0, 90.0


def run_once(workdir: Path, summary: Path, overrides: list[str]) -> tuple[float, dict]:
    cmd = [str(Path(sys.executable).parent / "pipeline"), "run", str(REPO / "configs/smoke.yaml"),
           "--workdir", str(workdir), "--summary", str(summary), *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tw-bench-"))
    shutil.rmtree(root / "work", ignore_errors=True)

    cold_s, cold = run_once(root / "work", root / "cold.json", args.overrides)
    cached_s, _ = run_once(root / "work", root / "cached.json", args.overrides)

    print(f"{'stage':<14}{'cold s':>10}")
    for name, stage in cold["stages"].items():
        print(f"{name:<14}{stage['seconds']:>10.1f}")
    print(f"{'(wall)':<14}{cold_s:>10.1f}")
    print()
    print(f"cold / goal ({GOAL_COLD_S:.0f} s):    {cold_s / GOAL_COLD_S:.2f}")
    print(f"cold / bar ({BAR_COLD_S:.0f} s):     {cold_s / BAR_COLD_S:.2f}")
    print(f"cached / bar ({BAR_CACHED_S:.0f} s):    {cached_s / BAR_CACHED_S:.2f}  ({cached_s:.1f} s)")
    print(f"cached / cold:          {cached_s / cold_s:.3f}")
    m = {**cold["stages"]["evaluate_gpt"]["metrics"], **cold["stages"]["evaluate"]["metrics"]}
    print(f"metrics: gpt_val_loss={m['gpt_val_loss']:.3f} (unigram {m['gpt_unigram_entropy']:.3f}), "
          f"vit_test_accuracy={m['vit_test_accuracy']:.3f}, "
          f"captioner_per_digit_accuracy={m['captioner_per_digit_accuracy']:.3f}, "
          f"captioner_exact_match={m['captioner_exact_match']:.3f}")


if __name__ == "__main__":
    main()
