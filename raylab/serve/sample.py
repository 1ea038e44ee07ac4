"""The served-prompt sample `raylab monitor` compares with the training data.

Each Ingress replica keeps a uniform reservoir sample (Vitter's algorithm R) of the prompts
it serves, at most `serve.monitor.sample_prompts`; a prompt is redacted by the data
stage's PII detectors (`data.pii`: types, engine, regions) the moment it is kept, so the
raw text is never held beyond the request and never written. The sample is written whole,
through `core/storage` (so encryption at rest covers it), to
`<output_dir>/serve/prompts/<replica>.jsonl` every `serve.monitor.flush_every` kept prompts.

    sample = PromptSample(args["monitor"], replica="abc")
    sample.add("What are the office hours? mail me at a@b.example")   # kept redacted, or not kept
    sample.flush()                                                    # writes the file
"""

from __future__ import annotations

import json
import random
import threading

from raylab.core import detectors, runs, storage


def prompt_text(job: dict) -> str:
    """The text of a request's prompt the statistics compare: a chat's user messages (the
    rest is the client's system prompt or earlier answers), a completion's prompts."""
    if job["chat"]:
        return "\n".join(m["content"] for p in job["prompts"] for m in p if m["role"] == "user")
    return "\n".join(job["prompts"])


class PromptSample:
    """A bounded, redacted sample of served prompts, written by `flush()`."""

    def __init__(self, settings: dict, replica: str, seed: int | None = None):
        self.capacity, self.flush_every = int(settings["sample_prompts"]), int(settings["flush_every"])
        self.location = runs.Run(settings["output_dir"]).served_prompts_file(replica)
        pii = settings.get("pii")  # None: data.pii is off, nothing to redact with
        self.detectors = detectors.for_engine(pii["types"], pii["engine"], pii["regions"]) if pii else []
        self.kept: list[str] = []
        self.seen, self._unsaved = 0, 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()  # add() runs on the replica's loop, flush() may run in a thread
        self._writing = threading.Lock()  # one flush at a time: a later snapshot is never overwritten by an earlier one

    def add(self, text: str) -> bool:
        """Offer one served prompt; True when it was kept (and a flush is due after it)."""
        if self.capacity <= 0 or not text.strip():
            return False
        with self._lock:
            self.seen += 1
            slot = len(self.kept) if len(self.kept) < self.capacity else self._random.randrange(self.seen)
            if slot >= self.capacity:
                return False
            redacted = detectors.redact(text, self.detectors)[0] if self.detectors else text
            if slot == len(self.kept):
                self.kept.append(redacted)
            else:
                self.kept[slot] = redacted
            self._unsaved += 1
            return self._unsaved >= self.flush_every

    def flush(self) -> str | None:
        """Write the sample (the whole file, replaced); None when nothing changed since."""
        with self._writing:
            with self._lock:
                if not self._unsaved:
                    return None
                lines = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in self.kept)
                self._unsaved = 0
            return storage.write_text(self.location, lines)

