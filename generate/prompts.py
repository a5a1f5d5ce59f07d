"""Versioned prompt templates (`prompts/llm/*.yaml`), each with the JSON schema of its reply.

A template's `version` is bumped by hand when its meaning changes; its digest (of the file) and the digest
of each rendered conversation go into every generated row's provenance, so a row says exactly which
prompt produced it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts" / "llm"


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: int
    system: str
    user: str
    schema_: dict
    digest: str

    @property
    def version_tag(self) -> str:
        return f"{self.name}-v{self.version}+{self.digest[:8]}"

    def render(self, **fields: object) -> list[dict]:
        """The chat messages for these fields (str.format on the user template)."""
        return [{"role": "system", "content": self.system.strip()},
                {"role": "user", "content": self.user.format(**fields).strip()}]


def prompt_files(*names: str) -> tuple[str, ...]:
    """The project-relative files of the named templates (what a stage that reads them declares)."""
    return tuple(str((PROMPTS_DIR / f"{n}.yaml").relative_to(PROMPTS_DIR.parents[1])) for n in names)


def load_prompt(name: str, folder: Path = PROMPTS_DIR) -> PromptTemplate:
    raw = (folder / f"{name}.yaml").read_bytes()
    data = yaml.safe_load(raw)
    data["schema_"] = data.pop("schema")
    return PromptTemplate.model_validate({**data, "digest": hashlib.sha256(raw).hexdigest()})


def messages_digest(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
