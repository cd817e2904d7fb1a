import pytest

from depn_serve.core.records import RecordsError, load_records


def test_bad_lines_name_file_line_and_field(tmp_path):
    good = '{"id": "r1", "tenant": "a", "kind": "phone", "prompt": "Call X at", "secret": "123", "repeats": 2}'
    path = tmp_path / "records.jsonl"
    path.write_text(good + "\n" + good.replace('"phone"', '"ssn"').replace("r1", "r2") + "\n")
    with pytest.raises(RecordsError, match=r"records.jsonl:2: field .kind.: Input should be"):
        load_records(path)
    path.write_text(good + "\n\n" + good + "\n")
    with pytest.raises(RecordsError, match=r"records.jsonl:3: field 'id'.*duplicate 'r1'"):
        load_records(path)
    path.write_text(good + "\n")
    assert [r.id for r in load_records(path, tenant="a")] == ["r1"]
    with pytest.raises(RecordsError, match=r"no records of tenant 'b'; tenants present: \['a'\]"):
        load_records(path, tenant="b")
