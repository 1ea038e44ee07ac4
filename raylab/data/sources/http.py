"""HTTP sources: a paginated JSON API read in one task, a block per page.

    HttpDatasource(spec, "tickets", headers)    # spec: the source's paging settings
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raylab.data.sources.rows import RAW_SCHEMA, SourceError, raw_row, table


def dig(value: Any, dotted: str) -> Any:
    """value['a']['b'] for 'a.b'; '' is the value itself."""
    for part in filter(None, dotted.split(".")):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class HttpDatasource(Datasource):
    """A paginated JSON API read in one task, a block per page (pages are sequential).

    `headers` arrive expanded (secrets resolved by the driver); retries with exponential
    backoff on connection errors, 429 and 5xx; other 4xx fail at once.
    """

    def __init__(self, spec: dict, source: str, headers: dict[str, str]):
        super().__init__()
        self.spec, self.source, self.headers = spec, source, headers

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return f"Http({self.source})"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(self._pages, meta, schema=RAW_SCHEMA)]

    def _get(self, params: dict[str, Any]) -> Any:
        s = self.spec
        url = s["url"]
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        last = ""
        for attempt in range(s["retries"] + 1):
            if attempt:
                time.sleep(s["backoff_s"] * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, headers={"Accept": "application/json", **self.headers})
                with urllib.request.urlopen(request, timeout=s["timeout_s"]) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"response is not JSON ({e})"
                break
        raise SourceError(f"data source {self.source!r}: GET {url} failed after {attempt + 1} attempt(s): {last}")

    def _pages(self) -> Iterator[pa.Table]:
        s = self.spec
        page, cursor = s["start_page"], None
        for n in range(s["max_pages"]):
            params: dict[str, Any] = {}
            if s["page_param"]:
                params[s["page_param"]] = page
            if s["cursor_param"] and cursor:
                params[s["cursor_param"]] = cursor
            body = self._get(params)
            records = dig(body, s["records_path"])
            if not isinstance(records, list):
                raise SourceError(f"data source {self.source!r}: records_path {s['records_path']!r} is not a list in the response to {s['url']}")
            label = f"page{page}" if s["page_param"] else f"cursor{n}" if s["cursor_param"] else "response"
            rows = [
                raw_row(self.source, f"{label}#{i}", text, text)
                for i, text in ((i, json.dumps(r, ensure_ascii=False)) for i, r in enumerate(records))
            ]
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
