"""The main job runs end to end and writes what the README promises (no timing is asserted)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_module():
    return load_script("run")


def test_run_checks_parity_and_writes_table_json_and_plot(run_module, tmp_path, capsys):
    status = run_module.main(["--device", "cpu", "--quick", "--reps", "1",
                              "--only", "seed-chars", "small-batch", "cell-B8",
                              "--out", str(tmp_path)])
    assert status == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in report["rows"]] == ["seed-chars", "small-batch", "cell-B8"]
    for row in report["rows"]:
        assert row["parity"]["ok"] and row["parity"]["out"] < 1e-5
        assert set(row["train"]) == set(row["infer"]) == {"nn.LSTM", "FusedLSTM", "reference"}
    table = (tmp_path / "results.md").read_text()
    assert "| seed-chars | float32 | 799 | - | 5 | 4 | 1 |" in table
    assert table.splitlines()[-1] in capsys.readouterr().out
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_check_catches_a_wrong_answer(run_module):
    ref, fused, x = run_module.make_case(run_module.configs.CPU[1], torch.device("cpu"),
                                         torch.float32)
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
    tiny = module.Grid(T=(1, 5), B=(1, 3), H=(8, 16), layers=(1, 2), cell_B=(1, 3), cell_H=(4,),
                       cell_T=3)
    assert module.main(["--reps", "1", "--out", str(tmp_path)], grid=tiny) == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert {"machine", "torch", "threads", "date", "command"} <= set(report)
    assert len(report["rows"]) == 2 * (2 * 2 * 2 * 2 + 2)  # both dtypes, 16 LSTM + 2 cell cases
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
        ["train", "nn.LSTM"], ["train", "FusedLSTM"], ["infer", "nn.LSTM"], ["infer", "FusedLSTM"]]
    for row in rows:
        *parts, total = (float(v) for v in row.strip("| ").split(" | ")[4:])
        # Every figure is printed to 0.01 ms: the parts add up to the total within their rounding.
        assert total > 0 and abs(sum(parts) - total) <= 0.005 * (len(parts) + 1)


def test_breakdown_profiles_each_sweep_case_below_one(tmp_path, capsys):
    module = load_script("breakdown")

    def row(case, kind, T, B, H, train, infer):
        return {"case": case, "kind": kind, "dtype": "float64", "T": T, "B": B, "I": H, "H": H,
                "layers": 1, "train": {"ratio": train}, "infer": {"ratio": infer}}

    sweep_json = tmp_path / "sweep.json"
    sweep_json.write_text(json.dumps({"rows": [
        row("L1 T3 B2 H8", "lstm", 3, 2, 8, 0.5, 2.0), row("cell B1 H4", "cell", 3, 1, 4, 0.9, 0.8),
        row("L1 T3 B1 H8", "lstm", 3, 1, 8, 1.0, 1.5)]}))
    assert module.main(["--sweep", str(sweep_json), "--steps", "1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| L1") or line.startswith("| cell")]
    assert [r[:4] for r in rows] == [["| L1 T3 B2 H8", "float64", "train", "0.50x"],
                                     ["| cell B1 H4", "float64", "train", "0.90x"],
                                     ["| cell B1 H4", "float64", "infer", "0.80x"]]
    for r in rows:
        figures = [float(v) for v in r[4:-1]] + [float(r[-1].rstrip(" |"))]
        fused, nn, (fused_gflops, nn_gflops) = figures[:7], figures[7:14], figures[14:]
        for split in (fused, nn):
            assert split[-1] > 0 and abs(sum(split[:-1]) - split[-1]) <= 0.005 * 7
        assert fused_gflops > 0 and nn_gflops > 0
