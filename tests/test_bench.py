"""`ficoco bench` on a tiny LLaVA-shaped model: every method it is asked for is timed in the same
interleaved rounds, each at the budgets its scaled layer settings reach (the rest listed, not run),
and its predicted speedup is the FLOPs ratio of the counts the method plans."""
import json
import re

import pytest

from ficoco import methods
from ficoco.bench import bench_configs, main, scaled_layers
from ficoco.dims import ModelDims
from ficoco.flops import planned_counts, sample_cost

TINY = ["--vision-layers", "4", "--vision-hidden", "64", "--llm-layers", "4", "--llm-hidden", "64", "--llm-mlp",
        "128", "--repeats", "5", "--warmup", "0", "--step-repeats", "1", "--threads", "1", "--no-llava-scale"]
CHOSEN = ["ficoco-v", "fastv", "downsample", "visionzip", "divprune", "pdrop-official", "prumerge-adaptive", "evit"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main([*TINY, "--budgets", "192", "64", "--methods", *CHOSEN, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_scaled_layers_keep_their_place_in_a_shallower_stack():
    assert scaled_layers(12, 23, 7) == 4                          # FiCoCo-V's start, halfway up
    assert scaled_layers(2, 32, 8, lowest=1) == 1                 # FastV's K scores from K − 1
    assert scaled_layers([7, 13, 19], 23, 3) == [0, 1, 2]         # three EViT stages in three layers
    assert scaled_layers([2, 8, 16], 32, 8) == [0, 2, 4]
    assert scaled_layers(None, 23, 7) is None


def test_every_chosen_method_runs_at_what_it_reaches(result):
    ran = {(row["method"], row["budget"]) for row in result["rows"]}
    assert ("vanilla", None) in ran
    assert {("ficoco-v", 192), ("ficoco-v", 64), ("fastv", 192), ("downsample", 64), ("visionzip", 64),
            ("divprune", 192), ("pdrop-official", None), ("prumerge-adaptive", None), ("evit", 64)} <= ran
    # FastV at K = 1 of 4 layers cannot average 64: listed, not run
    assert ("fastv", 64) not in ran
    assert any(line.startswith("fastv at B=64: ") and "minimum achievable average" in line
               for line in result["unreachable"])
    # a fixed published schedule runs once at its own counts and is not listed as unreachable
    assert not [line for line in result["unreachable"] if line.startswith("pdrop-official")]


def test_predicted_speedup_is_the_flops_ratio_of_the_planned_counts(result):
    dims = ModelDims(**result["dims"])
    text = result["prompt_tokens"] - dims.visual_tokens

    def macs(method, budget, overrides):
        cost = sample_cost(dims, planned_counts(dims, method, budget, text, **overrides), generated_tokens=1)
        return cost["vision_macs"] + cost["projector_macs"] + cost["prefill_macs"]

    vanilla = macs("vanilla", None, {})
    for row in result["rows"]:
        if not methods.get(row["method"]).budgeted:               # adaptive: counts only from the run
            continue
        expected = vanilla / macs(row["method"], row["budget"], row["overrides"])
        assert row["predicted_speedup"] == pytest.approx(expected, rel=1e-12), row["method"]
        assert row["prefill_ms_median"] > 0 and len(row["prefill_ms"]) == 5
        assert row["measured_over_predicted"] == pytest.approx(row["measured_speedup"] / row["predicted_speedup"])


def test_each_run_reports_its_selection_overhead(result):
    """vanilla and image resizing add no products; every other chosen method scores or merges with some."""
    for row in result["rows"]:
        if row["method"] in ("vanilla", "downsample"):
            assert row["overhead_gmacs"] == 0, row["method"]
        else:
            assert row["overhead_gmacs"] > 0, (row["method"], row["budget"])


def test_a_variant_runs_beside_its_method_in_the_same_rounds(tmp_path):
    path = tmp_path / "bench.json"
    assert main([*TINY, "--budgets", "192", "--methods", "ficoco-l", "--variant", "ficoco-l:placement=attention",
                 "--json", str(path)]) == 0
    rows = {row["overrides"].get("placement", "input"): row for row in json.loads(path.read_text())["rows"]
            if row["method"] == "ficoco-l"}
    assert set(rows) == {"input", "attention"}
    assert rows["attention"]["visual_average"] <= 192 and rows["input"]["visual_average"] <= 192
    # after attention the scores come with the layer's own probabilities: less selection work
    assert rows["attention"]["overhead_gmacs"] < rows["input"]["overhead_gmacs"]


@pytest.mark.parametrize("variant, message", [
    ("ficoco-l", "expected METHOD:PARAM=VALUE"),
    ("ficoco-l:placement", "expected METHOD:PARAM=VALUE"),
    ("ficoco-l:placement=middle", "placement='middle' must be one of ['input', 'attention']"),
    ("ficoco-l:size=3", "unknown parameter(s) ['size']"),
    ("ficoco-x:k=0", "unknown method"),
])
def test_a_bad_variant_is_refused_before_anything_runs(capsys, variant, message):
    with pytest.raises(SystemExit) as refused:
        main([*TINY, "--methods", "ficoco-l", "--variant", variant])
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_table_lists_every_run_and_what_was_not_run(capsys):
    assert main([*TINY, "--budgets", "64", "--methods", "fastv", "ficoco-v"]) == 0
    table = capsys.readouterr().out
    assert "| ficoco-v | 64 | start=2, end=None |" in table
    assert "Not run (unreachable on the bench model with its scaled layer settings):" in table
    assert "- fastv at B=64: fastv: budget B=64 is infeasible" in table


def test_profile_appends_one_section_per_configuration(tmp_path):
    """`--profile`: after the timed rounds, one profiled prefill per configuration, its operators by host time
    (where a configuration's time goes beyond its FLOPs)."""
    profile = tmp_path / "profile.txt"
    assert main([*TINY, "--budgets", "64", "--methods", "ficoco-v", "--profile", str(profile)]) == 0
    text = profile.read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert [title.rsplit(": ", 1)[0] for title in titles] == ["## vanilla B=None {}",
                                                               "## ficoco-v B=64 {'start': 2, 'end': None}"]
    assert all(re.fullmatch(r".*: 0 kernel launches, \d+ host reads of device values", title) for title in titles)
    assert text.count("aten::mm ") == 2 and text.count("Self CPU time total") == 2


def test_an_unknown_method_is_refused_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main([*TINY, "--methods", "fastv2"])
    assert "unknown method 'fastv2'; valid methods: vanilla, ficoco-v" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--warmup", "-3"], "need --warmup >= 0"),
                                           (["--repeats", "3"], "--repeats must be >= 5")])
def test_counts_of_rounds_that_cannot_be_are_refused(capsys, argv, message):
    """`--warmup -3 --repeats 5` would time 2 rounds under a header saying 5."""
    with pytest.raises(SystemExit):
        main([*TINY, *argv])
    assert message in capsys.readouterr().err


def test_configs_of_a_bench_model_cover_every_registered_method():
    dims = ModelDims(vision_layers=8, vision_hidden=64, vision_mlp=128, vision_heads=1, image_size=336, patch_size=14,
                     feature_layer=-2, select_strategy="default", llm_layers=8, llm_hidden=64, llm_mlp=128,
                     llm_heads=1, llm_kv_heads=1, vocab_size=100, projector_hidden=64)
    configs, unreachable = bench_configs(methods.names(), [192, 128, 64], dims)
    names = {name for name, _, _ in configs}
    listed = {line.split(" ")[0] for line in unreachable}
    assert names | listed == set(methods.names())
    assert {"ficoco-v", "ficoco-l", "ficoco-vl", "fastv", "pdrop", "sparsevlm", "tome", "evit"} <= names


def test_a_fitted_fitprune_schedule_runs_once_as_a_variant(tmp_path, capsys):
    """FitPrune cannot be planned before its fit: listed as not run; its fitted deletions (a list, commas
    and all) time once, at the smallest budget their layer average meets."""
    path = tmp_path / "bench.json"
    deletions = [300, 150, 50, 0]                  # 4 LLM layers: attention sees 576, 276, 126, 76 (average 263.5)
    assert main([*TINY, "--budgets", "576", "300", "264", "--methods", "fitprune",
                 "--variant", f"fitprune:deletions={deletions}", "--json", str(path)]) == 0
    assert "fitprune at B=264: fitprune: budget 264 needs its fitted deletion schedule" in capsys.readouterr().out
    rows = [row for row in json.loads(path.read_text())["rows"] if row["method"] == "fitprune"]
    assert len(rows) == 1 and rows[0]["budget"] == 264 and rows[0]["overrides"] == {"deletions": deletions}
    assert rows[0]["visual_average"] == pytest.approx(263.5) and rows[0]["overhead_gmacs"] == 0
