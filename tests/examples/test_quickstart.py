"""examples/quickstart.py end to end on CPU with small settings: stdlib data, two gloo processes
at CP=2, a checkpoint, the Hugging Face export, and generate() on the exported model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"
STEPS = 3


def test_quickstart_trains_exports_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "quickstart"
    result = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--out-dir", str(out), "--train-iters", str(STEPS),
            "--seq-length", "128", "--micro-batch-size", "1", "--packages", "textwrap,string",
            "--vocab-size", "300", "--max-new-tokens", "8",
        ],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world=2 TP=1 PP=1 CP=2" in result.stdout, result.stdout
    assert f"step {STEPS}/{STEPS}" in result.stdout and "8 new tokens" in result.stdout
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert (out / "checkpoints" / f"iter_{STEPS:07d}" / "asa_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(out / "hf", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()
    assert model.config.attention_pattern == "LG"
    prompt = tokenizer("def f(x):\n", return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    length = prompt.input_ids.shape[1]
    assert tokens.shape[1] > length and torch.equal(tokens[:, :length], prompt.input_ids)
    assert tokenizer.decode(prompt.input_ids[0]) == "def f(x):\n"
