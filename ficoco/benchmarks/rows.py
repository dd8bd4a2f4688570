"""Bad rows: checking benchmark rows so that no single row can stop a job.

A row that cannot be run or scored correctly is never dropped and never crashes a job: it is kept
and flagged with `meta["bad_row"]`, a `;`-separated list of reasons `code` or `code: detail`,
where the detail names the bad value. The same checks run at both ends:

- fetch (`Benchmark.normalise_row`): every image is fully decoded (a truncated or non-image file is
  caught there), every text field checked; flagged rows are listed in the manifest's `bad_rows`;
- evaluate (`Generator.records_for`): `check_row` repeats the checks on the stored row, so data
  from an older fetch, or one edited by hand, cannot crash the job either; a flagged row becomes a
  failure record with its reason.

`SafeRows` is the read-only view of a fetched dataset that evaluate jobs index
(`load_local(..., safe=True)`): reading a row never raises and never decodes the image (a
datasets `Image` column decodes while the row is read, before any check could run).

Reason codes (docs/benchmarks.md lists them with examples):
`unreadable_row`, `missing_id`, `missing_image`, `bad_image`, `undecodable_image`,
`missing_question`, `bad_question`, `empty_question`, `missing_answers`, `bad_answers`,
`null_answer`, `empty_answers`, `bad_choices`, `bad_meta`, `missing_meta`, `undecodable_text`,
plus benchmark-specific ones (`answer_not_yes_no`, `unknown_category`).
"""
from __future__ import annotations

import io
import json
import operator
import re
from typing import Any, Mapping

#: The columns of a normalised benchmark row (docs/contracts.md §5).
NORMALISED_COLUMNS = ("id", "image", "question", "answers", "choices", "meta")
#: At most this many characters of a bad value are shown in a reason.
SHOWN_CHARACTERS = 60
#: At most this many characters of an error message are kept in a reason.
ERROR_CHARACTERS = 160
_OBJECT_ADDRESS = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


# --------------------------------------------------------------------------------------------
# Reasons

def show(value: Any) -> str:
    """A short repr of a bad value for a reason (long values are cut, with their length)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    size = len(value) if hasattr(value, "__len__") else len(text)
    return f"{text[:SHOWN_CHARACTERS]}... ({size} long)"


def describe_error(error: BaseException) -> str:
    """`Type: message` without object addresses (reasons must be the same on every run)."""
    message = _OBJECT_ADDRESS.sub("", str(error)).strip()
    if len(message) > ERROR_CHARACTERS:
        message = message[:ERROR_CHARACTERS] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def reason(code: str, detail: str | None = None) -> str:
    """One reason: `code`, or `code: detail` (`;` in the detail becomes `,`: it separates reasons)."""
    if not detail:
        return code
    return f"{code}: {detail.replace(';', ',')}"


def reason_code(text: str) -> str:
    """The code of one reason (`empty_question` of `empty_question: '  '`)."""
    return text.split(":", 1)[0].strip()


def join_reasons(reasons) -> str:
    """The `bad_row` value: reasons in order, repeats dropped."""
    return ";".join(dict.fromkeys(r for r in reasons if r))


def split_reasons(bad_row: str) -> list[str]:
    return [part.strip() for part in str(bad_row).split(";") if part.strip()]


# --------------------------------------------------------------------------------------------
# Text

def clean_text(value: Any, field: str) -> tuple[Any, list[str]]:
    """`(value, problems)`: bytes decoded as UTF-8, and any text that is not valid UTF-8 (bytes that
    do not decode, lone surrogates) escaped with backslashes and named. Other values pass through."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), []
        except UnicodeDecodeError:
            return (bytes(value).decode("utf-8", "backslashreplace"),
                    [reason("undecodable_text", f"{field} {show(bytes(value))}")])
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return (value.encode("utf-8", "backslashreplace").decode("utf-8"),
                    [reason("undecodable_text", f"{field} {show(value)}")])
    return value, []


def _clean_json(value: Any, field: str, problems: list[str]) -> Any:
    """`value` (decoded JSON) with every string made valid UTF-8 (problems named once per field)."""
    if isinstance(value, dict):
        return {_clean_json(k, field, problems): _clean_json(v, field, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v, field, problems) for v in value]
    text, found = clean_text(value, field)
    if found and not any(p.startswith(f"undecodable_text: {field} ") for p in problems):
        problems.extend(found)
    return text


def text_field(value: Any, field: str, problems: list[str]) -> str:
    """A required text field (question): missing, wrong type, empty and undecodable are problems."""
    value, found = clean_text(value, field)
    problems.extend(found)
    if value is None:
        problems.append(f"missing_{field}")
        return ""
    if not isinstance(value, str):
        problems.append(reason(f"bad_{field}", f"{type(value).__name__} {show(value)}, not text"))
        return ""
    if not value.strip():
        problems.append(reason(f"empty_{field}", show(value)))
    return value


def text_list(value: Any, field: str, problems: list[str], *, required: bool) -> list[str]:
    """A list-of-text field (answers, choices). Numbers are kept as their text; nulls, other types and
    undecodable text are problems; with `required`, so are a null or empty list."""
    if value is None:
        if required:
            problems.append(f"missing_{field}")
        return []
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, (list, tuple)):
        problems.append(reason(f"bad_{field}", f"{type(value).__name__} {show(value)}, not a list"))
        return []
    out = []
    for item in value:
        item, found = clean_text(item, field)
        problems.extend(found)
        if item is None:
            code = "null_answer" if field == "answers" else f"bad_{field}"
            problems.append(reason(code, f"null in {field} {show(list(value))}"))
        elif isinstance(item, bool) or not isinstance(item, (str, int, float)):
            problems.append(reason(f"bad_{field}", f"{type(item).__name__} {show(item)} in {field}"))
        else:
            out.append(str(item))
    if required and not any(item.strip() for item in out) and len(out) == len(value):
        problems.append(f"empty_{field}")
    return out


def meta_object(value: Any, problems: list[str]) -> dict:
    """The `meta` field as a dict: a dict, or a JSON object as text; anything else is `bad_meta`."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return _clean_json(dict(value), "meta", problems)
    value, found = clean_text(value, "meta")
    problems.extend(found)
    if not isinstance(value, str):
        problems.append(reason("bad_meta", f"{type(value).__name__} {show(value)}, not a JSON object"))
        return {}
    try:
        decoded = json.loads(value)
    except ValueError as error:
        problems.append(reason("bad_meta", f"not JSON ({error}): {show(value)}"))
        return {}
    if not isinstance(decoded, dict):
        problems.append(reason("bad_meta", f"JSON {type(decoded).__name__} {show(value)}, not an object"))
        return {}
    return _clean_json(decoded, "meta", problems)


def stored_meta(meta: Mapping, problems: list[str]) -> str:
    """`meta` as stored: JSON text, keys sorted, with every problem joined under `bad_row`. Values
    JSON cannot hold are written as their repr and named (`bad_meta`)."""
    meta = dict(meta)
    try:
        json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as error:
        problems.append(reason("bad_meta", describe_error(error)))
        meta = {str(key): value for key, value in meta.items()}
    if problems:
        meta["bad_row"] = join_reasons(problems)
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=repr)


# --------------------------------------------------------------------------------------------
# Images

def image_cell(value: Any) -> tuple[Any, str | None]:
    """`(cell, problem)`: a raw image value as the stored `{"bytes", "path"}` struct (a PIL image is
    kept as is), None when it carries no image; a value of another type is `bad_image`."""
    if value is None:
        return None, None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if not data and not path:
            return None, None
        if data is not None and not isinstance(data, (bytes, bytearray)):
            return None, reason("bad_image", f"bytes are {type(data).__name__} {show(data)}")
        if path is not None and not isinstance(path, str):
            return None, reason("bad_image", f"path is {type(path).__name__} {show(path)}")
        return {"bytes": None if data is None else bytes(data), "path": path}, None
    if isinstance(value, (bytes, bytearray)):
        return ({"bytes": bytes(value), "path": None}, None) if value else (None, None)
    if isinstance(value, str):
        return ({"bytes": None, "path": value}, None) if value else (None, None)
    if hasattr(value, "load") and hasattr(value, "size"):        # a PIL image
        return value, None
    return None, reason("bad_image", f"{type(value).__name__} {show(value)}, not an image")


def decode_image(cell: Any) -> tuple[Any, str | None]:
    """`(PIL image | None, problem)`: open a stored image cell and decode every pixel (`load()`), the
    way datasets' `Image` feature does (EXIF orientation applied). A truncated file, bytes that are no
    image, a missing path: `undecodable_image`, naming the error and the bytes."""
    from PIL import Image, ImageOps

    cell, problem = image_cell(cell)
    if cell is None or problem:
        return None, problem
    try:
        if isinstance(cell, Mapping):
            data = cell["bytes"]
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(cell["path"])
        else:
            image = cell
        image.load()
        if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - any decoding error makes this one row bad
        if isinstance(cell, Mapping) and cell["bytes"] is not None:
            what = f"{len(cell['bytes'])} bytes starting {show(cell['bytes'][:12])}"
        elif isinstance(cell, Mapping):
            what = f"path {show(cell['path'])}"
        else:
            what = type(cell).__name__
        return None, reason("undecodable_image", f"{describe_error(error)} ({what})")
    return image, None


# --------------------------------------------------------------------------------------------
# Whole rows

def check_fields(row: Mapping, *, requires_answers: bool = True) -> tuple[dict, dict, list[str]]:
    """`(fields, meta, problems)`: a row's id, question, answers and choices as clean values, its
    meta as a dict (a `bad_row` it already carries is left in), and the problems found."""
    problems: list[str] = list(row.get("_problems") or [])
    meta = meta_object(row.get("meta"), problems)
    rid, found = clean_text(row.get("id"), "id")
    problems.extend(found)
    if rid is None or str(rid).strip() == "":
        problems.append(reason("missing_id", show(rid)))
    fields = {
        "id": str(rid),
        "question": text_field(row.get("question"), "question", problems),
        "answers": text_list(row.get("answers"), "answers", problems, required=requires_answers),
        "choices": text_list(row.get("choices"), "choices", problems, required=False),
    }
    return fields, meta, problems


def benchmark_reasons(benchmark, row: Mapping, meta: Mapping) -> list[str]:
    """The benchmark's own checks (`bad_row_reasons`; none for a module without it), never raising."""
    check = getattr(benchmark, "bad_row_reasons", None)
    if check is None:
        return []
    try:
        return list(check(row, meta))
    except Exception as error:  # noqa: BLE001 - a check that fails on this row makes it bad
        return [reason("unreadable_row", f"bad_row_reasons: {describe_error(error)}")]


def check_row(row: Mapping, benchmark=None) -> dict:
    """A row ready for prompting and scoring: id, question, answers, choices and meta checked and
    cleaned, the image decoded in full (a PIL image or None). Every problem found is named in
    `meta["bad_row"]` (meta is JSON text again); other keys (`_row`) are kept. Never raises.

    A row flagged at fetch keeps that verdict: its reasons stand, and its image is not decoded
    (it will not run)."""
    requires_answers = bool(getattr(benchmark, "requires_answers", True))
    requires_image = bool(getattr(benchmark, "requires_image", True))
    fields, meta, problems = check_fields(row, requires_answers=requires_answers)
    out = {key: value for key, value in row.items() if key != "_problems"}
    earlier = meta.pop("bad_row", None)
    if earlier:
        out.update(fields, image=None, meta=stored_meta(meta, split_reasons(earlier)))
        return out
    image, problem = decode_image(row.get("image"))
    if problem:
        problems.append(problem)
    elif image is None and requires_image:
        problems.append("missing_image")
    out.update(fields, image=image)
    if not problems:
        problems.extend(benchmark_reasons(benchmark, out, meta))
    out["meta"] = stored_meta(meta, problems)
    return out


# --------------------------------------------------------------------------------------------
# Reading a fetched dataset

def _binary_type(data_type):
    """`data_type` with every string replaced by binary (reading those never decodes text)."""
    import pyarrow as pa

    if pa.types.is_string(data_type):
        return pa.binary()
    if pa.types.is_large_string(data_type):
        return pa.large_binary()
    if pa.types.is_list(data_type):
        return pa.list_(_binary_type(data_type.value_type))
    if pa.types.is_large_list(data_type):
        return pa.large_list(_binary_type(data_type.value_type))
    if pa.types.is_struct(data_type):
        return pa.struct([pa.field(f.name, _binary_type(f.type)) for f in data_type])
    return data_type


def _bytes_to_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, list):
        return [_bytes_to_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _bytes_to_text(v) if k != "bytes" else v for k, v in value.items()}
    return value


def _cell(column, name: str, problems: list[str]) -> Any:
    """The one value of a one-row Arrow column; text that is not UTF-8 is escaped and named."""
    try:
        return column.to_pylist()[0]
    except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError: read the bytes instead
        pass
    try:
        raw = column.cast(_binary_type(column.type)).to_pylist()[0]
    except Exception as error:  # noqa: BLE001
        problems.append(reason("unreadable_row", f"column {name}: {describe_error(error)}"))
        return None
    problems.append(reason("undecodable_text", f"{name} {show(raw)}"))
    return _bytes_to_text(raw)


def arrow_row(table) -> dict:
    """The row of a one-row Arrow table as a dict, never raising: text that is not valid UTF-8 is
    escaped and named under `_problems` (pyarrow's `to_pylist` raises on it)."""
    problems: list[str] = []
    row = {name: _cell(table.column(name), name, problems) for name in table.column_names}
    if problems:
        row["_problems"] = problems
    return row


class SafeRows:
    """Read-only rows of a fetched benchmark dataset that never raise when read.

    `rows[index]` is a dict of every column, read as Arrow, with every normalised column present
    (None when the data lacks it): the image is the stored `{"bytes", "path"}` cell, or None when it
    carries no image (not decoded: `check_row` decodes it), text that is not valid UTF-8 is escaped
    and listed under `_problems`, and a missing id becomes `<no id: row N>` (unique, so the job's
    journal keys stay distinct). `len(rows)` and `rows.dataset` (the Dataset) as usual.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._arrow = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)       # one row at a time: no slices, no column names
        row = arrow_row(self._arrow[index])
        for column in NORMALISED_COLUMNS:
            row.setdefault(column, None)
        cell, problem = image_cell(row["image"])
        if problem is None:
            row["image"] = cell
        if row.get("id") is None or str(row.get("id")).strip() == "":
            row["_problems"] = [*row.get("_problems", []), reason("missing_id", show(row.get("id")))]
            row["id"] = f"<no id: row {index}>"
        return row

