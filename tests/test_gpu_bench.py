"""`ficoco gpu-bench` on a CPU with the tiny shape: every requested configuration becomes a row with
positive times, the predicted speedups are the FLOPs ratios of the planned counts, the time limit skips
configurations but never the two vanilla runs, and bad arguments are refused before anything runs.
The 7B shape's settings and the GPU machine's wheel list are checked without a model."""
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

from ficoco import methods
from ficoco.config import read_yaml_file
from ficoco.dims import ModelDims, llava_1_5_dims
from ficoco.flops import planned_counts, sample_cost
from ficoco.bench import bench_configs
from ficoco.gpu_bench import NEW_TOKENS, format_table, main, overrides_for, shape_config
from helpers_tiny import emulate_cuda_graphs

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--shape", "tiny", "--device", "cpu", "--warmup", "0", "--prefill-repeats", "2", "--generate-repeats", "1"]


def run_main(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """FiCoCo-V at 64, FastV (cannot reach 64 on 4 layers), an adaptive method; table and JSON."""
    path = tmp_path_factory.mktemp("gpu-bench") / "gpu-bench.json"
    table = run_main([*FAST, "--methods", "ficoco-v", "fastv", "prumerge-adaptive", "--budgets", "64",
                      "--json", str(path)])
    return table, json.loads(path.read_text())


def test_every_requested_configuration_is_a_row_with_positive_times(bench):
    table, result = bench
    assert [(row["method"], row["budget"]) for row in result["rows"]] == [
        ("vanilla", None), ("ficoco-v", 64), ("prumerge-adaptive", None)]
    for row in result["rows"]:
        runs = 2 if row["method"] == "vanilla" else 1                    # vanilla ran first and last, pooled
        assert len(row["prefill_ms_runs"]) == 2 * runs and row["prefill_ms"] > 0
        for batch in ("1", "16"):
            assert len(row["generate_runs"][batch]) == runs and row["throughput"][batch] > 0
        assert row["peak_memory_bytes"] > 0
    assert result["rows"][1]["visual_average"] == 64
    assert result["prompt_tokens"] == 636 and result["new_tokens"] == 32 and result["dtype"] == "float32"
    # a CPU decodes on a static KV cache (the GPU default replays those steps as CUDA graphs); batch 16 repeats
    # the batch-1 sample, so the adaptive method keeps one count in every row and needs no padding
    assert result["decode"] == "static" and "; decode: static KV cache, eager steps;" in table
    assert all(len(run["step_s"]) == 31 and all(step > 0 for step in run["step_s"])
               for row in result["rows"] for runs in row["generate_runs"].values() for run in runs)
    assert "| vanilla | full | – | 576.00 |" in table
    assert "| ficoco-v | 64 | start=2, end=None | 64.00 |" in table
    assert "| prumerge-adaptive | own | – |" in table
    assert "vanilla drift, first → last run: prefill" in table
    # the second table: time to first token at batch 16 and per-token decode, medians of the raw runs
    vanilla, reduced = result["rows"][0], result["rows"][1]
    first_token = {row["method"]: sorted(g["prefill_s"] for g in row["generate_runs"]["16"]) for row in (vanilla, reduced)}
    vanilla_ms = (first_token["vanilla"][0] + first_token["vanilla"][1]) / 2 * 1e3        # the median of two runs
    reduced_ms = first_token["ficoco-v"][0] * 1e3
    decode_ms = [reduced["generate_runs"][batch][0]["per_token_s"] * 1e3 for batch in ("1", "16")]
    step_ms = [sorted(reduced["generate_runs"][batch][0]["step_s"])[15] * 1e3 for batch in ("1", "16")]  # of 31
    line, = [line for line in table.splitlines() if line.startswith(f"| ficoco-v | 64 | {reduced_ms:.0f} |")]
    assert line.startswith(f"| ficoco-v | 64 | {reduced_ms:.0f} | {vanilla_ms / reduced_ms:.2f} | "
                           f"{reduced['predicted_prefill_speedup']:.2f} |")
    assert line.endswith(f"| {decode_ms[0]:.1f} | {decode_ms[1]:.1f} | {step_ms[0]:.1f} | {step_ms[1]:.1f} |")
    assert "- fastv at B=64: fastv: budget B=64 is infeasible" in table
    assert not result["skipped"]


def test_predicted_speedups_are_the_flops_ratios_of_the_planned_counts(bench):
    _, result = bench
    dims = ModelDims(**result["dims"])
    text = result["prompt_tokens"] - dims.visual_tokens

    def macs(method, budget, overrides):
        counts = planned_counts(dims, method, budget, text, **overrides)
        prefill = sample_cost(dims, counts, generated_tokens=1)
        return (prefill["vision_macs"] + prefill["projector_macs"] + prefill["prefill_macs"],
                sample_cost(dims, counts, generated_tokens=NEW_TOKENS)["total_macs"])

    vanilla = macs("vanilla", None, {})
    for row in result["rows"]:
        if not methods.get(row["method"]).budgeted:                     # adaptive: counts only from the run
            continue
        prefill, generate = macs(row["method"], row["budget"], row["overrides"])
        assert row["predicted_prefill_speedup"] == pytest.approx(vanilla[0] / prefill, rel=1e-12)
        assert row["predicted_generate_speedup"] == pytest.approx(vanilla[1] / generate, rel=1e-12)
        assert row["prefill_measured_over_predicted"] == pytest.approx(
            row["prefill_speedup"] / row["predicted_prefill_speedup"])
        assert row["generate_measured_over_predicted"]["16"] == pytest.approx(
            row["throughput_speedup"]["16"] / row["predicted_generate_speedup"])


def test_generate_decodes_as_the_first_h200_run_did(tmp_path):
    path = tmp_path / "gpu-bench.json"
    table = run_main([*FAST, "--decode", "generate", "--methods", "ficoco-v", "--budgets", "64", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["decode"] == "generate" and "; decode: HF generate, dynamic KV cache, eager steps;" in table
    assert [row["method"] for row in result["rows"]] == ["vanilla", "ficoco-v"]
    assert all("step_s" not in run for row in result["rows"] for runs in row["generate_runs"].values() for run in runs)
    assert "median step ms" not in table                  # generate times no single step


def graph_bench(monkeypatch, replayed=lambda logits: logits) -> str:
    """`--decode graph` on the CPU, the CUDA graph parts emulated (helpers_tiny.emulate_cuda_graphs): the table."""
    import argparse
    import time

    import ficoco.gpu_bench as gpu_bench

    emulate_cuda_graphs(monkeypatch, replayed)
    args = argparse.Namespace(shape="tiny", device="cpu", dtype=None, decode="graph", methods=["ficoco-l"],
                              budgets=[64], warmup=0, prefill_repeats=1, generate_repeats=1, time_limit=60.0,
                              profile=None)
    result = gpu_bench.run(args, time.perf_counter())
    assert [row["graph_check"] is not None for row in result["rows"]] == [True, True]
    return format_table(result)


def test_graph_replays_are_checked_against_eager_steps(monkeypatch):
    table = graph_bench(monkeypatch)
    assert "; decode: static KV cache, each step a replayed CUDA graph;" in table
    assert ("graph replays against eager steps (batch 1, 32 tokens, before the timed runs): the same tokens and logits "
            "bit for bit in 2 of 2 configurations, largest logit difference 0") in table
    assert "MISMATCH" not in table


def test_a_replay_that_differs_is_listed(monkeypatch):
    table = graph_bench(monkeypatch, replayed=lambda logits: logits.roll(1, dims=-1))   # another argmax
    assert "bit for bit in 0 of 2 configurations" in table
    assert "- MISMATCH: vanilla at B=full: the replays compute other tokens than the eager steps" in table
    assert "- MISMATCH: ficoco-l at B=64: the replays compute other tokens" in table


def test_a_replay_with_other_logits_but_the_same_tokens_is_a_mismatch(monkeypatch):
    """Random weights give close top logits: a replay that computes slightly other logits (a value frozen into the
    capture, say) can keep every argmax. The check wants the logits bit for bit: the session then decodes eagerly."""
    table = graph_bench(monkeypatch, replayed=lambda logits: logits * (1 + 1e-6))
    assert "bit for bit in 0 of 2 configurations" in table
    assert "- MISMATCH: vanilla at B=full: the replays compute other logits than the eager steps" in table


def test_the_time_limit_skips_configurations_but_not_the_vanilla_runs(tmp_path):
    path = tmp_path / "gpu-bench.json"
    table = run_main([*FAST, "--methods", "ficoco-v", "--budgets", "64", "--time-limit", "0.001",
                      "--json", str(path)])
    result = json.loads(path.read_text())
    assert [(row["method"], len(row["prefill_ms_runs"])) for row in result["rows"]] == [("vanilla", 4)]
    assert [method for method, _, _ in result["skipped"]] == ["ficoco-v"]
    assert "Skipped (time limit 0 s reached):\n- ficoco-v at B=64" in table


def test_a_failing_configuration_is_listed_and_fails_the_run_without_losing_the_others(tmp_path, monkeypatch, capsys):
    """One method's error (on a GPU: a kernel, a dtype) is reported under the table and makes the exit
    status 1, while vanilla's rows still come back; `--profile` appends one section per configuration run."""
    import ficoco.gpu_bench as gpu_bench

    real = gpu_bench.run_config

    def failing(model, inputs, method, *rest, **kwargs):
        if method == "evit":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(model, inputs, method, *rest, **kwargs)

    monkeypatch.setattr(gpu_bench, "run_config", failing)
    path, profile = tmp_path / "gpu-bench.json", tmp_path / "profile.txt"
    assert main([*FAST, "--methods", "evit", "--budgets", "64", "--json", str(path), "--profile", str(profile)]) == 1
    result, captured = json.loads(path.read_text()), capsys.readouterr()
    assert [row["method"] for row in result["rows"]] == ["vanilla"]
    assert result["failed"] == [["evit", 64, "RuntimeError: no kernel image is available for execution on the device"]]
    assert "Failed (traceback on stderr):\n- evit at B=64: RuntimeError: no kernel image" in captured.out
    assert "Traceback" in captured.err
    sections = [line for line in profile.read_text().splitlines() if line.startswith("## ")]
    assert len(sections) == 2 and all(line.startswith("## vanilla B=None: ") for line in sections)
    assert "aten::" in profile.read_text()


def test_a_failing_last_vanilla_keeps_the_table_against_the_first(tmp_path, monkeypatch, capsys):
    """The closing vanilla run fails (on a GPU: a capture that poisoned the context): every finished configuration
    still comes back, set against the first vanilla run, with the failure listed and exit status 1."""
    import ficoco.gpu_bench as gpu_bench

    real, vanilla_runs = gpu_bench.run_config, []

    def last_vanilla_fails(model, inputs, method, *rest, **kwargs):
        if method == "vanilla":
            vanilla_runs.append(method)
            if len(vanilla_runs) == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, inputs, method, *rest, **kwargs)

    monkeypatch.setattr(gpu_bench, "run_config", last_vanilla_fails)
    path = tmp_path / "gpu-bench.json"
    assert main([*FAST, "--methods", "ficoco-v", "--budgets", "64", "--json", str(path)]) == 1
    result = json.loads(path.read_text())
    assert [row["method"] for row in result["rows"]] == ["vanilla", "ficoco-v"]
    assert len(result["rows"][0]["prefill_ms_runs"]) == len(result["rows"][1]["prefill_ms_runs"])   # one vanilla run
    assert result["failed"] == [["vanilla", None, "RuntimeError: CUDA error: an illegal memory access was encountered"]]
    assert "- vanilla at B=full: RuntimeError: CUDA error" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fastv2"], "unknown method 'fastv2'; valid methods: vanilla, ficoco-v"),
    (["--budgets", "64", "0"], "--budgets 0: valid budgets are 1..575"),
    (["--budgets", "576"], "--budgets 576: valid budgets are 1..575"),
    (["--shape", "llava-13b"], "invalid choice: 'llava-13b' (choose from"),
    (["--shape", "llava-7b", "--device", "cpu"], "--shape llava-7b needs a CUDA GPU"),
    (["--generate-repeats", "0"], "need --warmup >= 0, --prefill-repeats >= 1, --generate-repeats >= 1"),
    (["--device", "cpu", "--decode", "graph"], "--decode graph replays CUDA graphs; on cpu use --decode static"),
])
def test_a_bad_argument_is_refused_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as refused:
        main(["--shape", "tiny", *argv])
    assert refused.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_is_refused_where_torch_sees_none(capsys):
    with pytest.raises(SystemExit):
        main(["--shape", "tiny", "--device", "cuda"])
    assert "device='cuda' but torch sees no CUDA device" in capsys.readouterr().err


def test_the_7b_shape_is_llava_1_5_7b_with_the_paper_grids_settings():
    dims = ModelDims.from_config(shape_config("llava-7b"))
    assert dims == llava_1_5_dims("7b")                     # 32 heads of 128, not 64 of 64
    configs, unreachable = bench_configs(methods.names(), [192, 128, 64], dims, overrides=overrides_for("llava-7b"))
    ran = {(name, budget): overrides for name, budget, overrides in configs}
    # a calibrated method runs only with its fitted schedule (`--variant fitprune:deletions=[...]`)
    calibrated = {name for name in methods.names() if methods.get(name).calibrated}
    assert calibrated == {"fitprune"}
    assert [line.split(" at ")[0] for line in unreachable] == ["fitprune"] * 3
    assert all("needs its fitted deletion schedule" in line for line in unreachable)
    assert {name for name, _ in ran} == set(methods.names()) - calibrated and configs[0] == ("vanilla", None, {})
    for name in ("ficoco-v", "ficoco-l", "ficoco-vl"):
        assert {budget for method, budget in ran if method == name} == {192, 128, 64}
    # the defaults everywhere, but FiCoCo-L at 64 as config/paper.yaml runs it (start 4 cannot average 64)
    paper = read_yaml_file(ROOT / "config" / "paper.yaml")["method_params"]["ficoco-l"]["per_budget"][64]
    assert ran[("ficoco-l", 64)] == paper and paper["start"] < 4
    assert ran[("ficoco-l", 192)] == ran[("ficoco-v", 64)] == {}
    assert ran[("prumerge-adaptive", None)] == {}


def test_the_gpu_wheels_are_the_locked_transformers_and_its_closure_without_numpy():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "tools" / "gpu_wheels.py")
    gpu_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_wheels)
    import transformers
    from ficoco.models.guard import TESTED_TRANSFORMERS

    entries, names = gpu_wheels.lock_entries(), gpu_wheels.closure()
    assert entries["transformers"][0] == transformers.__version__ and transformers.__version__ in TESTED_TRANSFORMERS
    assert {"transformers", "huggingface-hub", "tokenizers", "safetensors", "regex", "pyyaml", "tqdm"} <= set(names)
    assert "numpy" not in names and "torch" not in names
    assert all(entries[name][1] for name in names)          # every wheel is checked against the lock's hashes


FAKE_BENCH = '''
import json, sys

argv = sys.argv[1:]
last = lambda flag: argv[len(argv) - 1 - argv[::-1].index(flag) + 1]
with open(sys.argv[0] + ".calls", "a") as calls:
    print(json.dumps(argv), file=calls)
smoke = "ficoco-vl" in argv
if smoke and "{mode}" == "fail":
    sys.exit(1)
check = {{"tokens_equal": "{mode}" != "mismatch", "max_logit_difference": 0.0, "passed": "{mode}" != "mismatch"}}
rows = [{{"method": "vanilla", "graph_check": check if last("--decode") == "graph" else None}}]
json.dump({{"decode": last("--decode"), "rows": rows}}, open(last("--json"), "w"))
print("table of", last("--decode"))
'''


def run_session(tmp_path, bench: str, *args: str):
    """tools/gpu-session.sh with GPU_BENCH=bench: its exit status and what it wrote to OUT."""
    import subprocess
    import sys

    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu-session.sh"), "out", *args], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_BENCH": bench},
                          cwd=tmp_path, timeout=600)          # OUT_DIR relative to the caller's folder
    return done.returncode, {path.name: path.read_text() for path in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("mode, decode", [("pass", "graph"), ("mismatch", "static"), ("fail", "static")])
def test_the_gpu_session_decodes_the_full_table_with_graphs_only_where_the_capture_check_passed(tmp_path, mode,
                                                                                                 decode):
    import sys

    fake = tmp_path / "fake_bench.py"
    fake.write_text(FAKE_BENCH.format(mode=mode))
    status, written = run_session(tmp_path, f"{sys.executable} {fake}", "--shape", "tiny")
    smoke, full = [json.loads(line) for line in Path(f"{fake}.calls").read_text().splitlines()]
    assert smoke[:8] == ["--decode", "graph", "--methods", "ficoco-v", "ficoco-l", "ficoco-vl", "--budgets", "64"]
    assert smoke[8:12] == ["--profile", str(tmp_path / "out" / "smoke-profile.txt"), "--shape", "tiny"]
    assert full[:4] == ["--time-limit", "330", "--shape", "tiny"]
    assert full[4:6] == ["--decode", decode]                # after the caller's arguments: the session decides
    assert status == 0 and written["gpu-bench.md"] == f"table of {decode}\n"
    assert written["session.txt"].startswith(f"full table: --decode {decode} (the capture check "
                                             f"{'passed' if decode == 'graph' else 'failed'}")


def test_the_gpu_session_on_a_cpu_falls_back_to_eager_steps_and_still_runs_the_table(tmp_path):
    """The real gpu-bench, tiny shape: a CPU refuses the graph check (exit status 2), so the table is decoded
    eagerly on the static cache, with both vanilla runs and the method's row."""
    import sys

    status, written = run_session(tmp_path, f"{sys.executable} -m ficoco.gpu_bench",
                                  *FAST, "--device", "cpu", "--methods", "ficoco-v", "--budgets", "64")
    assert status == 0, written["gpu-bench.err"]
    assert written["session.txt"] == "full table: --decode static (the capture check failed: exit status 2, or " \
                                     "replayed tokens that differ from the eager ones; smoke.md, smoke.err)\n"
    assert "--decode graph replays CUDA graphs; on cpu use --decode static" in written["smoke.err"]
    result = json.loads(written["gpu-bench.json"])
    assert result["decode"] == "static" and [row["method"] for row in result["rows"]] == ["vanilla", "ficoco-v"]
    assert "; decode: static KV cache, eager steps;" in written["gpu-bench.md"]
