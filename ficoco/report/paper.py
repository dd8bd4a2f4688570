"""The FiCoCo paper's published numbers (spec/paper-results.md §9) and how our names map onto them.

`ficoco/paper_results.csv` is the CSV block of the spec, verbatim. Only cells whose model, method,
budget label and benchmark column all map from one of our runs are ever shown.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

# Our benchmark id -> the paper's column (benchmarks.md §4), in the paper's column order.
# The paper's SQA is overall accuracy (4,241 questions): scienceqa_full compares with it; the IMG
# subset (scienceqa_img, the project's primary SQA number) does not, so it maps to nothing.
PAPER_BENCHMARKS = {
    "scienceqa": "SQA",
    "scienceqa_full": "SQA",
    "textvqa": "VQAT",
    "pope": "POPE",
    "vizwiz": "VizWiz",
    "mmvet": "MM-Vet",
    "mmbench_cn": "MMB-CN",
    "gqa": "GQA",
    "llava_wild": "LLaVA-W",
    "mmbench": "MMB",
    "vqav2": "VQAv2",
    "mmmu": "MMMU",
}
# Columns the paper scored on an evaluation server's test-dev split; ours are local validation splits.
SERVER_ONLY_COLUMNS = ("VizWiz", "VQAv2")

PAPER_MODELS = {"llava-1.5-7b": "LLaVA-1.5-7B", "llava-1.5-13b": "LLaVA-1.5-13B", "llava-next-7b": "LLaVA-NeXT-7B",
                "qwen2-vl-7b": "Qwen2-VL-7B"}

# Per paper model, our budget (average visual tokens per LLM layer; LLaVA-NeXT: of its nominal 2,880-token
# image, docs/flops.md) -> the paper's nominal TFLOPs label (issue #3), or its token label (Qwen2-VL: our
# per-image counts). The 13B rows share one unstated budget ("13B budget"), so reduced 13B runs find no paper cell.
PAPER_BUDGET_LABELS = {
    "LLaVA-1.5-7B": {"full": "vanilla", "192": "3.3T", "128": "2.4T", "64": "1.5T"},
    "LLaVA-1.5-13B": {"full": "vanilla"},
    "LLaVA-NeXT-7B": {"full": "vanilla", "320": "5.0T", "160": "2.9T"},
    # v4 Table 3: a token count for every image (about 1,300 before), our per-image budget labels
    "Qwen2-VL-7B": {"full": "vanilla", "n600": "600 tokens", "n500": "500 tokens", "n400": "400 tokens"},
}

# Method names, compared after `name_key` (lower case, letters and digits only): ours -> paper's.
PAPER_METHODS = {
    "vanilla": "vanilla",
    "ficocov": "FiCoCo-V",
    "ficocol": "FiCoCo-L",
    "ficocovl": "FiCoCo-VL",
    "fastv": "FastV",
    "sparsevlm": "SparseVLM",
    "pdrop": "PDrop",
    "pyramiddrop": "PDrop",
    "tome": "ToMe",
    "evit": "EViT",
    "prumerge": "PruMerge",
    "llavaprumerge": "PruMerge",
    "fitprune": "FitPrune",
    "random": "Random Sampling",
    "randomsampling": "Random Sampling",
    "topk": "TopK",
    "topkcls": "TopK",
    "pooling": "Spatial Pooling",
    "spatialpool": "Spatial Pooling",
    "spatialpooling": "Spatial Pooling",
}
# The paper's rows measured at our setting: its vanilla (576 tokens) and its own FiCoCo-V, whose TFLOPs labels the
# authors equate with the tokens it delivers (issue #3). Its baseline rows were copied from other papers' settings,
# and its in-LLM methods' labels are not layer averages (spec methods.md §2.1): shown beside ours, not judged.
PAPER_ROWS_AT_OUR_SETTING = ("vanilla", "FiCoCo-V")

PAPER_VERSIONS = ("v4", "v1")
PACKAGE_CSV = Path(__file__).resolve().parents[1] / "paper_results.csv"


def name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def paper_benchmark(benchmark: str) -> str | None:
    return PAPER_BENCHMARKS.get(str(benchmark).lower().replace("-", "_"))


def paper_model(model: str) -> str | None:
    return PAPER_MODELS.get(str(model).lower())


def paper_method(method: str) -> str | None:
    return PAPER_METHODS.get(name_key(method))


def paper_budget_label(model: str, budget: str) -> str | None:
    return PAPER_BUDGET_LABELS.get(paper_model(model), {}).get(str(budget))


def budget_of_paper_label(model: str, tflops: float) -> int:
    """The token budget the authors state for one of the paper's TFLOPs labels of `model` (a label, not
    a cost: 64 tokens cost 1.61 T under the nominal convention, labelled 1.5). ValueError naming the
    valid labels when the model or the label has none."""
    budgets = {float(label.rstrip("T")): int(budget) for budget, label in PAPER_BUDGET_LABELS["LLaVA-1.5-7B"].items()
               if budget.isdigit()}
    if paper_model(model) != "LLaVA-1.5-7B":
        raise ValueError(f"{{paper: {tflops:g}}}: the paper states which token budget its TFLOPs labels stand for "
                         f"only for LLaVA-1.5-7B (model llava-1.5-7b), not for model {model}; valid: an integer "
                         "budget or {reduction: r} for this model")
    if float(tflops) not in budgets:
        raise ValueError(f"{{paper: {tflops:g}}} is not one of the paper's labels for LLaVA-1.5-7B; valid: "
                         + ", ".join(f"{{paper: {label:g}}} ({budget} tokens)" for label, budget in budgets.items()))
    return budgets[float(tflops)]


def load_paper_results(path: str | Path | None = None) -> pd.DataFrame:
    """The CSV of paper-results.md §9: paper_version, model, method, budget_label, benchmark, value."""
    path = Path(path) if path is not None else PACKAGE_CSV
    frame = pd.read_csv(path, dtype={"value": "float64"})
    expected = ["paper_version", "model", "method", "budget_label", "benchmark", "value"]
    if list(frame.columns) != expected:
        raise ValueError(f"paper results CSV {path}: columns {list(frame.columns)}, "
                         f"expected {expected}")
    return frame


def paper_reference(paper: pd.DataFrame, preferred_version: str = "v4") -> pd.DataFrame:
    """One value per (model, method, budget_label, benchmark): the preferred version, else the other.

    Result columns: model, method, budget_label, benchmark, value, paper_version.
    """
    if preferred_version not in PAPER_VERSIONS:
        raise ValueError(f"paper version {preferred_version!r}: valid choices are {', '.join(PAPER_VERSIONS)}")
    order = [preferred_version] + [v for v in PAPER_VERSIONS if v != preferred_version]
    rank = paper["paper_version"].map({version: i for i, version in enumerate(order)})
    cell = ["model", "method", "budget_label", "benchmark"]
    ranked = paper.assign(_rank=rank).dropna(subset=["_rank"]).sort_values("_rank", kind="stable")
    first = ranked.drop_duplicates(subset=cell, keep="first")
    return first[cell + ["value", "paper_version"]].reset_index(drop=True)


def paper_averages(reference: pd.DataFrame, model: str = "LLaVA-1.5-7B") -> dict[str, list[float]]:
    """paper method -> its printed Avg at each reduced budget of `model`, largest first (LLaVA-1.5-7B: 192,
    128, 64 tokens), for the methods the paper prints at all of them."""
    labels = [label for budget, label in PAPER_BUDGET_LABELS[model].items() if budget != "full"]
    rows = reference[(reference["model"] == model) & (reference["benchmark"] == "Avg")
                     & reference["budget_label"].isin(labels)]
    table = rows.pivot_table(index="method", columns="budget_label", values="value").reindex(columns=labels)
    return {method: [float(v) for v in values] for method, values in table.dropna().iterrows()}


def attach_paper_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """Add paper_model, paper_method, paper_budget_label, paper_benchmark (NA where nothing maps)."""
    return frame.assign(
        paper_model=frame["model"].map(paper_model),
        paper_method=frame["method"].map(paper_method),
        paper_budget_label=[paper_budget_label(model, budget) for model, budget in zip(frame["model"], frame["budget"])],
        paper_benchmark=frame["benchmark"].map(paper_benchmark),
    )


def with_paper_values(frame: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Left-join the paper's value for each row of `frame` (model, method, budget, benchmark columns).

    Adds paper_benchmark, paper_value and paper_version; rows with no matching cell get NaN / NA.
    """
    keyed = attach_paper_keys(frame)
    renamed = reference.rename(columns={
        "model": "paper_model", "method": "paper_method", "budget_label": "paper_budget_label",
        "benchmark": "paper_benchmark", "value": "paper_value",
    })
    keys = ["paper_model", "paper_method", "paper_budget_label", "paper_benchmark"]
    merged = keyed.merge(renamed, on=keys, how="left", validate="many_to_one")
    return merged.drop(columns=["paper_model", "paper_method", "paper_budget_label"])


def printed_tflops(reference: pd.DataFrame, model: str, method: str, budget: str) -> float:
    """The TFLOPs the paper printed for that row (7B rows only), or NaN."""
    keys = (paper_model(model), paper_method(method), paper_budget_label(model, budget))
    if None in keys:
        return float("nan")
    hit = reference[(reference["model"] == keys[0]) & (reference["method"] == keys[1])
                    & (reference["budget_label"] == keys[2]) & (reference["benchmark"] == "TFLOPs_printed")]
    return float(hit["value"].iloc[0]) if len(hit) else float("nan")
