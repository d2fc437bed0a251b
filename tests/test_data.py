"""Datasets: every format, custom fields, and bad rows reported by file and line."""

import json

import pytest

from cepo.data import load_examples

ROWS = [{"q": "1+1", "a": 2}, {"q": "2*3", "a": "6"}, {"q": "9-4", "a": "5"}]


def test_jsonl_custom_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ex = load_examples(str(p), prompt_field="q", answer_field="a")
    assert [(e.prompt, e.answer) for e in ex] == [("1+1", "2"), ("2*3", "6"), ("9-4", "5")]
    assert ex[1].source.endswith("d.jsonl:2")


def test_nested_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "x", "extra": {"answer": "7"}}) + "\n")
    assert load_examples(str(p), answer_field="extra.answer")[0].answer == "7"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": r["q"], "a": str(r["a"])} for r in ROWS]), p)
    assert len(load_examples(str(p), prompt_field="q", answer_field="a")) == 3


def test_saved_dataset_dir(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"prompt": r["q"], "answer": str(r["a"])} for r in ROWS]) \
        .save_to_disk(str(tmp_path / "ds"))
    ex = load_examples(str(tmp_path / "ds"))
    assert [e.prompt for e in ex] == ["1+1", "2*3", "9-4"]


def _bad_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "1+1", "answer": "2"}\n'
                 '{"prompt": "2+2"}\n'
                 'not json\n'
                 '{"prompt": "", "answer": "1"}\n'
                 '{"prompt": "3+3", "answer": "6"}\n')
    return p


def test_bad_rows_skipped_with_report(tmp_path, caplog):
    ex = load_examples(str(_bad_file(tmp_path)))
    assert [e.prompt for e in ex] == ["1+1", "3+3"]
    assert "bad.jsonl:2: missing or empty field 'answer'" in caplog.text
    assert "bad.jsonl:3: malformed JSON" in caplog.text
    assert "bad.jsonl:4: missing or empty field 'prompt'" in caplog.text


def test_bad_rows_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing or empty field 'answer'"):
        load_examples(str(_bad_file(tmp_path)), on_bad_row="error")


def test_missing_file_unknown_extension_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown extension"):
        load_examples(str(tmp_path / "d.csv"))
    (tmp_path / "e.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="no usable rows"):
        load_examples(str(tmp_path / "e.jsonl"))


def test_own_training_file_with_the_builtin_held_out_set(tmp_path):
    """eval_data builtin:arithmetic: the built-in held-out split (--eval_split: dev by
    default, or test), whatever the training data
    (the sweep's 'harder task' trains on a file and must keep the same evaluation set)."""
    from cepo.arithmetic import make_split
    from cepo.config import parse_config
    from cepo.build import load_datasets

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+2*3", "answer": "9"}\n')
    cfg = parse_config(["--train_data", str(path), "--eval_data", "builtin:arithmetic",
                        "--num_eval", "50"])
    train, evals = load_datasets(cfg)
    assert [e.answer for e in train] == ["9"]
    assert [e.prompt for e in evals] == [r["prompt"] for r in make_split("dev", 50, seed=0)]
    cfg = parse_config(["--train_data", str(path), "--eval_data", "builtin:arithmetic",
                        "--num_eval", "50", "--eval_split", "test"])
    test = [r["prompt"] for r in make_split("test", 50, seed=0)]
    assert [e.prompt for e in load_datasets(cfg)[1]] == test
    _, none = load_datasets(parse_config(["--train_data", str(path)]))
    assert none == []
