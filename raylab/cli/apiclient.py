"""The service's HTTP API from the CLI (`raylab jobs`, and `raylab models promote|rollback` and
`raylab deploy` when $RAYLAB_API_URL is set), with the caller's key ($RAYLAB_API_KEY), so the
service's roles and organisations hold. The standard library's HTTP: the `openai` client is
not a dependency of the CLI.

    api = Api.from_env()
    api.call("POST", "/v1/registry/models/acme-assistant/rollback", json.dumps({}).encode())

A refusal from the service is a UserError (exit 2) with its message; so are a missing
RAYLAB_API_URL or RAYLAB_API_KEY and a service that does not answer.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid

from raylab.errors import UserError

URL_ENV, KEY_ENV = "RAYLAB_API_URL", "RAYLAB_API_KEY"


def through_api() -> bool:
    """Whether registry moves and deploys go through the service ($RAYLAB_API_URL is set)."""
    return bool(os.environ.get(URL_ENV))


class Api:
    """The service at RAYLAB_API_URL, called with RAYLAB_API_KEY."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url.rstrip("/"), key

    @classmethod
    def from_env(cls) -> Api:
        url, key = os.environ.get(URL_ENV), os.environ.get(KEY_ENV)
        if not url:
            raise UserError(f"{URL_ENV} is not set: the fine-tuning service's base URL (raylab api ... --standalone, "
                            "or an endpoint with api.enabled), e.g. http://127.0.0.1:8100")
        if not key:
            raise UserError(f"{KEY_ENV} is not set: a key from `raylab keys create --org ORG --role ml_engineer`")
        return cls(url, key)

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
             timeout: float = 60) -> dict:
        headers = {"Authorization": f"Bearer {self.key}"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise UserError(f"{method} {path}: {e.code} {_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"{URL_ENV}={self.url}: the service does not answer ({getattr(e, 'reason', e)})") from None

    def post(self, path: str, body: dict, timeout: float = 60) -> dict:
        """`timeout`: longer for calls the service answers once the endpoint changed (deploy,
        load: up to 300 s of Serve's own wait)."""
        return self.call("POST", path, json.dumps(body).encode(), timeout=timeout)

    def upload(self, path: str) -> dict:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from None
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{os.path.basename(path)}\"\r\nContent-Type: application/jsonl\r\n\r\n").encode() \
            + data + f"\r\n--{boundary}--\r\n".encode()
        return self.call("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return e.reason
