"""Record selectors and mask policies."""

import pytest

from depn_serve.core.selectors import MaskPolicy, SelectorError, select_records
from tests.helpers import TINY_RECORDS


def ids(selectors):
    return [r.id for r in select_records(TINY_RECORDS, selectors)]


def test_selectors_pick_by_tenant_kind_and_id():
    assert ids(["tenant=acme"]) == ["p1", "n1"]
    assert ids(["tenant!=acme"]) == ["e1", "i1"]
    assert ids(["tenant=acme,kind=phone"]) == ["p1"]
    assert ids(["kind=phone|email"]) == ["p1", "e1"]
    assert ids(["id!=p1|i1"]) == ["n1", "e1"]
    assert ids(["id=i1", "tenant=acme"]) == ["p1", "n1", "i1"]  # several selectors: any of them, file order
    assert ids(["all"]) == ["p1", "n1", "e1", "i1"]
    assert ids(["tenant=nobody"]) == []


@pytest.mark.parametrize("bad, says", [
    ("tenant", "expected 'field=value'"),
    ("owner=acme", "field 'owner': expected one of ['tenant', 'kind', 'id']"),
    ("tenant=acme,", "found ''"),
    ("kind=phone|", "empty value"),
    ("tenant==acme", "expected 'field=value'"),
])
def test_bad_selectors_say_what_is_wrong(bad, says):
    with pytest.raises(SelectorError) as err:
        select_records(TINY_RECORDS, [bad])
    assert repr(bad) in str(err.value) and says in str(err.value)
    with pytest.raises(ValueError):
        MaskPolicy(tenant="acme", forget=(bad,))


def test_policies_split_records_into_forget_and_keep():
    forget, keep = MaskPolicy.isolation("acme").split(TINY_RECORDS)
    assert [r.id for r in forget] == ["e1", "i1"] and [r.id for r in keep] == ["p1", "n1"]
    forget, keep = MaskPolicy.own_records("acme").split(TINY_RECORDS)
    assert [r.id for r in forget] == ["p1", "n1"] and [r.id for r in keep] == ["e1", "i1"]
    forget, keep = MaskPolicy(tenant="acme", forget=("kind=phone",), keep=("tenant=globex",)).split(TINY_RECORDS)
    assert [r.id for r in forget] == ["p1"] and [r.id for r in keep] == ["e1", "i1"]  # n1: neither
    with pytest.raises(SelectorError, match="selects no record"):
        MaskPolicy(tenant="acme", forget=("tenant=nobody",)).split(TINY_RECORDS, "r.jsonl")
    with pytest.raises(SelectorError, match=r"r.jsonl: records \['p1'\] are selected both to forget and to keep"):
        MaskPolicy(tenant="acme", forget=("kind=phone",), keep=("tenant=acme",)).split(TINY_RECORDS, "r.jsonl")
    with pytest.raises(ValueError):
        MaskPolicy(tenant="acme", forget=())
