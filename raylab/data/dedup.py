"""Exact and near-duplicate detection across the whole dataset (not per block).

    drops = find_duplicates(accepted_ds, cfg.data.dedup)   # {record_id: reason}

Exact: records whose normalised content (lower-cased, whitespace collapsed) hashes alike.
Near: MinHash signatures over character shingles, banded for LSH (`bands` x `rows`, with
bands * rows = num_perm); records sharing a band bucket are candidates, kept as an edge only
when their estimated Jaccard similarity reaches `threshold`. Signatures are computed in
parallel Ray Data tasks. Above `dedup.shuffle_above` records the groups are found by Ray Data
hash shuffles (`groupby`), so no block or node sees only part of a duplicate group, and the
driver receives only the small edge lists; at or below it the driver groups the signatures
itself (`_local_*`: a few MB; two shuffles' task and actor start-up took 2 minutes for the
quickstart's 285 records on 2 busy cores). Both paths keep the same edges, joined with
union-find; in every group the record with the smallest record_id is kept, so the result
does not depend on block order or on the path (tests/unit/data/test_dedup.py compares them).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa

_PRIME = np.uint64((1 << 31) - 1)  # Mersenne prime M31
_SPACE = re.compile(r"\s+")


def content_of(text: str, messages: str) -> str:
    body = text if not messages else "\n".join(m["content"] for m in json.loads(messages))
    return _SPACE.sub(" ", body.lower()).strip()


def _shingle_hashes(content: str, ngram: int) -> np.ndarray:
    grams = {content[i:i + ngram] for i in range(max(1, len(content) - ngram + 1))}
    return np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
                     for g in grams], dtype=np.uint64)


def _permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_PRIME), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_PRIME), size=num_perm, dtype=np.uint64)
    return a, b


def minhash(content: str, num_perm: int, ngram: int) -> np.ndarray:
    """num_perm minimum hashes of (a*x + b) mod p, p = 2^31 - 1, over shingle hashes x < p;
    every product stays below 2^62, so uint64 arithmetic is exact."""
    x = _shingle_hashes(content, ngram) % _PRIME
    a, b = _permutations(num_perm)
    return ((a[:, None] * x[None, :] + b[:, None]) % _PRIME).min(axis=1)


SIG_SCHEMA = pa.schema([("record_id", pa.string()), ("exact", pa.string()), ("sig", pa.list_(pa.uint64()))])


def signature_batch(batch: pa.Table, num_perm: int, ngram: int, near: bool) -> pa.Table:
    rows = []
    for r in batch.select(["record_id", "text", "messages"]).to_pylist():
        content = content_of(r["text"], r["messages"])
        rows.append({
            "record_id": r["record_id"],
            "exact": hashlib.sha256(content.encode()).hexdigest(),
            "sig": minhash(content, num_perm, ngram).tolist() if near else [],
        })
    return pa.Table.from_pylist(rows, schema=SIG_SCHEMA)


def band_batch(batch: pa.Table, bands: int) -> pa.Table:
    ids, keys, sigs = [], [], []
    for r in batch.to_pylist():
        sig = r["sig"]
        for key in _band_keys(np.array(sig, dtype=np.uint64), bands):
            ids.append(r["record_id"])
            keys.append(key)
            sigs.append(sig)
    return pa.table({"record_id": ids, "band": keys, "sig": pa.array(sigs, type=pa.list_(pa.uint64()))})


EDGE_SCHEMA = pa.schema([("keep", pa.string()), ("drop", pa.string())])


def exact_edges(group: pa.Table) -> pa.Table:
    ids = sorted(group["record_id"].to_pylist())
    return pa.table({"keep": ids[:1] * (len(ids) - 1), "drop": ids[1:]}, schema=EDGE_SCHEMA)


def near_edges(group: pa.Table, threshold: float) -> pa.Table:
    if group.num_rows < 2:
        return EDGE_SCHEMA.empty_table()
    rows = sorted(group.to_pylist(), key=lambda r: r["record_id"])
    first = np.array(rows[0]["sig"], dtype=np.uint64)
    keep, drop = [], []
    for r in rows[1:]:
        if r["record_id"] != rows[0]["record_id"] and np.mean(first == np.array(r["sig"], dtype=np.uint64)) >= threshold:
            keep.append(rows[0]["record_id"])
            drop.append(r["record_id"])
    return pa.table({"keep": keep, "drop": drop}, schema=EDGE_SCHEMA)


def _band_keys(sig: np.ndarray, bands: int) -> list[str]:
    rows = len(sig) // bands
    return [f"{band}:" + hashlib.blake2b(sig[band * rows:(band + 1) * rows].tobytes(), digest_size=8).hexdigest()
            for band in range(bands)]


def _local_exact(sigs: pa.Table) -> list[tuple[str, str]]:
    """exact_edges over the groups of equal `exact`, in this process."""
    groups: dict[str, list[str]] = {}
    for record, digest in zip(sigs["record_id"].to_pylist(), sigs["exact"].to_pylist(), strict=True):
        groups.setdefault(digest, []).append(record)
    edges = []
    for ids in groups.values():
        ids.sort()
        edges += [(ids[0], other) for other in ids[1:]]
    return edges


def _local_near(sigs: pa.Table, bands: int, threshold: float) -> list[tuple[str, str]]:
    """near_edges over every LSH band bucket, in this process: in each bucket the smallest
    record_id is compared with every other member, as the shuffle path does."""
    ids = sigs["record_id"].to_pylist()
    matrix = [np.array(s, dtype=np.uint64) for s in sigs["sig"].to_pylist()]
    buckets: dict[str, list[int]] = {}
    for i, sig in enumerate(matrix):
        for key in _band_keys(sig, bands):
            buckets.setdefault(key, []).append(i)
    edges = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda i: ids[i])
        first = matrix[members[0]]
        edges += [(ids[members[0]], ids[i]) for i in members[1:]
                  if ids[i] != ids[members[0]] and np.mean(first == matrix[i]) >= threshold]
    return edges


def _components(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find: every record in an edge -> the smallest record_id of its component."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo
    return {x: find(x) for x in parent}


def find_duplicates(accepted, dedup, cpus: float) -> dict[str, str]:
    """{record_id to drop: 'duplicate_exact' | 'duplicate_near'} over a Ray Dataset."""
    if not (dedup.exact or dedup.near):
        return {}
    partitions = max(1, min(32, accepted.num_blocks()))
    sigs = accepted.map_batches(
        signature_batch, batch_format="pyarrow", num_cpus=cpus,
        fn_kwargs={"num_perm": dedup.num_perm, "ngram": dedup.ngram, "near": dedup.near},
    ).materialize()
    local = sigs.count() <= dedup.shuffle_above
    table = _collect(sigs) if local else None
    drops: dict[str, str] = {}
    if dedup.exact:
        edges = _local_exact(table) if local else _shuffled_exact(sigs, partitions)
        drops.update((drop, "duplicate_exact") for _, drop in edges)
    if dedup.near:
        edges = _local_near(table, dedup.bands, dedup.threshold) if local else _shuffled_near(sigs, dedup, cpus,
                                                                                                partitions)
        edges = [(keep, drop) for keep, drop in edges if keep not in drops and drop not in drops]
        for record, root in _components(edges).items():
            if record != root:
                drops.setdefault(record, "duplicate_near")
    return drops


def _collect(sigs) -> pa.Table:
    """The materialised signatures as one table in the driver (small: at most shuffle_above rows)."""
    import ray

    return pa.concat_tables([SIG_SCHEMA.empty_table(), *ray.get(sigs.to_arrow_refs())])


def _shuffled_exact(sigs, partitions: int) -> list[tuple[str, str]]:
    rows = sigs.groupby("exact", num_partitions=partitions).map_groups(exact_edges, batch_format="pyarrow").take_all()
    return [(r["keep"], r["drop"]) for r in rows]


def _shuffled_near(sigs, dedup, cpus: float, partitions: int) -> list[tuple[str, str]]:
    banded = sigs.map_batches(band_batch, batch_format="pyarrow", num_cpus=cpus, fn_kwargs={"bands": dedup.bands})
    rows = banded.groupby("band", num_partitions=partitions).map_groups(
        near_edges, batch_format="pyarrow", fn_kwargs={"threshold": dedup.threshold}).take_all()
    return [(r["keep"], r["drop"]) for r in rows]
