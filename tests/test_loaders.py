"""CS224N loaders on the real shared files, the packaged sample, and bad input."""

import pytest

from mtbert.data.cs224n import DataError, read_cs224n
from mtbert.data.tasks import TASKS

# (task, file, labeled) -> (rows kept, rows skipped for an empty label); counts from shared/data/README.md
REAL = [("sst", "ids-sst-train.csv", True, 8544, 0), ("sst", "ids-sst-dev.csv", True, 1101, 0),
        ("sst", "ids-sst-test-student.csv", False, 2210, 0),
        ("cfimdb", "ids-cfimdb-train.csv", True, 1707, 0), ("cfimdb", "ids-cfimdb-dev.csv", True, 245, 0),
        ("cfimdb", "ids-cfimdb-test-student.csv", False, 488, 0),
        ("quora", "quora-train.csv", True, 15999, 1), ("quora", "quora-dev.csv", True, 4213, 1),
        ("sts", "sts-train.csv", True, 6040, 0), ("sts", "sts-dev.csv", True, 863, 0),
        ("sts", "sts-test-student.csv", False, 1725, 0)]


@pytest.mark.parametrize("task,name,labeled,rows,empty", REAL)
def test_real_files(data_dir, task, name, labeled, rows, empty):
    examples, report = read_cs224n(data_dir / name, TASKS[task], labeled)
    assert report.rows == len(examples) == rows
    assert report.skipped_empty_label == empty
    spec = TASKS[task]
    assert all(e.text_a for e in examples) and all((e.text_b is not None) == spec.pair for e in examples)
    if labeled:
        lo, hi = spec.label_range
        assert all(lo <= e.label <= hi for e in examples)
    else:
        assert all(e.label is None for e in examples)
    assert len({e.id for e in examples}) == len(examples)


def test_doubled_quotes_and_leading_space(data_dir):
    examples, _ = read_cs224n(data_dir / "quora-train.csv", TASKS["quora"])
    q = next(e for e in examples if e.id == "318658e273ac78f3b1e957b8b")
    assert q.text_a.startswith('"Which is correct grammar') and '"the"' in q.text_a
    sst, _ = read_cs224n(data_dir / "ids-sst-dev.csv", TASKS["sst"])
    assert sst[0].text_a == "It 's a lovely film with lovely performances by Buy and Accorsi ."


def _write(tmp_path, text, name="f.csv"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


HEADER = "\tid\tsentence1\tsentence2\tsimilarity\n"
# case -> (rows after the header, the message, the ids read with skip_bad_rows; each file
# also ends with a good row "ok", which must be read whatever came before it)
BAD = {
    "wrong field count": ("0\ta\tx\ty\t1.0\n1\tb\tonly two\n", ":3: 3 fields", ["a", "ok"]),
    "label out of range": ("0\ta\tx\ty\t7.5\n", ":2: label '7.5' outside", ["ok"]),
    "label not a number": ("0\ta\tx\ty\tfive\n", ":2: could not convert|:2: .*five", ["ok"]),
    "duplicate id": ("0\ta\tx\ty\t1.0\n1\ta\tz\tw\t2.0\n", ":3: duplicate id 'a' \\(first on line 2\\)", ["a", "ok"]),
    "non-utf8": (b"0\ta\tx\xff\ty\t1.0\n", ":2: not UTF-8", ["a", "ok"]),
    "unbalanced quote": ('0\ta\t"x\ty\t1.0\n1\tb\tz\tw\t2.0\n2\tc\tu\tv\t3.0\n', ":2: malformed row", ["b", "c", "ok"]),
    "field over the csv size limit": ("0\ta\t" + "x" * 200_000 + "\ty\t1.0\n1\tb\tz\tw\t2.0\n", ":2: malformed row",
                                      ["b", "ok"]),
    "empty sentence": ("0\ta\t \ty\t1.0\n1\tb\tz\t\t2.0\n", ":2: empty sentence \\(text_a\\)", ["ok"]),
}


def _bad_file(tmp_path, case):
    rows = BAD[case][0]
    rows = rows if isinstance(rows, bytes) else rows.encode()
    return _write(tmp_path, HEADER.encode() + rows + b"9\tok\tp\tq\t2.0\n")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_name_file_and_line(tmp_path, case):
    path = _bad_file(tmp_path, case)
    with pytest.raises(DataError, match=BAD[case][1]) as err:
        read_cs224n(path, TASKS["sts"])
    assert str(path) in str(err.value)


def test_missing_column_names_the_header(tmp_path):
    path = _write(tmp_path, "\tid\tsentence1\tsimilarity\n0\ta\tx\t1.0\n")
    with pytest.raises(DataError, match=":1: missing column 'sentence2'"):
        read_cs224n(path, TASKS["sts"])


@pytest.mark.parametrize("case", list(BAD))
def test_skip_bad_rows_reads_every_good_row_and_accounts_for_the_rest(tmp_path, case):
    """Before: a csv.Error (stray quote, huge field) ended the file as "one bad row"."""
    path = _bad_file(tmp_path, case)
    examples, report = read_cs224n(path, TASKS["sts"], skip_bad_rows=True)
    assert [e.id for e in examples] == BAD[case][2]
    data_lines = [line for line in path.read_bytes().split(b"\n")[1:] if line.strip()]
    assert len(examples) + sum(report.skipped_bad.values()) + report.skipped_empty_label == len(data_lines)
    assert "skipped" in report.summary() or report.replaced_bytes
    ok = examples[-1]
    assert (ok.text_a, ok.text_b, ok.label) == ("p", "q", 2.0)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_cs224n(tmp_path / "nope.csv", TASKS["sst"])
    with pytest.raises(DataError, match="file is empty"):
        read_cs224n(_write(tmp_path, ""), TASKS["sst"])


def test_packaged_sample_is_readable():
    from mtbert.data.batching import SAMPLE_DIR, sample_name
    found = 0
    for spec in TASKS.values():
        for split, name in spec.files.items():
            if (SAMPLE_DIR / sample_name(name)).exists():
                examples, _ = read_cs224n(SAMPLE_DIR / sample_name(name), spec, labeled=split != "test")
                assert examples
                found += 1
    assert found == 11
