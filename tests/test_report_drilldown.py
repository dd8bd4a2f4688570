"""The report's disagreement drill-down: which samples, in which order, and the HTML that shows them."""
from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from ficoco.report.aggregate import SAMPLE_COLUMNS
from ficoco.report.drilldown import disagreement_frame, disagreement_section

MODEL, BENCH, MISSING_BENCH = "llava-toy", "bench-a", "bench-b"
#: (method, budget) of the jobs; vanilla is the unreduced run.
JOBS = [("vanilla", "full"), ("fastv", "64"), ("fastv", "128"), ("sparsevlm", "64"), ("ficoco-v", "64")]
FAILED = math.nan
#: id -> per-job scores in JOBS order (NaN: the job failed on it).
SCORES = {
    "s0": [1, 1, 1, 1, 1],                    # all agree: never shown
    "s1": [1, 0, 0, 0, 0],                    # std 0.4, vanilla right, 1 right
    "s1b": [1, 0, 0, 0, 0],                   # the same as s1: after it, by id
    "s2": [0, 1, 1, 1, 1],                    # std 0.4, vanilla wrong
    "s3": [1, 1, 0, 0, 0],                    # std 0.49, vanilla right, 2 right
    "s4": [0, 1, 1, 0, 0],                    # std 0.49, vanilla wrong
    "s5": [1, 1, 1, 0, 0],                    # std 0.49, vanilla right, 3 right
    "s6": [1, FAILED, FAILED, FAILED, FAILED],  # one scored job: not comparable
    "s7": [1, 0, FAILED, FAILED, FAILED],     # std 0.5 over the 2 scored jobs
    "s8": [1, 0.9, 0.9, 0.9, 0.9],            # fractional scores, small spread
    "s9": [0, 0, 0, 0, 0],                    # all agree
}
#: Hand-ranked: disagreement first, then vanilla right, fewer right, id.
EXPECTED_ORDER = ["s7", "s3", "s5", "s4", "s1", "s1b", "s2", "s8"]
#: The rows of the fetched benchmark: row index -> id (s4's samples point at a stale row on purpose).
DATASET_IDS = ["s0", "s1", "s1b", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]
HOSTILE_QUESTION = "<script>alert('q')</script> What colour is the <b>car</b>?"
HOSTILE_PREDICTION = '<img src=x onerror="alert(1)">'
HOSTILE_PATH = 'results/"><a href="http://evil.example">x</a>/predictions.jsonl'


def journal(method: str, budget: str, benchmark: str = BENCH, model: str = MODEL) -> str:
    return f"results/runs/{model}/{method}/{benchmark}/b{budget}/shard0/predictions.jsonl"


def prediction(sample_id: str, score: float) -> str:
    if sample_id == "s3" and score == 0:
        return HOSTILE_PREDICTION
    return "red" if score >= 0.5 else "blue"


def error(method: str) -> str:
    return "bad row: missing_image; empty_question: ''" if method == "sparsevlm" else "RuntimeError: CUDA OOM"


def sample_rows(model: str = MODEL, benchmark: str = BENCH, scores: dict = SCORES, jobs=JOBS) -> list[dict]:
    rows = []
    for sample_id, per_job in scores.items():
        for (method, budget), score in zip(jobs, per_job):
            failed = math.isnan(score)
            row = 0 if sample_id == "s4" else DATASET_IDS.index(sample_id) if sample_id in DATASET_IDS else None
            hostile = (sample_id, method) == ("s3", "ficoco-v")
            path = HOSTILE_PATH if hostile else journal(method, budget, benchmark, model)
            rows.append({"model": model, "method": method, "phase": "llm", "budget": budget, "benchmark": benchmark,
                         "id": sample_id, "row": row, "score": score,
                         "prediction": None if failed else prediction(sample_id, score),
                         "answers": "red | crimson", "error": error(method) if failed else None, "predictions": path})
    return rows


def samples_frame(rows: list[dict], shuffle_seed: int | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS)).astype(SAMPLE_COLUMNS)
    if shuffle_seed is None:
        return frame
    return frame.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)


def image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


#: id -> (stored image size, format); ids not listed have no image.
IMAGES = {"s3": ((200, 100), "PNG"), "s5": ((50, 80), "JPEG"), "s1": ((64, 64), "PNG")}


def write_benchmark(directory) -> None:
    """A fetched benchmark as fetch writes it: data/ (save_to_disk, normalised features) + manifest.json."""
    from datasets import Dataset

    from ficoco.benchmarks.base import normalised_features

    images = [{"bytes": image_bytes(*IMAGES[i]), "path": None} if i in IMAGES else None for i in DATASET_IDS]
    columns = {
        "id": DATASET_IDS,
        "image": images,
        "question": [HOSTILE_QUESTION if i == "s3" else f"Question of {i}?" for i in DATASET_IDS],
        "answers": [["red", "crimson"] for _ in DATASET_IDS],
        "choices": [["red", "blue"] if i == "s5" else [] for i in DATASET_IDS],
        "meta": ["{}" for _ in DATASET_IDS],
    }
    Dataset.from_dict(columns, features=normalised_features()).save_to_disk(str(directory / "data"))
    (directory / "manifest.json").write_text(json.dumps({"benchmark": directory.name, "rows": len(DATASET_IDS)}))


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("benchmarks") / BENCH
    directory.mkdir()
    write_benchmark(directory)
    return directory


class Page(HTMLParser):
    """Every tag with its attributes, and the text, of an HTML fragment."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def blocks(section: str) -> dict[str, str]:
    """sample id -> its drill block's HTML (the id is the block head's <b>)."""
    parts = section.split('<div class="drill">')[1:]
    return {re.search(r'<p class="drill-head"><b>(.*?)</b>', part).group(1): part for part in parts}


def plain(fragment: str) -> str:
    return "".join(Page(fragment).text)


# ---------------------------------------------------------------------------------------------- the frame


def test_frame_picks_and_orders_the_hand_ranked_samples_whatever_the_input_order():
    for seed in (None, 1, 2):
        frame = disagreement_frame(samples_frame(sample_rows(), shuffle_seed=seed))
        assert list(frame["id"]) == EXPECTED_ORDER
    assert list(frame.columns) == ["model", "benchmark", "id", "row", "answers", "disagreement", "vanilla_score",
                                   "correct_jobs", "scored_jobs"]


def test_frame_statistics_match_an_independent_computation():
    frame = disagreement_frame(samples_frame(sample_rows())).set_index("id")
    for sample_id in EXPECTED_ORDER:
        scored = [s for s in SCORES[sample_id] if not math.isnan(s)]
        mean = sum(scored) / len(scored)
        std = math.sqrt(sum((s - mean) ** 2 for s in scored) / len(scored))
        assert frame.loc[sample_id, "disagreement"] == pytest.approx(std, abs=1e-9)
        assert frame.loc[sample_id, "scored_jobs"] == len(scored)
        assert frame.loc[sample_id, "correct_jobs"] == sum(s >= 0.5 for s in scored)
        assert frame.loc[sample_id, "vanilla_score"] == SCORES[sample_id][0]
    assert frame.loc["s7", "disagreement"] == pytest.approx(0.5)
    assert frame.loc["s7", "answers"] == "red | crimson"
    assert frame.loc["s4", "row"] == 0 and frame.loc["s5", "row"] == DATASET_IDS.index("s5")


def test_frame_limits_each_model_and_benchmark_and_needs_two_scored_jobs():
    rows = sample_rows() + sample_rows(benchmark="textvqa") + sample_rows(model="other-model")
    frame = disagreement_frame(samples_frame(rows), per_benchmark=3)
    assert frame.groupby(["model", "benchmark"]).size().to_dict() == {
        ("llava-toy", "bench-a"): 3, ("llava-toy", "textvqa"): 3, ("other-model", "bench-a"): 3}
    assert list(frame["model"]) == ["llava-toy"] * 6 + ["other-model"] * 3
    # textvqa is a paper benchmark: it comes before the unknown bench-a
    assert list(frame["benchmark"][:6]) == ["textvqa"] * 3 + ["bench-a"] * 3
    assert list(frame["id"][:3]) == EXPECTED_ORDER[:3]
    assert "s6" not in set(disagreement_frame(samples_frame(rows))["id"])


def test_frame_without_vanilla_has_nan_vanilla_score_and_a_repeated_record_votes_once():
    jobs = [("fastv", "64"), ("ficoco-v", "64")]
    rows = sample_rows(scores={"a": [1, 0], "b": [1, 1]}, jobs=jobs)
    repeated = dict(rows[0], predictions="results/zz-rerun/predictions.jsonl", score=0.0)
    frame = disagreement_frame(samples_frame(rows + [repeated]))
    assert list(frame["id"]) == ["a"]
    assert math.isnan(frame["vanilla_score"].iloc[0])
    assert frame["scored_jobs"].iloc[0] == 2 and frame["correct_jobs"].iloc[0] == 1


def test_frame_of_empty_or_unanimous_samples_is_empty():
    assert disagreement_frame(samples_frame([])).empty
    assert disagreement_frame(pd.DataFrame()).empty
    assert disagreement_frame(samples_frame(sample_rows(scores={"s0": SCORES["s0"], "s9": SCORES["s9"]}))).empty


# ---------------------------------------------------------------------------------------------- the html


@pytest.fixture(scope="module")
def section(bench_dir):
    rows = sample_rows() + sample_rows(benchmark=MISSING_BENCH)
    return disagreement_section(samples_frame(rows, shuffle_seed=3), {BENCH: bench_dir}, per_benchmark=24)


def bench_blocks(section: str, benchmark: str) -> dict[str, str]:
    start = section.index(f'<h3 id="disagree-llava-toy-{benchmark}">')
    end = section.find("<h3", start + 1)
    return blocks(section[start:end if end >= 0 else None])


def test_section_shows_the_frame_samples_in_order_under_unique_headings(section):
    assert section.startswith("<p>") and "standard deviation" in section and "<section" not in section
    headings = [attrs["id"] for tag, attrs in Page(section).tags if tag == "h3"]
    assert headings == ["disagree-llava-toy-bench-a", "disagree-llava-toy-bench-b"]
    assert list(bench_blocks(section, "bench-a")) == EXPECTED_ORDER
    assert list(bench_blocks(section, "bench-b")) == EXPECTED_ORDER


def test_predictions_are_grouped_by_text_with_marks_and_failures(section):
    block = bench_blocks(section, "bench-a")
    items = lambda sample_id: [plain(li) for li in re.findall(r"<li class=\"pred-[a-z]+\">.*?</li>", block[sample_id])]
    assert items("s1") == ["“red” ✓ — vanilla",
                           "“blue” ✗ — fastv b128, fastv b64, sparsevlm b64, ficoco-v b64"]
    assert items("s7") == ["“red” ✓ — vanilla", "“blue” ✗ — fastv b64",
                           "failed: RuntimeError — fastv b128, ficoco-v b64",
                           "failed: bad row: missing_image, bad row: empty_question — sparsevlm b64"]
    # one text, one group, whatever the scores; fractional ones are shown
    assert items("s8") == ["“red” ✓ (scores 0.90–1.00) — vanilla, fastv b128, fastv b64, sparsevlm b64, "
                           "ficoco-v b64"]
    assert re.findall(r'<li class="(pred-[a-z]+)">', block["s7"]) == ["pred-right", "pred-wrong", "pred-failed",
                                                                      "pred-failed"]


def test_thumbnails_are_data_uris_of_the_right_size_and_absent_without_image(section):
    block = bench_blocks(section, "bench-a")
    for sample_id, ((width, height), fmt) in IMAGES.items():
        sources = re.findall(r'<img class="thumb"[^>]* src="data:image/(png|jpeg);base64,([^"]+)"', block[sample_id])
        assert len(sources) == 1, sample_id
        kind, data = sources[0]
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format.lower() == kind == fmt.lower()
        assert max(image.size) == 96
        assert image.size[0] / image.size[1] == pytest.approx(width / height, rel=0.05)
    s3_data = re.search(r'base64,([^"]+)', block["s3"]).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(s3_data))).size == (96, 48)
    for sample_id in set(EXPECTED_ORDER) - set(IMAGES):
        assert "<img" not in block[sample_id]


def test_question_choices_and_stale_rows_come_from_the_benchmark(section):
    block = bench_blocks(section, "bench-a")
    assert "Question of s5?" in plain(block["s5"])
    assert [plain(li) for li in re.findall(r"<li>.*?</li>", block["s5"].split('<ol class="choices"')[1]
                                           .split("</ol>")[0])] == ["red", "blue"]
    assert "Question of s4?" in plain(block["s4"])        # its row points at s0: found by id
    assert "Reference: red | crimson" in plain(block["s1"])


def test_missing_benchmark_gets_a_note_and_its_samples_without_question_or_image(section):
    note = re.search(r'<h3 id="disagree-llava-toy-bench-b">.*?</h3>\s*<p class="note">(.*?)</p>', section, re.S)
    assert note and "bench-b" in note.group(1)
    block = bench_blocks(section, "bench-b")
    assert all("<img" not in part and 'class="question"' not in part for part in block.values())
    assert "“blue” ✗" in plain(block["s1"])


def test_unreadable_benchmark_dir_gets_a_note(tmp_path, bench_dir):
    broken = tmp_path / BENCH
    (broken / "data").mkdir(parents=True)
    (broken / "manifest.json").write_text('{"rows": 3}')
    text = disagreement_section(samples_frame(sample_rows()), {BENCH: broken})
    assert re.search(r'<p class="note">No question text or images for bench-a: .*could not be read', text)
    assert list(blocks(text)) == EXPECTED_ORDER and "<img" not in text


def test_everything_is_escaped_and_nothing_links_out(section):
    page = Page(section)
    assert not {tag for tag, _ in page.tags} & {"script", "a", "link", "iframe", "style", "object", "embed"}
    assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt;" in section
    text = "".join(page.text)
    assert HOSTILE_QUESTION in text and HOSTILE_PREDICTION in text and HOSTILE_PATH in text
    for tag, attrs in page.tags:
        assert "href" not in attrs or attrs["href"].startswith("#"), (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/")
    # the hostile <b> and <img> are text: only the block heads' <b> and the real thumbnails are tags
    assert sum(tag == "b" for tag, _ in page.tags) == 2 * len(EXPECTED_ORDER)
    assert sum(tag == "img" for tag, _ in page.tags) == len(IMAGES)


def test_journals_list_every_contributing_job_as_text(section):
    block = bench_blocks(section, "bench-a")["s7"]
    details = re.search(r'<details class="journals">(.*?)</details>', block, re.S).group(1)
    codes = [plain(code) for code in re.findall(r"<code>.*?</code>", details)]
    assert codes == [journal(method, budget) for method, budget in
                     [("vanilla", "full"), ("fastv", "128"), ("fastv", "64"), ("sparsevlm", "64"), ("ficoco-v", "64")]]


def test_heading_ids_stay_unique_when_names_collide(bench_dir):
    rows = sample_rows(model="M.1") + sample_rows(model="m_1") + sample_rows(model="<m 1>")
    text = disagreement_section(samples_frame(rows), {BENCH: bench_dir}, per_benchmark=2)
    ids = [attrs["id"] for tag, attrs in Page(text).tags if tag == "h3"]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(re.fullmatch(r"disagree-[a-z0-9-]+", heading) for heading in ids)
    assert "&lt;m 1&gt;" in text


def test_empty_or_unanimous_samples_give_a_note(bench_dir):
    for frame in (samples_frame([]), pd.DataFrame(),
                  samples_frame(sample_rows(scores={"s0": SCORES["s0"], "s6": SCORES["s6"]}))):
        text = disagreement_section(frame, {BENCH: bench_dir})
        assert re.fullmatch(r'<p class="note">[^<]+</p>', text), text


def test_one_text_scored_both_ways_is_one_mixed_group():
    jobs = [("vanilla", "full"), ("fastv", "64"), ("ficoco-v", "adaptive")]
    rows = sample_rows(scores={"x": [1, 0, 0.25]}, jobs=jobs)
    for row in rows:
        row["prediction"] = "a long answer the judge scored differently"
    text = disagreement_section(samples_frame(rows), {})
    items = [plain(li) for li in re.findall(r'<li class="pred-mixed">.*?</li>', text)]
    assert items == ["“a long answer the judge scored differently” ± (scores 0.00–1.00) — vanilla, fastv b64, "
                     "ficoco-v adaptive"]
    assert "no fetched directory was given for benchmark bench-a" in text
