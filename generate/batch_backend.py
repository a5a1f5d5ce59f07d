"""`batch` transport: OpenAI Batch API JSONL out, results JSONL in, matched by `custom_id`.

`vllm run_batch` reads and writes the same formats, so a GPU box can run a file offline and hand back the
results. A run with requests that have no result yet writes them (only those) to
`batch-<hash>.jsonl` and stops with `BatchPending`; after the results are listed in
`generate.llm.batch_results`, the re-run ingests them into the request cache and goes on. Repair turns
become a second, smaller batch the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from generate.llm import ChatReply, ChatRequest, OnReply
from generate.openai_backend import reply_from_completion
from kvqa.config import LLMConfig
from kvqa.tables import write_text


class BatchPending(RuntimeError):
    """Requests were written for an offline batch run; the stage resumes once results are provided."""

    def __init__(self, path: Path, n: int):
        super().__init__(f"wrote {n} requests to {path}: run them with the OpenAI Batch API or "
                         f"`vllm run_batch -i {path.name} -o results.jsonl --model MODEL`, add the results "
                         f"file to generate.llm.batch_results and run again")
        self.path = path
        self.n = n


def read_results(paths: Sequence[Path]) -> dict[str, ChatReply]:
    """custom_id -> reply, from Batch API / `vllm run_batch` output files."""
    out: dict[str, ChatReply] = {}
    for path in paths:
        for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                item["custom_id"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: not a Batch API result line ({err})") from err
            response = item.get("response") or {}
            if item.get("error") or response.get("status_code", 200) != 200:
                out[item["custom_id"]] = ChatReply(None, finish_reason=None,
                                                   error=f"batch error: {item.get('error') or response}")
            else:
                out[item["custom_id"]] = reply_from_completion(response.get("body") or {})
    return out


class BatchTransport:
    name = "batch"
    # Results come from wherever the file was run (the Batch API, `vllm run_batch`): one endpoint for all.
    endpoint = "batch"
    body_defaults: dict = {}

    def __init__(self, config: LLMConfig, default_dir: Path):
        self.config = config
        self.folder = Path(config.batch_dir or default_dir)
        self.results = read_results(config.batch_results)

    def complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        missing = [r for r in requests if r.key not in self.results]
        if missing:
            lines = [json.dumps({"custom_id": r.key, "method": "POST", "url": "/v1/chat/completions",
                                 "body": r.body},
                                sort_keys=True, ensure_ascii=False) for r in missing]
            text = "\n".join(lines) + "\n"
            path = self.folder / f"batch-{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
            write_text(text, path)
            raise BatchPending(path, len(missing))
        replies = [self.results[r.key] for r in requests]
        for req, reply in zip(requests, replies):
            on_reply(req, reply)
        return replies
