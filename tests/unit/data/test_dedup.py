"""Exact and near-duplicate detection, function by function, without Ray: normalisation,
MinHash as a Jaccard estimator, LSH band keys, the per-group edges and the union-find join."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from raylab.data import dedup

BASE = ("acme pays its employees on the 25th of every month; when the 25th falls on a weekend "
        "the payment is made on the friday before, and the payslip is in the portal a day earlier.")
NEAR = BASE.replace("a day earlier", "two days earlier")  # one phrase changed
HALF = BASE[:90] + " holidays are booked through the hr portal with two weeks notice, approved by a manager."
UNRELATED = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex vexing jukeboxes."


def shingles(content: str, ngram: int) -> set[str]:
    """The character shingles MinHash is meant to summarise (a text shorter than ngram is one)."""
    return {content[i:i + ngram] for i in range(max(1, len(content) - ngram + 1))}


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def records(*rows: tuple[str, str] | tuple[str, str, str]) -> pa.Table:
    """(record_id, text[, messages]) -> the columns signature_batch reads (plus one it must ignore)."""
    full = [(r[0], r[1], r[2] if len(r) > 2 else "") for r in rows]
    return pa.table({"record_id": [r[0] for r in full], "text": [r[1] for r in full],
                     "messages": [r[2] for r in full], "source": ["s"] * len(full)})


def chat(*contents: str, roles=("user", "assistant")) -> str:
    return json.dumps([{"role": roles[i % len(roles)], "content": c} for i, c in enumerate(contents)])


def sig_table(sigs: dict[str, list[int]]) -> pa.Table:
    return pa.table({"record_id": list(sigs), "sig": pa.array(list(sigs.values()), type=pa.list_(pa.uint64()))})


def edges_of(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["keep"].to_pylist(), table["drop"].to_pylist(), strict=True))


# ---------------------------------------------------------------- content_of


def test_content_of_lowercases_and_collapses_whitespace():
    assert dedup.content_of("  Acme PAYS\ton the\n\n25th.  ", "") == "acme pays on the 25th."
    assert dedup.content_of("Acme pays on the 25th.", "") == dedup.content_of("ACME  pays on\tthe 25th.\n", "")
    # Negative control: normalisation is not so loose that different words meet.
    assert dedup.content_of("Acme pays on the 25th.", "") != dedup.content_of("Acme pays on the 26th.", "")


def test_content_of_joins_chat_messages_and_ignores_text_when_there_are_messages():
    messages = chat("When is payday?", "  On the\n25th. ")
    assert dedup.content_of("", messages) == "when is payday? on the 25th."
    assert dedup.content_of("some other text", messages) == dedup.content_of("", messages)
    assert dedup.content_of("", chat("When is payday?", "On the 26th.")) != dedup.content_of("", messages)


def test_content_of_keeps_message_order_but_not_roles():
    a = chat("When is payday?", "On the 25th.")
    swapped = chat("On the 25th.", "When is payday?")
    assert dedup.content_of("", a) != dedup.content_of("", swapped)
    # Roles are not part of the content: the same words under other roles are an exact duplicate.
    assert dedup.content_of("", a) == dedup.content_of("", chat("When is payday?", "On the 25th.", roles=("system", "user")))


# ---------------------------------------------------------------- minhash


def test_minhash_shape_dtype_range_and_determinism():
    sig = dedup.minhash(BASE, 64, 5)
    assert sig.shape == (64,) and sig.dtype == np.uint64
    assert int(sig.max()) < (1 << 31) - 1  # values mod p = 2^31 - 1
    np.testing.assert_array_equal(sig, dedup.minhash(BASE, 64, 5))  # seeded permutations


def test_minhash_identical_content_identical_signature():
    a = dedup.minhash(dedup.content_of("Acme pays on the 25th.", ""), 64, 5)
    b = dedup.minhash(dedup.content_of("  ACME pays\non the 25th. ", ""), 64, 5)
    np.testing.assert_array_equal(a, b)
    # Negative control: the signature depends on the content (and on the shingle length).
    assert agreement(a, dedup.minhash("acme pays on the 26th, not the 25th.", 64, 5)) < 1.0
    assert agreement(a, dedup.minhash(dedup.content_of("Acme pays on the 25th.", ""), 64, 3)) < 1.0


def test_minhash_takes_the_minimum_so_more_shingles_never_raise_a_slot():
    # Every shingle of BASE is a shingle of BASE + more text: each slot's minimum can only fall.
    longer = BASE + " questions go to the payroll desk in room 204."
    assert shingles(BASE, 5) < shingles(longer, 5)
    short, long_ = dedup.minhash(BASE, 128, 5), dedup.minhash(longer, 128, 5)
    assert np.all(long_ <= short)
    assert np.any(long_ < short)  # negative control: the extra shingles do win some slots


def test_minhash_of_a_text_shorter_than_the_shingle_is_its_single_shingle():
    assert shingles("hi", 5) == {"hi"}
    sig = dedup.minhash("hi", 32, 5)
    assert sig.shape == (32,)
    np.testing.assert_array_equal(sig, dedup.minhash("hi", 32, 5))
    assert agreement(sig, dedup.minhash("ho", 32, 5)) < 0.2  # one shingle each, and they differ


@pytest.mark.parametrize(("other", "expected_jaccard"), [
    (NEAR, (0.8, 0.95)),        # near-identical
    (HALF, (0.25, 0.45)),       # half shared
    (UNRELATED, (0.0, 0.02)),   # unrelated
], ids=["near-identical", "half-shared", "unrelated"])
def test_minhash_agreement_estimates_the_jaccard_similarity_of_shingle_sets(other, expected_jaccard):
    # The pairs span the range: check the exact Jaccard first so the estimate is tested at each level.
    exact = jaccard(BASE, other)
    assert expected_jaccard[0] <= exact <= expected_jaccard[1]
    # With 256 permutations the estimate's standard deviation is sqrt(J(1-J)/256) <= 0.031;
    # the tolerance 0.1 is over 3 of them. (The permutations are seeded: the result is fixed.)
    estimate = agreement(dedup.minhash(BASE, 256, 5), dedup.minhash(other, 256, 5))
    assert abs(estimate - exact) <= 0.1, (estimate, exact)


def test_minhash_agreement_orders_pairs_like_their_jaccard():
    sig = dedup.minhash(BASE, 256, 5)
    estimates = [agreement(sig, dedup.minhash(t, 256, 5)) for t in (NEAR, HALF, UNRELATED)]
    assert estimates == sorted(estimates, reverse=True) and estimates[0] > estimates[1] > estimates[2]


# ---------------------------------------------------------------- signature_batch / band_batch


def test_signature_batch_schema_exact_hash_and_signature():
    table = dedup.signature_batch(records(("r1", "Acme pays on the 25th."), ("r2", " ACME  pays on the 25th.\n"),
                                          ("r3", "Acme pays on the 26th.")), num_perm=32, ngram=5, near=True)
    assert table.schema == dedup.SIG_SCHEMA
    rows = table.to_pylist()
    assert [r["record_id"] for r in rows] == ["r1", "r2", "r3"]
    assert rows[0]["exact"] == hashlib.sha256(b"acme pays on the 25th.").hexdigest()
    assert rows[0]["exact"] == rows[1]["exact"] != rows[2]["exact"]
    assert rows[0]["sig"] == dedup.minhash("acme pays on the 25th.", 32, 5).tolist() == rows[1]["sig"]
    assert all(len(r["sig"]) == 32 for r in rows)


def test_signature_batch_hashes_chat_records_by_their_messages():
    rows = dedup.signature_batch(records(("c1", "", chat("When is payday?", "On the 25th.")),
                                         ("t1", "when is payday? on the 25th.")), 16, 5, near=True).to_pylist()
    assert rows[0]["exact"] == rows[1]["exact"]  # the same words as a completion record


def test_signature_batch_without_near_has_empty_signatures():
    rows = dedup.signature_batch(records(("r1", BASE)), num_perm=32, ngram=5, near=False).to_pylist()
    assert rows[0]["sig"] == [] and rows[0]["exact"] == hashlib.sha256(BASE.encode()).hexdigest()


def _bands(texts: dict[str, str], num_perm: int = 64, bands: int = 16) -> dict[str, set[str]]:
    sigs = dedup.signature_batch(records(*texts.items()), num_perm=num_perm, ngram=5, near=True)
    banded = dedup.band_batch(sigs, bands).to_pylist()
    out: dict[str, set[str]] = defaultdict(set)
    for r in banded:
        out[r["record_id"]].add(r["band"])
    return out


def test_band_batch_one_row_per_band_each_with_the_full_signature():
    sigs = dedup.signature_batch(records(("a", BASE), ("b", UNRELATED)), num_perm=64, ngram=5, near=True)
    banded = dedup.band_batch(sigs, 16)
    assert banded.num_rows == 2 * 16
    assert banded["sig"].type == pa.list_(pa.uint64())
    full = {r["record_id"]: r["sig"] for r in sigs.to_pylist()}
    for r in banded.to_pylist():
        assert r["sig"] == full[r["record_id"]]
    keys = _bands({"a": BASE})["a"]
    assert sorted(int(k.split(":")[0]) for k in keys) == list(range(16))  # band index prefixes the key


def test_band_keys_identical_content_shares_every_band():
    keys = _bands({"a": BASE, "b": BASE.upper()})
    assert keys["a"] == keys["b"] and len(keys["a"]) == 16


def test_band_keys_near_duplicates_share_a_band_unrelated_texts_share_none():
    keys = _bands({"base": BASE, "near": NEAR, "unrelated": UNRELATED})
    assert keys["base"] & keys["near"]
    assert not keys["base"] & keys["unrelated"]
    assert not keys["near"] & keys["unrelated"]


def test_band_keys_depend_on_the_band_index():
    # Two bands with equal minhash chunks must still land in different buckets.
    banded = dedup.band_batch(sig_table({"a": [7, 7, 7, 7]}), bands=2).to_pylist()
    assert banded[0]["band"] != banded[1]["band"]
    assert banded[0]["band"].split(":", 1)[1] == banded[1]["band"].split(":", 1)[1]


# ---------------------------------------------------------------- exact_edges / near_edges


def test_exact_edges_keep_the_smallest_record_id_whatever_the_order():
    for order in itertools.permutations(["r2", "r1", "r3"]):
        group = pa.table({"record_id": list(order), "exact": ["h"] * 3})
        table = dedup.exact_edges(group)
        assert table.schema == dedup.EDGE_SCHEMA
        assert edges_of(table) == [("r1", "r2"), ("r1", "r3")]


def test_exact_edges_single_record_has_no_edges():
    assert dedup.exact_edges(pa.table({"record_id": ["r1"], "exact": ["h"]})).num_rows == 0


def test_exact_edges_smallest_is_string_order():
    # record ids are strings: "r10" sorts before "r9".
    assert edges_of(dedup.exact_edges(pa.table({"record_id": ["r9", "r10"]}))) == [("r10", "r9")]


def _sig_agreeing(first: list[int], equal: int) -> list[int]:
    """A signature that agrees with `first` in exactly `equal` slots."""
    return [v if i < equal else v + 1000 for i, v in enumerate(first)]


@pytest.mark.parametrize(("equal", "threshold", "is_edge"), [
    (8, 0.8, True),    # 0.8 reaches 0.8 (inclusive)
    (7, 0.8, False),   # 0.7 is just below
    (9, 0.8, True),    # just above
    (7, 0.7, True),
    (6, 0.7, False),
    (10, 1.0, True),
    (9, 1.0, False),
])
def test_near_edges_threshold_is_respected(equal, threshold, is_edge):
    first = list(range(10))
    group = sig_table({"a": first, "b": _sig_agreeing(first, equal)})
    assert edges_of(dedup.near_edges(group, threshold)) == ([("a", "b")] if is_edge else [])


def test_near_edges_link_to_the_smallest_record_id_whatever_the_order():
    first = list(range(10))
    sigs = {"c": _sig_agreeing(first, 9), "a": first, "b": _sig_agreeing(first, 10), "d": _sig_agreeing(first, 2)}
    for order in itertools.permutations(sigs):
        table = dedup.near_edges(sig_table({k: sigs[k] for k in order}), 0.8)
        assert table.schema == dedup.EDGE_SCHEMA
        assert sorted(edges_of(table)) == [("a", "b"), ("a", "c")]  # d agrees in 0.2 only


def test_near_edges_compare_with_the_groups_smallest_record_only():
    # b and c are identical, but neither reaches the threshold against a (the group's first):
    # near_edges links only to the first record, so b-c is not an edge from this group.
    first = list(range(10))
    other = _sig_agreeing(first, 5)
    assert edges_of(dedup.near_edges(sig_table({"a": first, "b": other, "c": other}), 0.8)) == []


def test_near_edges_single_record_or_repeated_record_makes_no_edge():
    assert dedup.near_edges(sig_table({"a": [1, 2, 3]}), 0.5).num_rows == 0
    repeated = pa.table({"record_id": ["a", "a"], "sig": pa.array([[1, 2], [1, 2]], type=pa.list_(pa.uint64()))})
    assert dedup.near_edges(repeated, 0.5).num_rows == 0


# ---------------------------------------------------------------- _components


def test_components_chain_is_one_component_rooted_at_the_smallest_id():
    assert dedup._components([("a", "b"), ("b", "c")]) == {"a": "a", "b": "a", "c": "a"}


def test_components_do_not_depend_on_edge_order_or_direction():
    edges = [("b", "c"), ("d", "c"), ("a", "d"), ("x", "y"), ("z", "y")]
    expected = {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x", "z": "x"}
    for order in itertools.permutations(edges):
        assert dedup._components(list(order)) == expected
    assert dedup._components([(b, a) for a, b in edges]) == expected


def test_components_keep_separate_groups_apart():
    roots = dedup._components([("a", "b"), ("c", "d")])
    assert roots == {"a": "a", "b": "a", "c": "c", "d": "c"}
    assert dedup._components([]) == {}


def test_components_long_chain_in_reverse_order():
    ids = [f"r{i:03d}" for i in range(200)]
    edges = list(zip(ids[1:], ids[:-1], strict=True))[::-1]
    assert set(dedup._components(edges).values()) == {"r000"}


# ---------------------------------------------------------------- the pieces together (as find_duplicates joins them)


def _near_drops(texts: dict[str, str], threshold: float = 0.8, num_perm: int = 64, bands: int = 16) -> set[str]:
    """find_duplicates' near pass with a dict in place of Ray's groupby."""
    sigs = dedup.signature_batch(records(*texts.items()), num_perm=num_perm, ngram=5, near=True)
    buckets: dict[str, list[dict]] = defaultdict(list)
    for r in dedup.band_batch(sigs, bands).to_pylist():
        buckets[r["band"]].append(r)
    edges = []
    for rows in buckets.values():
        edges += edges_of(dedup.near_edges(pa.Table.from_pylist(rows), threshold))
    return {record for record, root in dedup._components(edges).items() if record != root}


def test_near_pass_drops_the_near_duplicate_and_keeps_the_smallest_id():
    assert jaccard(BASE, NEAR) >= 0.8
    assert _near_drops({"r2": NEAR, "r1": BASE, "r3": UNRELATED, "r4": HALF}) == {"r2"}
    assert _near_drops({"r1": NEAR, "r2": BASE, "r3": UNRELATED}) == {"r2"}
    # Negative control: with nothing alike, nothing is dropped.
    assert _near_drops({"r1": BASE, "r2": UNRELATED, "r3": HALF}) == set()


# ---------------------------------------------------------------- the driver-side path

def _shuffle_path_edges(sigs: pa.Table, bands: int, threshold: float) -> tuple[list, list]:
    """What the Ray shuffles compute, grouped here: exact_edges per `exact` group, near_edges per band bucket."""
    by_exact: dict[str, list[dict]] = defaultdict(list)
    for r in sigs.to_pylist():
        by_exact[r["exact"]].append(r)
    exact = [e for rows in by_exact.values() for e in edges_of(dedup.exact_edges(pa.Table.from_pylist(rows)))]
    buckets: dict[str, list[dict]] = defaultdict(list)
    for r in dedup.band_batch(sigs.select(["record_id", "sig"]), bands).to_pylist():
        buckets[r["band"]].append(r)
    near = [e for rows in buckets.values() for e in edges_of(dedup.near_edges(pa.Table.from_pylist(rows), threshold))]
    return exact, near


def test_the_driver_side_grouping_keeps_the_shuffles_edges():
    texts = {"r5": BASE, "r1": NEAR, "r3": UNRELATED, "r4": HALF, "r2": BASE, "r6": NEAR.upper(), "r7": UNRELATED + " x"}
    sigs = dedup.signature_batch(records(*texts.items()), num_perm=64, ngram=5, near=True)
    exact, near = _shuffle_path_edges(sigs, 16, 0.8)
    assert sorted(dedup._local_exact(sigs)) == sorted(exact) and exact  # r2 = r5, r1 = r6 (case-folded)
    assert sorted(dedup._local_near(sigs, 16, 0.8)) == sorted(near) and near
    # Negative control: a lower threshold changes the near edges, so equality above is not vacuous.
    assert sorted(dedup._local_near(sigs, 16, 0.05)) != sorted(near)
