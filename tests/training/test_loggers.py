"""Loggers (console, JSONL, wandb offline/disabled), ThroughputMeter math and peak FLOP/s."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plt_train.config.schema import LoggingConfig
from plt_train.training.loggers import (
    ConsoleLogger,
    METRICS_FILE,
    JsonlLogger,
    MetricLoggers,
    WandbLogger,
    format_duration,
    read_metrics,
)
from plt_train.training.metrics import ThroughputMeter, peak_flops_per_second
from tests._wandb_offline import wait_for_history

REPO = Path(__file__).resolve().parents[2]


def _strict_json(line: str):
    def reject(const):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(line, parse_constant=reject)


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no credentials anywhere


# ---------------------------------------------------------------- console

def test_console_line_has_every_field(capsys):
    loggers = MetricLoggers(ConsoleLogger(enabled=True, total_steps=100))
    loggers.log(12, {"loss": torch.tensor(5.23114), "lr": 3e-4, "grad_norm": torch.tensor(1.2341),
                     "tokens_per_s": 12345.4, "tflops_per_device": 1.23, "mfu": 0.0312,
                     "eta_s": 65.2})
    line = capsys.readouterr().out
    assert line == ("step 12/100 | loss 5.2311 | lr 3.00e-04 | grad_norm 1.234 | tok/s 12,345"
                    " | TFLOP/s 1.23 | MFU 3.1% | ETA 1m05s\n")


def test_console_valid_line_and_disabled(capsys):
    ConsoleLogger(True, 100).log(50, {"loss": 4.5, "ppl": 90.0171}, kind="valid")
    ConsoleLogger(False, 100).log(51, {"loss": 4.5})
    assert capsys.readouterr().out == "valid step 50/100 | loss 4.5000 | ppl 90.02\n"


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 65, 3599, 7380)] == \
        ["0s", "45s", "1m05s", "59m59s", "2h03m"]


# ---------------------------------------------------------------- JSONL

def test_jsonl_lines_are_flushed_and_valid(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    loggers = MetricLoggers(JsonlLogger(path, enabled=True))
    loggers.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    loggers.log(2, {"loss": float("nan")})
    loggers.log(2, {"loss": 2.25}, kind="valid")
    # Read through another handle BEFORE close: every line must already be on disk.
    rows = [_strict_json(l) for l in path.read_text().splitlines()]
    assert rows == [{"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-3},
                    {"kind": "train", "step": 2, "loss": "nan"},
                    {"kind": "valid", "step": 2, "loss": 2.25}]
    loggers.close()
    again = JsonlLogger(path, enabled=True)  # a resumed run appends
    again.log(3, {"loss": 2.0})
    again.close()
    assert len(path.read_text().splitlines()) == 4
    off = tmp_path / "off.jsonl"
    JsonlLogger(off, enabled=False).log(1, {"loss": 1.0})
    assert not off.exists()


def test_read_metrics_reads_back_what_the_run_logged(tmp_path):
    """The one reader of ``metrics.jsonl`` (scripts and tests): rows in logged order, kept
    per kind, a diverged loss back as a float, and a step repeated by a resume kept twice."""
    logger = JsonlLogger(tmp_path / METRICS_FILE, enabled=True)
    logger.log(1, {"loss": 3.0, "note": "inf-free"})
    logger.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    logger.log(2, {"loss": 2.5}, kind="valid")
    logger.log(2, {"loss": 2.75})  # the step again, after a resume
    logger.close()
    rows = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in rows] == \
        [("train", 1), ("train", 2), ("valid", 2), ("train", 2)]
    train = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train] == [1, 2, 2]
    assert math.isnan(train[1]["loss"]) and train[1]["grad_norm"] == math.inf
    assert train[0]["note"] == "inf-free" and train[2]["loss"] == 2.75
    assert read_metrics(tmp_path, "valid") == [{"kind": "valid", "step": 2, "loss": 2.5}]


def test_jsonl_survives_sigkill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    code = (
        "import os, signal\n"
        "from plt_train.training.loggers import JsonlLogger\n"
        f"log = JsonlLogger({str(path)!r}, enabled=True)\n"
        "for step in range(1, 4):\n"
        "    log.log(step, {'loss': 1.0 / step})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rows = [_strict_json(l) for l in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


# ---------------------------------------------------------------- wandb

def _wandb_file(run_dir: Path) -> Path:
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_wandb_offline_rows_read_back(tmp_path, quiet_wandb):
    t0 = time.perf_counter()
    wb = WandbLogger("plt_train_test", tmp_path, {"model": {"hidden_size": 64}}, mode="offline")
    init_s = time.perf_counter() - t0
    loggers = MetricLoggers(wb)
    logged = {}
    for step in range(1, 401):  # ~40 KiB of records: crosses a 32 KiB block boundary
        metrics = {"loss": torch.tensor(10.0 / step), "lr": 1e-4 * step, "grad_norm": 0.5 + step}
        loggers.log(step, metrics)
        logged[step] = {f"train/{k}": float(v) for k, v in metrics.items()}
        if step % 100 == 0:
            loggers.log(step, {"loss": 1.0 + step}, kind="valid")
            logged[step]["valid/loss"] = 1.0 + step
    loggers.close()
    path = _wandb_file(tmp_path)
    assert path.stat().st_size > 32 * 1024
    rows = wait_for_history(path, rows=len(logged))
    got = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in rows}
    assert got == logged
    print(f"wandb offline init {init_s:.2f}s")


def test_wandb_online_without_key_falls_back_offline(tmp_path, quiet_wandb):
    with pytest.warns(UserWarning, match="no API key"):
        wb = WandbLogger("plt_train_test", tmp_path, {}, mode="online")
    assert wb.mode == "offline"
    wb.log(1, {"loss": 3.0})
    wb.close()
    assert wait_for_history(_wandb_file(tmp_path), rows=1)[0]["train/loss"] == 3.0


def test_wandb_disabled_and_non_logging_rank_write_nothing(tmp_path, quiet_wandb):
    for kwargs in ({"mode": "disabled"}, {"mode": "offline", "enabled": False}):
        run_dir = tmp_path / kwargs["mode"]
        wb = WandbLogger("plt_train_test", run_dir, {}, **kwargs)
        wb.log(1, {"loss": 1.0})
        wb.close()
        assert not run_dir.exists()


def test_create_from_config(tmp_path, quiet_wandb, capsys):
    cfg = LoggingConfig(wandb=True, wandb_mode="disabled")
    with MetricLoggers.create(cfg, tmp_path, {}, total_steps=10, enabled=True) as loggers:
        loggers.log(1, {"loss": torch.tensor(1.5)})
        with pytest.raises(ValueError):
            loggers.log(1, {"loss": 1.0}, kind="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert capsys.readouterr().out == "step 1/10 | loss 1.5000\n"
    with MetricLoggers.create(cfg, tmp_path / "rank1", {}, total_steps=10, enabled=False) as quiet:
        quiet.log(1, {"loss": 1.0})
    assert not (tmp_path / "rank1").exists() and capsys.readouterr().out == ""


# ---------------------------------------------------------------- throughput and peak

def test_throughput_meter_excludes_warmup():
    meter = ThroughputMeter(total_steps=10, peak_flops_per_device=100e12, num_devices=2)
    assert meter.update(1, tokens=1000, flops=50e12, seconds=30.0) == {}  # warm-up only
    meter.update(2, tokens=1000, flops=50e12, seconds=1.0)
    m = meter.update(3, tokens=3000, flops=150e12, seconds=3.0)
    # 4000 tokens / 4 s; 200e12 FLOPs / 2 devices / 4 s = 25 TFLOP/s per device = 25% of 100.
    assert m["tokens_per_s"] == pytest.approx(1000.0)
    assert m["tflops_per_device"] == pytest.approx(25.0)
    assert m["mfu"] == pytest.approx(0.25)
    assert m["eta_s"] == pytest.approx(7 * 2.0)  # 7 steps left at 2 s/step


def test_throughput_meter_window():
    meter = ThroughputMeter(total_steps=5, peak_flops_per_device=1.0, window=2)
    for step, sec in enumerate([9.0, 9.0, 1.0, 1.0], start=1):
        m = meter.update(step, tokens=10, flops=1.0, seconds=sec)
    assert m["tokens_per_s"] == pytest.approx(10.0) and m["eta_s"] == pytest.approx(1.0)


def test_peak_measured_on_cpu_and_override():
    flops, source = peak_flops_per_second(torch.device("cpu"), torch.float32, None)
    assert source == "measured" and math.isfinite(flops) and flops > 1e8
    assert peak_flops_per_second(torch.device("cpu"), torch.float32, 1.5) == (1.5e12, "override")


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 156e12),  # TF32 dense
    ("NVIDIA A10", torch.float16, 125e12),
])
def test_peak_datasheet_by_gpu_name(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, source = peak_flops_per_second(torch.device("cuda", 0), dtype, None)
    assert flops == expected and source.startswith("datasheet")
    if dtype == torch.float32:
        assert "TF32" in source
