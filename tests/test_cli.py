"""`fomoe compare` and `fomoe report` (table, plots, the WAN model), and clear errors for bad flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fomoe.cli import main
from fomoe.lm import LMConfig
from fomoe.placement import Placement
from fomoe.report import WAN, Run, compare_table

SMALL = ["--d-model", "32", "--layers", "2", "--heads", "2", "--experts", "4", "--top-k", "2", "--d-ff", "64",
         "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2", "--lr", "0.01", "--warmup-steps", "2",
         "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--workers", "3", "--placement", "replicated(2)", "--steps", "10", "--sync-every", "5",
               "--eval-every", "5", "--out", str(out), *SMALL])
    assert rc == 0
    report = (out / "report.md").read_text()
    for method in ("ddp", "diloco", "fomoe"):
        assert f"| {method} |" in report
    for name in ("loss_vs_tokens", "loss_vs_bytes", "loss_vs_wallclock", "routing", "expert_load_fomoe"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
        assert f"({name}.png)" in report
    data = json.loads((out / "report.json").read_text())["runs"]
    ddp, diloco, fomoe = (data[m]["bytes_sent_per_worker"] for m in ("ddp", "diloco", "fomoe"))
    # ddp all-reduces the same full parameter set every step that diloco does every H = 5 steps.
    assert ddp == pytest.approx(5 * diloco, rel=1e-9)
    # fomoe: dense over all 3 workers, each expert over its 2 holders: fewer bytes than diloco.
    assert fomoe < diloco
    assert data["fomoe"]["vs_diloco"] == pytest.approx(diloco / fomoe)
    assert data["fomoe"]["vs_ddp"] == pytest.approx(ddp / fomoe)
    for m in ("ddp", "diloco", "fomoe"):
        assert data[m]["eval_loss_equal_tokens"] < 5.0 and data[m]["peak_rss_mib_per_worker"] > 0
    assert "report:" in capsys.readouterr().out


# One MoE layer: 440 dense parameters (attention, router, norms, tied embedding) and 4 experts of 96.
TOY = LMConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, num_experts=4, top_k=1, d_ff=4, max_seq_len=8)


def write_run(path: Path, method: str, workers: int, compute: float, syncs: list[tuple[int, float]],
              evals: list[tuple[int, float]], placement: str = "full") -> Path:
    path.mkdir(parents=True)
    lines = [{"kind": "sync", "step": s, "tokens": s * 100, "loss": 1.0, "tokens_per_s": 1.0, "bytes_sent": b,
              "bytes_recv": b} for s, b in syncs]
    lines += [{"kind": "eval", "step": s, "tokens": s * 100, "loss": 1.0, "tokens_per_s": 1.0, "eval_loss": e,
               "bytes_sent": 0, "bytes_recv": 0} for s, e in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    held = Placement.from_spec(placement, workers, TOY.num_experts, TOY.n_layers)
    config = {"train": {"method": method, "workers": workers, "placement": placement, "sync_every": 10},
              "model": TOY.to_dict(), "placement": held.to_dict()}
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps({"compute_s_per_step": compute, "bytes_sent_per_worker":
                                                   syncs[-1][1], "tokens_per_s": 10.0}))
    return path


def test_wan_model_and_time_to_target(tmp_path):
    wan = WAN(bandwidth_mbps=8.0, latency_ms=100.0)   # 1 MB/s, 0.1 s per sequential message
    # diloco, 4 workers: one ring all-reduce of all 824 parameters (chunks of 206): 6 steps of 824 B.
    diloco = Run(write_run(tmp_path / "diloco", "diloco", 4, compute=0.5, syncs=[(10, 2e6), (20, 4e6)],
                           evals=[(10, 3.0), (20, 2.5)]))
    assert diloco.comm_seconds_per_sync(wan) == pytest.approx(6 * 824 / 1e6 + 6 * 0.1)
    # fomoe, replicated(2): the dense 440 over all 4 (6 steps of 440 B), then, one after the other,
    # the two experts each worker shares with one other worker (2 steps of 384 B): 8 messages.
    fomoe = Run(write_run(tmp_path / "fomoe", "fomoe", 4, compute=0.5, syncs=[(10, 1e6), (20, 2e6)],
                          evals=[(10, 3.0), (20, 2.0)], placement="replicated:2"))
    per_sync = 6 * 440 / 1e6 + 2 * 384 / 1e6 + 8 * 0.1
    assert fomoe.comm_seconds_per_sync(wan) == pytest.approx(per_sync)
    assert fomoe.modelled_seconds(wan) == [(0, 0.0), (10, pytest.approx(5 + per_sync)),
                                           (20, pytest.approx(10 + 2 * per_sync))]
    assert fomoe.step_reaching(2.5) == pytest.approx(15.0)       # interpolated between the evals
    assert fomoe.seconds_at_step(15.0, wan) == pytest.approx(7.5 + 1.5 * per_sync)
    assert fomoe.step_reaching(1.0) is None
    # ddp all-reduces the gradients of every step: its sync lines every 10 steps carry 10 each.
    ddp = Run(write_run(tmp_path / "ddp", "ddp", 4, compute=0.5, syncs=[(10, 2e7)], evals=[(10, 3.0)]))
    assert ddp.modelled_seconds(wan)[1] == (10, pytest.approx(5 + 10 * diloco.comm_seconds_per_sync(wan)))
    table, data = compare_table([diloco, fomoe], wan)
    assert data["target_loss"] == 2.5          # the worse method's best loss
    assert data["runs"]["fomoe"]["vs_diloco"] == pytest.approx(2.0)
    assert "2.00x" in table


@pytest.mark.parametrize("argv, message", [
    (["train", "--workers", "0"], "positive integer"),
    (["train", "--method", "sgd"], "invalid choice"),
    (["train", "--compression", "int4"], "invalid choice"),
    (["train", "--method", "diloco", "--placement", "replicated(2)"], "full replicas"),
    (["train", "--placement", "replicated(9)"], "exceeds the number of workers"),
    (["train", "--placement", "scattered"], "unknown placement spec"),
    (["train", "--preset", "huge"], "unknown --preset"),
    (["train", "--eval-every", "7"], "multiple of --sync-every"),
    (["train", "--top-k", "9"], "top_k"),
    (["train", "--d-model", "30", "--heads", "4"], "divisible"),
    (["train", "--data", "/definitely/not/here"], "does not exist"),
    (["train", "--stop-at", "300"], "--stop-at"),
    (["train", "--resume"], "--resume needs --out"),
    (["compare", "--methods", "ddp,sgd"], "--methods"),
    (["export", "/definitely/not/here", "x.safetensors"], "not a directory"),
])
def test_bad_flags_give_clear_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_python_dash_m_fomoe_help():
    proc = subprocess.run([sys.executable, "-m", "fomoe", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("train", "compare", "report", "export", "plan"):
        assert command in proc.stdout
