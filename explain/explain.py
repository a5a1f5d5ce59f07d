"""QA rows + the image's facts -> a grounded textual explanation and the source boxes per row.

Medico 2026 subtask 2 asks, per answer, for a textual explanation in clinical language that refers to visual
cues, and a visual explanation (boxes, masks). Kvasir-VQA-x1 ships neither; every fact and box needed is in
our facts table, so each row gets:

- `explanation`: two to four sentences -- the row's own facts (what the answer rests on), the supporting
  facts of the same image that bear on the question (where the finding lies, its colour, size and
  morphology, the instruments or landmarks; `support` in `prompts/explanations.yaml`), and a sentence on
  the marked regions. It states facts of that image only: the grounding check
  (`generate.grounding.GroundingChecker.check_statement`, as for answers): every fact it cites stated, no fact
  of the image contradicted, no value of a class the image has no fact of unless a source box has it
  (`unsupported_value`). A row whose
  explanation fails is quarantined (`stage` explain) with the reason and the text, never released.
- `visual_explanation`: the boxes of the cited facts, as they are in the source labels (HyperKvasir polyp
  boxes, Kvasir-Instrument boxes, Kvasir-SEG mask components), in the subtask-2 shape `{type:
  "bounding_box", data: [[x1, y1, x2, y2]], description}`; empty when the cited facts have none (no region
  is ever made up). `segmentation_mask`: the Kvasir-SEG mask file of the image, for rows whose cited facts
  come from a masks source.

Backends: `TemplateExplainer` (phrasings from `prompts/explanations.yaml`, seeded per row) and
`LLMExplainer` (`prompts/llm/explain.yaml` with its JSON schema, through `generate.llm.LLMClient`: the same
request cache, repair turns, refusal/failure rejections and usage counts as compose/naturalize).

Explanations table (`stages/explanations.parquet`), one row per explained QA row:

| column | type | meaning |
|---|---|---|
| qa_id | str | the QA row explained |
| source, img_id | str | its image |
| explanation | str | 2-4 sentences, grounded in `cited_classes`' facts |
| cited_classes | list[str] | classes of the facts the explanation states: the row's, then the supporting ones |
| visual_explanation | list[struct] | `{type: "bounding_box", data: [[x1, y1, x2, y2]], description}` per source box |
| segmentation_mask | str | path of the image's Kvasir-SEG mask file ("" when none) |
| explainer | str | backend (`template`, `openai:MODEL`, ...) |
| explainer_version | str | phrasings version + hash (template) or prompt version tag (LLM) |
| explanation_prompt_hash | str | hash of the rendered prompt (LLM; empty for templates) |
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from generate.backends import PlanFact, Rejected
from generate.grounding import GroundingChecker, Violation
from generate.realize import answered_batches, image_facts, plan_inputs
from generate.template import answer_key, compose_answer, number_word, render_answer_clause, upper_first
from kvqa.catalog import Catalog
from kvqa.errors import ConfigError
from kvqa.tables import HashDraws, plain_boxes, quarantine_frame

STAGE = "explain"
EXPLANATION_COLUMNS = ["qa_id", "source", "img_id", "explanation", "cited_classes", "visual_explanation",
                       "segmentation_mask", "explainer", "explainer_version", "explanation_prompt_hash"]
SENTENCE_END = re.compile(r"[.!?](?:\s+|$)")
MIN_SENTENCES, MAX_SENTENCES = 2, 4


class VisualPhrasings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    with_boxes: list[str] = Field(min_length=1)
    without_boxes: list[str] = Field(min_length=1)
    box_description: str
    mask_description: str


class ExplanationPhrasings(BaseModel):
    """`prompts/explanations.yaml`, validated: classes it names must be catalog classes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int
    max_support_facts: int = Field(ge=0)
    support: dict[str, list[str]]
    clauses: dict[str, dict[str, list[str]]]
    visual: VisualPhrasings
    digest: str = ""

    @model_validator(mode="after")
    def _non_empty(self) -> "ExplanationPhrasings":
        empty = [f"{c}.{k}" for c, keys in self.clauses.items() for k, v in keys.items() if not v]
        if empty:
            raise ValueError(f"empty phrasing lists {empty}")
        return self

    @property
    def version_tag(self) -> str:
        return f"explain-template-v{self.version}+{self.digest[:12]}"


def load_phrasings(path: Path, catalog: Catalog) -> ExplanationPhrasings:
    """Load and validate the explanation phrasings; ConfigError (one line, file named) when they do not."""
    try:
        raw = Path(path).read_bytes()
        data = yaml.safe_load(raw)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"explanation phrasings {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"explanation phrasings {path}: a mapping (version, support, clauses, visual) is expected")
    try:
        phrasings = ExplanationPhrasings.model_validate({**data, "digest": hashlib.sha256(raw).hexdigest()})
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"explanation phrasings {path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    named = set(phrasings.clauses) | set(phrasings.support) | {c for cs in phrasings.support.values() for c in cs}
    unknown = sorted(named - set(catalog.classes))
    if unknown:
        raise ConfigError(f"explanation phrasings {path}: classes not in the catalog: {unknown}")
    return phrasings


@dataclass(frozen=True)
class ExplainItem:
    """One QA row to explain, with the facts the explanation may cite and the boxes behind them."""

    qa_id: str
    source: str
    img_id: str
    question: str
    answer: str
    facts: tuple[PlanFact, ...]    # the row's facts, in question order
    support: tuple[PlanFact, ...]  # supporting facts of the same image
    boxes: tuple[dict, ...]        # source boxes of the cited facts (label, xmin, ymin, xmax, ymax)
    mask: str                      # Kvasir-SEG mask file of the image, "" when none
    image: tuple[PlanFact, ...] = ()  # every fact of the image: what the text may not contradict

    @property
    def cited(self) -> tuple[PlanFact, ...]:
        return self.facts + self.support


@dataclass(frozen=True)
class Explained:
    qa_id: str
    text: str
    prompt_hash: str = ""


class ExplainerBackend(Protocol):
    name: str
    version: str

    def explain(self, items: Sequence[ExplainItem]) -> list[Explained | Rejected]:
        """One result per item, in order."""
        ...


def box_labels_phrase(boxes: Sequence[dict]) -> str:
    """'polyp', 'polyps', 'polyp and instrument': the labels of the boxes, plural where several."""
    counts: dict[str, int] = {}
    for b in boxes:
        counts[b["label"]] = counts.get(b["label"], 0) + 1
    return " and ".join(f"{label}s" if n > 1 else label for label, n in counts.items())


def visual_sentence(phrasings: ExplanationPhrasings, boxes: Sequence[dict], pick: int) -> str:
    if not boxes:
        return phrasings.visual.without_boxes[pick % len(phrasings.visual.without_boxes)]
    template = phrasings.visual.with_boxes[pick % len(phrasings.visual.with_boxes)]
    return template.format(labels=box_labels_phrase(boxes), n_word=number_word(len(boxes)),
                           s="s" if len(boxes) > 1 else "", verb_s="" if len(boxes) > 1 else "s")


def visual_explanation(boxes: Sequence[dict], phrasings: ExplanationPhrasings) -> list[dict]:
    """The source boxes in Medico subtask 2's shape: one `bounding_box` entry per box, never anything else."""
    n = len(boxes)
    return [{"type": "bounding_box", "data": [[int(b["xmin"]), int(b["ymin"]), int(b["xmax"]), int(b["ymax"])]],
             "description": phrasings.visual.box_description.format(label=b["label"], index=i, n=n)}
            for i, b in enumerate(boxes, 1)]


class TemplateExplainer:
    """Explanations from the phrasings file; deterministic (draws hashed from the seed and the qa_id)."""

    name = "template"

    def __init__(self, catalog: Catalog, phrasings: ExplanationPhrasings, seed: int):
        self.catalog, self.phrasings, self.seed = catalog, phrasings, seed
        self.version = phrasings.version_tag

    def clause(self, fact: PlanFact, draws: HashDraws) -> str:
        qc = self.catalog.classes[fact.question_class]
        key = answer_key(qc, fact.values)
        own = self.phrasings.clauses.get(qc.name, {})
        templates = own.get(key) or (own.get("values") if key == "all" else None) or qc.answers[key]
        return render_answer_clause(qc, fact.values, templates[draws.below(len(templates))])

    def explain_one(self, item: ExplainItem) -> Explained:
        draws = HashDraws(self.seed, "explain", item.qa_id)
        sentences = [compose_answer([self.clause(f, draws) for f in item.facts])]
        if item.support:
            sentences.append(compose_answer([self.clause(f, draws) for f in item.support]))
        sentences.append(upper_first(visual_sentence(self.phrasings, item.boxes, draws.below(1 << 16))))
        return Explained(item.qa_id, " ".join(sentences))

    def explain(self, items: Sequence[ExplainItem]) -> list[Explained | Rejected]:
        return [self.explain_one(i) for i in items]


class ExplainReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    explanation: str = Field(min_length=20, max_length=1200)


def _facts_json(facts: Sequence[PlanFact]) -> str:
    return json.dumps([{"question": f.source_question, "answer": f.source_answer, "class": f.question_class}
                       for f in facts], indent=1, ensure_ascii=False)


class LLMExplainer:
    """Explanations from an LLM through `generate.llm.LLMClient` (cache, repairs, rejections, usage)."""

    def __init__(self, client, phrasings: ExplanationPhrasings):
        from generate.prompts import load_prompt

        self.client, self.phrasings = client, phrasings
        self.prompt = load_prompt("explain")
        self.name = f"{client.transport.name}:{client.config.model}"
        self.version = self.prompt.version_tag

    def explain(self, items: Sequence[ExplainItem]) -> list[Explained | Rejected]:
        from generate.prompts import messages_digest

        convs = [self.prompt.render(facts=_facts_json(i.cited), question=i.question, answer=i.answer,
                                    regions=json.dumps([{k: b[k] for k in ("label", "xmin", "ymin", "xmax", "ymax")}
                                                        for b in i.boxes]),
                                    regions_sentence=visual_sentence(self.phrasings, i.boxes, 0))
                 for i in items]
        replies = self.client.ask_structured("explain", [i.qa_id for i in items], convs, self.prompt, ExplainReply)
        out: list[Explained | Rejected] = []
        for item, conv, res in zip(items, convs, replies):
            if isinstance(res, Rejected):
                out.append(Rejected(item.qa_id, res.reason, res.detail, res.raw))
            else:
                out.append(Explained(item.qa_id, " ".join(res.explanation.split()), messages_digest(conv)[:16]))
        return out

    @property
    def usage(self) -> dict:
        return self.client.usage_report()


def sentence_count(text: str) -> int:
    return len([s for s in SENTENCE_END.split(text.strip()) if s.strip()])


def check_explanation(checker: GroundingChecker, text: str, item: ExplainItem) -> Violation | None:
    """Grounded like an answer: 2-4 sentences, every cited fact stated and not contradicted, and no value
    that no cited fact (or source box label) has."""
    n = sentence_count(text)
    if not MIN_SENTENCES <= n <= MAX_SENTENCES:
        return Violation("explanation_length", f"{n} sentences, expected {MIN_SENTENCES}-{MAX_SENTENCES}")
    violation = checker.check_statement(text, item.cited, item.image, frozenset(b["label"] for b in item.boxes))
    if violation is None:
        return None
    if violation.reason == "unsupported_value":
        return violation
    return Violation("explanation_contradicts_labels", violation.detail)


def mask_index(mask_dirs: dict[str, Path]) -> dict[tuple[str, str], str]:
    """(source, img_id) -> its mask file, for the sources read from a Kvasir-SEG masks folder."""
    from sources.boxes import mask_files

    return {(source, p.stem): str(p) for source, folder in mask_dirs.items() for p in mask_files(folder)}


def explain_items(qa: pd.DataFrame, plans: pd.DataFrame, facts: pd.DataFrame, phrasings: ExplanationPhrasings,
                  masks: dict[tuple[str, str], str]) -> list[ExplainItem]:
    """Resolve each QA row's facts (from its plan; a paraphrase row from its plan's), the supporting facts of
    its image and the source boxes behind all of them."""
    order = {name: i for i, name in enumerate(phrasings.support)}
    by_plan = {p.plan_id: p for p in plan_inputs(plans, facts)}
    boxes = {fid: plain_boxes(b) for fid, b in zip(facts["fact_id"], facts["boxes"]) if len(b)}
    every_fact = image_facts(facts)
    asked: dict[tuple[str, str], list[PlanFact]] = {}  # the image's facts that have a level-1 plan
    for plan in by_plan.values():
        if plan.complexity == 1:
            asked.setdefault((plan.source, plan.img_id), []).append(plan.facts[0])
    items = []
    for r in qa.itertuples(index=False):
        plan = by_plan[r.paraphrase_of or r.qa_id]
        by_class = {f.question_class: f for f in plan.facts}
        row_facts = tuple(by_class[c] for c in r.question_class)
        wanted = {c for f in row_facts for c in phrasings.support.get(f.question_class, [])} - set(by_class)
        support = sorted((f for f in asked.get((r.source, r.img_id), [])
                          if f.question_class in wanted and list(f.values) != ["none"]),
                         key=lambda f: (order.get(f.question_class, len(order)), f.question_class))
        support = tuple(support[:phrasings.max_support_facts])
        cited_boxes: list[dict] = []
        for f in row_facts + support:
            cited_boxes += [b for b in boxes.get(f.fact_id, []) if b not in cited_boxes]
        mask = masks.get((r.source, r.img_id), "") if cited_boxes else ""
        items.append(ExplainItem(r.qa_id, r.source, r.img_id, r.question, r.answer, row_facts, support,
                                 tuple(cited_boxes), mask, tuple(every_fact.get((r.source, r.img_id), ()))))
    return items


def explain_rows(qa: pd.DataFrame, plans: pd.DataFrame, facts: pd.DataFrame, backend: ExplainerBackend,
                 checker: GroundingChecker, phrasings: ExplanationPhrasings,
                 masks: dict[tuple[str, str], str] | None = None,
                 batch_size: int = 2048) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Explain and check every QA row; return (explanations, quarantined rows). Rows in = explained +
    quarantined, always."""
    items = explain_items(qa, plans, facts, phrasings, masks or {})
    rows, rejected = [], []
    for batch, results in answered_batches(items, backend.explain, batch_size, f"explain ({backend.name})", "row"):
        for item, res in zip(batch, results):
            if isinstance(res, Explained):
                violation = check_explanation(checker, res.text, item)
                if violation is None:
                    rows.append((item.qa_id, item.source, item.img_id, res.text,
                                 [f.question_class for f in item.cited],
                                 visual_explanation(item.boxes, phrasings), item.mask, backend.name,
                                 backend.version, res.prompt_hash))
                    continue
                res = Rejected(item.qa_id, violation.reason, violation.detail, json.dumps({"explanation": res.text}))
            rejected.append({"stage": STAGE, "source": item.source, "key": item.qa_id, "reason": res.reason,
                             "detail": res.detail, "raw": res.raw})
    table = pd.DataFrame(rows, columns=EXPLANATION_COLUMNS).sort_values("qa_id", kind="stable").reset_index(drop=True)
    quarantine = quarantine_frame(rejected)
    return table, quarantine.sort_values("key", kind="stable").reset_index(drop=True)


def make_explainer(backend: str, llm, catalog: Catalog, phrasings: ExplanationPhrasings, seed: int,
                   cache_dir: Path | None = None, batch_dir: Path | None = None,
                   usage_file: Path | None = None) -> ExplainerBackend:
    """The configured explainer; LLM transports are imported only when chosen."""
    if backend == "template":
        return TemplateExplainer(catalog, phrasings, seed)
    from generate.realize import make_llm_client

    return LLMExplainer(make_llm_client(backend, llm, seed, cache_dir, batch_dir, usage_file), phrasings)
