"""bench/gpu.py, the script a lent GPU runs, kept from rotting: its --cpu --tiny mode
runs the GPT through the pipeline's path and the plain loop. Left out here for CI's
time: torch.compile (with its two inductor compiles this test took 123 s in a CI run,
without them 43 s; the pipeline's compile switch is held to the plain path's loss and gradients in
tests/test_switches.py), the ViT's two ways (they share `initialize` and the step with
the GPT's) and the resume check (the code it calls, `fit` with `resume_from`, is what
tests/test_resume.py holds to bit-exact results)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--cpu", "--tiny", "--out", str(out),
                           "--no-compile", "--skip", "vit-tiny", "resume"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the whole result
    assert printed == json.loads(out.read_text())
    for way in ("pipeline", "plain"):
        figures = printed[f"gpt-tiny/{way}"]
        assert "error" not in figures, figures
        assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
    assert 0 < printed["gpt-tiny/pipeline_over_plain"] < 2
