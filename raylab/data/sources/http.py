"""HTTP sources: a paginated JSON API read in one task, a block per page.

    HttpDatasource(spec, "tickets", headers, shown_url)   # spec: the source's paging settings

A source that cannot be read fails with a SourceError naming the source, the position
reached (the page or cursor about to be read, as in record ids, and the records read before
it) and the cause. Every URL in a message is `redact_url`-ed and built from the configured
URL (`${env:NAME}` references kept), never from the expanded one.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raylab.core.secrets import redact_url, scrub
from raylab.data.sources.rows import RAW_SCHEMA, SourceError, raw_row, table


def dig(value: Any, dotted: str) -> Any:
    """value['a']['b'] for 'a.b'; '' is the value itself."""
    for part in filter(None, dotted.split(".")):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def with_params(url: str, params: dict[str, Any]) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params) if params else url


def retry_delay(attempt: int, backoff_s: float, retry_after: str | None, max_wait_s: float,
                now: float | None = None) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): exponential backoff, or the
    server's Retry-After (seconds or an HTTP date) when it asks for longer; never more than
    `max_wait_s`, so a server asking for an hour cannot stall the stage for an hour."""
    delay = backoff_s * 2 ** (attempt - 1)
    asked = None
    if retry_after:
        value = retry_after.strip()
        try:
            asked = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                asked = when.timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError):
                asked = None  # unparseable: the backoff decides
    if asked is not None and asked > delay:
        delay = asked
    return max(0.0, min(delay, max_wait_s))


_JSON_TYPES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}


def _cause(e: BaseException, timeout_s: float) -> str:
    reason = getattr(e, "reason", e)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no response within timeout_s={timeout_s:g}"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without a response"
    if isinstance(e, http.client.IncompleteRead):
        return f"the server closed the connection mid-response ({len(e.partial)} bytes read)"
    return str(reason) or type(reason).__name__


class HttpDatasource(Datasource):
    """A paginated JSON API read in one task, a block per page (pages are sequential).

    `spec["url"]` and `headers` arrive expanded (secrets resolved by the driver); `shown_url`
    is the URL as configured, for messages. Retries with exponential backoff (or the
    server's Retry-After, bounded by max_retry_wait_s) on connection errors, timeouts, 429
    and 5xx; other 4xx, a body that is not JSON and a non-list at records_path fail at once.
    """

    def __init__(self, spec: dict, source: str, headers: dict[str, str], shown_url: str | None = None,
                 secrets: list[str] | None = None):
        super().__init__()
        self.spec, self.source, self.headers = spec, source, headers
        self.shown_url = shown_url or spec["url"]
        self.secrets = secrets or []  # values no message may hold (a library's error may quote them)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return f"Http({self.source})"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(self._pages, meta, schema=RAW_SCHEMA)]

    def _fail(self, where: str, read: int, what: str) -> SourceError:
        return SourceError(scrub(f"data source {self.source!r} (http): at {where}, after {read} records: {what}", self.secrets))

    def _get(self, params: dict[str, Any], where: str, read: int) -> Any:
        s = self.spec
        url, shown = with_params(s["url"], params), redact_url(with_params(self.shown_url, params))
        cause, attempts = "", 0
        for attempt in range(s["retries"] + 1):
            attempts = attempt + 1
            try:
                request = urllib.request.Request(url, headers={"Accept": "application/json", **self.headers})
                with urllib.request.urlopen(request, timeout=s["timeout_s"]) as response:
                    data, kind = response.read(), response.headers.get("Content-Type", "no content type")
            except urllib.error.HTTPError as e:
                cause, retry_after = f"HTTP {e.code} {e.reason}", e.headers.get("Retry-After")
                e.close()
                if e.code != 429 and e.code < 500:
                    break  # the request itself is wrong; asking again changes nothing
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                cause, retry_after = _cause(e, s["timeout_s"]), None
            else:
                try:
                    return json.loads(data.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    cause = f"the response ({kind}, {len(data)} bytes) is not JSON: {e}"
                    break
            if attempt < s["retries"]:
                time.sleep(retry_delay(attempt + 1, s["backoff_s"], retry_after, s["max_retry_wait_s"]))
        raise self._fail(where, read, f"GET {shown} failed after {attempts} attempt(s): {cause}")

    def _pages(self) -> Iterator[pa.Table]:
        s = self.spec
        page, cursor, read = s["start_page"], None, 0
        for n in range(s["max_pages"]):
            params: dict[str, Any] = {}
            if s["page_param"]:
                params[s["page_param"]] = page
            if s["cursor_param"] and cursor:
                params[s["cursor_param"]] = cursor
            # where this response's records get their ids (rows.py): page<N>#i, cursor<n>#i
            label = f"page{page}" if s["page_param"] else f"cursor{n}" if s["cursor_param"] else "response"
            body = self._get(params, label, read)
            records = dig(body, s["records_path"])
            if not isinstance(records, list):
                found = "missing or null" if records is None else f"a JSON {_JSON_TYPES.get(type(records), 'value')}"
                raise self._fail(label, read, f"records_path {s['records_path']!r} is {found}, not a list, in the "
                                              f"response to GET {redact_url(with_params(self.shown_url, params))}")
            rows = [
                raw_row(self.source, f"{label}#{i}", text, text)
                for i, text in ((i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(records))
            ]
            read += len(rows)
            if rows:
                yield table(rows)
            if s["page_param"]:
                if not records:
                    return
                page += 1
            elif s["cursor_param"]:
                cursor = dig(body, s["next_cursor_path"])
                if not cursor:
                    return
            else:
                return
