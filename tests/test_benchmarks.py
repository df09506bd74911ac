"""The main job runs end to end and writes what the README promises (no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_module():
    return load_script("run")


def test_run_checks_parity_and_writes_table_json_and_plot(run_module, tmp_path, capsys):
    status = run_module.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--reps",
            "1",
            "--only",
            "seed-chars",
            "small-batch",
            "cell-B8",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [(r["config"], r["dtype"]) for r in report["rows"]] == [
        ("seed-chars", "float32"),
        ("small-batch", "float32"),
        ("small-batch", "bfloat16"),
        ("cell-B8", "float32"),
    ]
    for row in report["rows"]:
        assert row["parity"]["ok"]
        assert row["parity"]["out"] < 1e-5 or row["dtype"] == "bfloat16"
        assert set(row["train"]) == set(row["infer"]) == {"nn.LSTM", "FusedLSTM", "reference"}
    table = (tmp_path / "results.md").read_text()
    # The CPU's table keeps its columns whatever the GPU's gained.
    assert (
        "| config | dtype | T | B | I | H | L | parity out / grad max abs diff | "
        "train nn.LSTM ms | train Fused ms | **train ratio** | train ref ms | "
        "infer nn.LSTM ms | infer Fused ms | **infer ratio** | saved MB nn.LSTM | "
        "saved MB Fused |\n" + "|---" * 17 + "|\n"
    ) in table
    assert "| seed-chars | float32 | 799 | - | 5 | 4 | 1 |" in table
    assert "TF32" not in table and "per_step" not in report["rows"][0]
    assert table.splitlines()[-1] in capsys.readouterr().out
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_rows_time_nn_lstm_with_and_without_tf32_and_the_per_step_slope(run_module):
    """What a GPU run adds, on the CPU: the rows' structure and table, not the GPU's timings."""
    cfg = run_module.configs.CPU[1]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    try:
        rows = [
            run_module.measure(
                cfg, torch.device("cpu"), dtype, 1, False, run_module.Progress(3), gpu_rows=True
            )
            for dtype in (torch.float32, torch.float64)
        ]
        # the caller's settings, not measure's, after it
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (
            True,
            False,
        )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    f32, f64 = rows
    for mode in ("train", "infer"):
        assert (
            set(f32[mode]) == set(f32["per_step"][mode]) == {"nn.LSTM", "FusedLSTM", "nn.LSTM TF32"}
        )
        assert set(f64[mode]) == set(f64["per_step"][mode]) == {"nn.LSTM", "FusedLSTM"}
    header, rule, line32, line64 = run_module.markdown_table(rows).splitlines()
    columns = header.strip("| ").split(" | ")
    assert len(rule.split("|")) == len(columns) + 2
    assert columns[8:14] == [
        "train nn.LSTM ms TF32 off",
        "train nn.LSTM ms TF32 on",
        "train Fused ms",
        "**train ratio** vs TF32 off",
        "train nn.LSTM µs/step TF32 off",
        "train Fused µs/step",
    ]
    assert "train ref ms" not in columns and "infer nn.LSTM ms TF32 on" in columns
    tf32_on = columns.index("train nn.LSTM ms TF32 on")
    assert line32.strip("| ").split(" | ")[tf32_on] != "-"
    assert line64.strip("| ").split(" | ")[tf32_on] == "-"


def test_tf32_switches_both_and_restores_them(run_module):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        with pytest.raises(ZeroDivisionError), run_module.tf32(True):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
            with run_module.tf32(False):
                assert not (
                    torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
                )
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
            1 / 0
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (
            False,
            True,
        )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_per_step_is_the_slope_between_T_and_its_first_half(run_module):
    # 20 us fixed + 3 us a step, at T = 50 and 25
    assert run_module.per_step(20e-6 + 50 * 3e-6, 20e-6 + 25 * 3e-6, 50) == pytest.approx(3e-6)
    # odd T: the half is T // 2 = 50 steps, 51 fewer
    assert run_module.per_step(20e-6 + 101 * 3e-6, 20e-6 + 50 * 3e-6, 101) == pytest.approx(3e-6)


def test_gpu_configurations_include_deepbench_latency_rows(run_module):
    """DeepBench's inference LSTM: T 50, I = H = 1024, B 1, 4 and 8, in both half precisions."""
    rows = {(c.B, c.T, c.I, c.H, c.layers, c.cell): set(c.dtypes) for c in run_module.configs.GPU}
    for B in (1, 4, 8):
        assert rows[(B, 50, 1024, 1024, 1, False)] == {"float16", "bfloat16"}


def test_gpu_check_without_python_records_each_step_and_fails(tmp_path):
    """Where nothing builds, the script still writes every step's line and skips what needs the
    build."""
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [
        "env",
        "build",
        "sass_check",
        "test_cuda",
        "bench",
        "total",
    ]
    assert lines[1].startswith("build rc=1 seconds=")
    assert lines[2:5] == [
        "sass_check skipped: no build with the CUDA kernels",
        "test_cuda skipped: no build with the CUDA kernels",
        "bench skipped: no build with the CUDA kernels",
    ]
    assert (tmp_path / "build.log").exists()


def test_run_without_matplotlib_still_writes_the_figures(run_module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    assert (
        run_module.main(
            ["--device", "cpu", "--reps", "1", "--only", "seed-chars", "--out", str(tmp_path)]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_parity_check_catches_a_wrong_answer(run_module):
    ref, fused, x = run_module.make_case(
        run_module.configs.CPU[1], torch.device("cpu"), torch.float32
    )
    assert run_module.parity(ref, fused, x)["ok"]
    with torch.no_grad():
        fused.weight_hh_l0[0, 0] += 0.1
    result = run_module.parity(ref, fused, x)
    assert not result["ok"] and result["out"] > 1e-3


def test_unknown_configuration_is_an_error(run_module):
    with pytest.raises(SystemExit):
        run_module.main(["--device", "cpu", "--only", "fastrnns"])


def test_ops_timing_prints_each_configuration(capsys):
    module = load_script("ops")
    assert module.main(["--only", "seed-chars", "small-batch", "--reps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["seed-chars", "small-batch"]
    assert all("forward" in line and "backward" in line and "one step" in line for line in lines)
    with pytest.raises(SystemExit):
        module.main(["--only", "cell-B1"])


def test_regulariser_costs_print_a_ratio_per_option(tmp_path, capsys):
    module = load_script("regularisers")
    assert module.main(["--reps", "1", "--only", "seed-chars", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "regularisers.json").read_text())
    (row,) = report["rows"]
    assert row["config"] == "seed-chars" and set(row["ratios"]) == set(module.OPTIONS)
    assert all(r > 0 for r in row["ratios"].values())
    assert "| seed-chars |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--only", "cell-B1"])


def test_sweep_writes_table_json_and_heatmap(tmp_path, capsys):
    module = load_script("sweep")
    tiny = module.Grid(
        T=(1, 5), B=(1, 3), H=(8, 16), layers=(1, 2), cell_B=(1, 3), cell_H=(4,), cell_T=3
    )
    assert module.main(["--reps", "1", "--out", str(tmp_path)], grid=tiny) == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert {"machine", "torch", "threads", "date", "command"} <= set(report)
    dtypes = len(module.DTYPES)
    assert len(report["rows"]) == dtypes * (2 * 2 * 2 * 2 + 2)  # 16 LSTM + 2 cell cases a dtype
    for row in report["rows"]:
        assert row["parity"]["ok"]
        assert row["train"]["ratio"] > 0 and row["infer"]["ratio"] > 0
    table = (tmp_path / "sweep.md").read_text()
    assert "| layers | T | B | H=8 | H=16 |" in table and "| B | H=4 |" in table
    assert "below 1.0x" in capsys.readouterr().err
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_splits_each_step_into_the_categories(capsys):
    module = load_script("breakdown")
    assert module.category("fused_lstm::layer_backward") == "step loops"
    assert module.category("mkldnn::_linear_pointwise") == "products"
    assert module.category("aten::addmm_") == "products"  # the one-step path accumulates in place
    assert module.category("aten::copy_") == "copies"
    assert module.main(["--only", "seed-chars", "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| seed")]
    assert [row.split(" | ")[2:4] for row in rows] == [
        ["train", "nn.LSTM"],
        ["train", "FusedLSTM"],
        ["infer", "nn.LSTM"],
        ["infer", "FusedLSTM"],
    ]
    for row in rows:
        *parts, total = (float(v) for v in row.strip("| ").split(" | ")[4:])
        # Every figure is printed to 0.01 ms: the parts add up to the total within their rounding.
        assert total > 0 and abs(sum(parts) - total) <= 0.005 * (len(parts) + 1)


def test_breakdown_profiles_each_sweep_case_below_one(tmp_path, capsys):
    module = load_script("breakdown")

    def row(case, kind, T, B, H, train, infer):
        return {
            "case": case,
            "kind": kind,
            "dtype": "float64",
            "T": T,
            "B": B,
            "I": H,
            "H": H,
            "layers": 1,
            "train": {"ratio": train},
            "infer": {"ratio": infer},
        }

    sweep_json = tmp_path / "sweep.json"
    sweep_json.write_text(
        json.dumps(
            {
                "rows": [
                    row("L1 T3 B2 H8", "lstm", 3, 2, 8, 0.5, 2.0),
                    row("cell B1 H4", "cell", 3, 1, 4, 0.9, 0.8),
                    row("L1 T3 B1 H8", "lstm", 3, 1, 8, 1.0, 1.5),
                ]
            }
        )
    )
    assert module.main(["--sweep", str(sweep_json), "--steps", "1"]) == 0
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| L1") or line.startswith("| cell")
    ]
    assert [r[:4] for r in rows] == [
        ["| L1 T3 B2 H8", "float64", "train", "0.50x"],
        ["| cell B1 H4", "float64", "train", "0.90x"],
        ["| cell B1 H4", "float64", "infer", "0.80x"],
    ]
    for r in rows:
        figures = [float(v) for v in r[4:-1]] + [float(r[-1].rstrip(" |"))]
        fused, nn, (fused_gflops, nn_gflops) = figures[:7], figures[7:14], figures[14:]
        for split in (fused, nn):
            assert split[-1] > 0 and abs(sum(split[:-1]) - split[-1]) <= 0.005 * 7
        assert fused_gflops > 0 and nn_gflops > 0
