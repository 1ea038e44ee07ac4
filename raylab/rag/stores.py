"""Which vector store an index lives in: LanceDB (store.py, the embedded default) or
PostgreSQL + pgvector (pgstore.py, `index.store: pgvector`). Both modules offer the same
functions over their own table handle; callers pick the module here.

    st = backend(cfg.index.store); db = connect(cfg.index.store, directory, cfg.index.database)
    st = of(table)                     # the module that handles an opened table
"""

from __future__ import annotations

from raylab.core import secrets
from raylab.errors import UserError
from raylab.rag import embedder, pgstore, store

MODULES = {"lancedb": ("lancedb", "lance"), "pgvector": ("psycopg2", "pgvector")}


def backend(kind: str):
    return pgstore if kind == pgstore.KIND else store


def of(table):
    return pgstore if isinstance(table, pgstore.Table) else store


def connect(kind: str, directory: str, database: str | None):
    """The store's database handle: the LanceDB directory, or a connection to the PostgreSQL
    URL (`database` as the config writes it; ${env:NAME} expanded here, where it is used)."""
    for module in MODULES[kind]:
        embedder.require(module)
    if kind != pgstore.KIND:
        return store.connect(directory)
    import psycopg2

    url = secrets.expand_env(database, "index.database")
    try:
        return pgstore.connect(url)
    except psycopg2.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"index.database: cannot use the PostgreSQL database ({first}); check the URL, that the server "
                        "runs and that it has the pgvector extension (CREATE EXTENSION vector)") from None


def drop_full_text(table) -> None:
    """Drop a keyword index left from a build with index.hybrid (now off)."""
    if isinstance(table, pgstore.Table):
        pgstore.drop_full_text(table)
        return
    for i in table.list_indices():
        if i.index_type == "FTS":
            table.drop_index(i.name)


def all_rows(table, where=None) -> list[dict]:
    """Every row (ROW_COLUMNS) that `where` (the store's access_filter) admits; all without one."""
    if isinstance(table, pgstore.Table):
        return pgstore.all_rows(table, where)
    query = table.search()
    if where is not None:
        query = query.where(where)
    return query.select(store.ROW_COLUMNS).limit(None).to_list()


def has_full_text(table) -> bool:
    return of(table).has_full_text(table)


def vector_dimensions(table) -> int:
    return of(table).vector_dimensions(table)
