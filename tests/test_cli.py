"""The `finetune` command: fast help without torch, plain errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import REPO


def _run(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys, time; t=time.perf_counter(); sys.argv=['finetune','--help']\n"
        "from tasks.cli.app import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','transformers','datasets','peft','prefect') if m in sys.modules]\n"
        "print('HEAVY', heavy, time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    line = [l for l in out.stdout.splitlines() if l.startswith("HEAVY")][0]
    assert "[]" in line, line
    t0 = time.perf_counter()
    res = _run("--help")
    assert res.returncode == 0 and "data" in res.stdout
    assert time.perf_counter() - t0 < 2.0


def test_bad_config_exits_2_with_every_problem(tmp_path):
    res = _run("data", "prepare", "configs/demo.yaml", "--set", "training.epochs=0", "--set", "data.nope=1")
    assert res.returncode == 2
    assert "training.epochs" in res.stderr and "data.nope" in res.stderr and "Traceback" not in res.stderr


def test_bad_data_exits_2_without_traceback(tmp_path):
    res = _run(
        "data",
        "prepare",
        "configs/demo.yaml",
        "--set",
        f"data.source={tmp_path}/missing.csv",
        "--set",
        f"workspace={tmp_path}/ws",
    )
    assert res.returncode == 2 and "missing.csv does not exist" in res.stderr and "Traceback" not in res.stderr


def test_config_show_fills_defaults():
    res = _run("config", "show", "configs/demo.yaml", "--set", "method.kind=lora")
    assert res.returncode == 0 and "kind: lora" in res.stdout and "lora_r: 8" in res.stdout
