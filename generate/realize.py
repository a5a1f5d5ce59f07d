"""Plans + facts -> QA rows through a realizer backend, with provenance, counted and reconciled.

QA table (`stages/qa.parquet`), the release's columns plus provenance:

| column | type | meaning |
|---|---|---|
| qa_id | str | stable id: the plan_id, or `<plan_id>-pN` for the plan's N-th paraphrase |
| paraphrase_of | str | the qa_id of the row this row paraphrases (the plan's own row); empty for a plan's own row |
| source | str | source name |
| img_id | str | image id |
| source_label | str | the image's category in its source (for split stratification) |
| complexity | int | number of atomic facts merged into the question (1-3) |
| question | str | natural question covering every fact |
| answer | str | concise answer consistent with every fact |
| original | str | JSON list `[{"q": verbatim atomic question, "a": atomic answer}]`, in question order |
| question_class | list[str] | one class per atomic pair, in question order |
| generator | str | backend name (`template`, `openai:MODEL`, ...) |
| generator_version | str | prompt version and hash (LLM), or catalog version + hash of the row's class entries (template) |
| prompt_hash | str | hash of the rendered prompt of this row (LLM backends; empty for templates) |
| boxes | list[struct] | the boxes behind the row's box facts (label, xmin, ymin, xmax, ymax; empty when none) |

Every realised pair goes through the grounding check, then the backend's `judge_and_paraphrase` (LLM judge,
paraphrases; nothing for templates).
With `llm.second_opinion`, a pair the check rejects only as `answer_misses_fact` is asked again
(`generate.second_opinion`): accepted, it goes on to the judge and paraphrases; its counts are the backend's
`second_opinion_stats`.
Rejected plans go to the quarantine table with their reason: plans = rows with an empty `paraphrase_of` +
rejected, always; paraphrase rows are extra rows of an accepted plan. Whether a row is a paraphrase, and of
which row, is read from `paraphrase_of` (dedup's paraphrase band compares each paraphrase with it), never
parsed out of the id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from generate.backends import PlanFact, PlanInput, Realized, RealizerBackend, Rejected
from generate.grounding import GroundingChecker
from generate.second_opinion import UNCERTAIN, recheck
from generate.template import TemplateRealizer
from kvqa.catalog import Catalog
from kvqa.config import GenerateConfig, LLMConfig
from kvqa.tables import plain_boxes, quarantine_frame, stable_hash

QA_COLUMNS = ["qa_id", "paraphrase_of", "source", "img_id", "source_label", "complexity", "question", "answer", "original",
              "question_class", "generator", "generator_version", "prompt_hash", "boxes"]
STAGE = "generate"


def make_backend(config: GenerateConfig, catalog: Catalog, seed: int, cache_dir: Path | None = None,
                 batch_dir: Path | None = None, usage_file: Path | None = None) -> RealizerBackend:
    """The configured backend; LLM transports are imported only when chosen (vLLM is an extra)."""
    if config.backend == "template":
        return TemplateRealizer(catalog, seed)
    from generate.llm import LLMRealizer

    return LLMRealizer(make_llm_client(config.backend, config.llm, seed, cache_dir, batch_dir, usage_file),
                       GroundingChecker(catalog))


def make_llm_client(backend: str, llm: LLMConfig, seed: int, cache_dir: Path | None = None,
                    batch_dir: Path | None = None, usage_file: Path | None = None):
    """The request-cached LLM client over the chosen transport (`openai`, `batch`, `vllm`); shared by
    generation and the explanation stage (`explain/`), so both get the same cache, repair and usage.
    `usage_file`: the run's usage ledger (every request sent, over all executions)."""
    from generate.llm import LLMClient, UsageLedger
    from generate.llm_cache import RequestCache

    if backend == "openai":
        from generate.openai_backend import OpenAITransport
        transport = OpenAITransport(llm)
    elif backend == "batch":
        from generate.batch_backend import BatchTransport
        transport = BatchTransport(llm, batch_dir or Path("."))
    else:
        from generate.vllm_backend import VLLMTransport
        transport = VLLMTransport(llm)
    cache = RequestCache(Path(llm.cache_dir or cache_dir or Path("llm-cache")))
    return LLMClient(transport, cache, llm, seed, UsageLedger(usage_file) if usage_file else None)


def plan_fact(r) -> PlanFact:
    """A facts-table row (itertuples) as the fact a backend and the grounding check read."""
    return PlanFact(r.fact_id, r.question_class, r.answer_type, tuple(r.values), r.source_question, r.source_answer)


def plan_inputs(plans: pd.DataFrame, facts: pd.DataFrame) -> list[PlanInput]:
    """Resolve each plan's fact ids into the facts a backend needs."""
    by_id = {r.fact_id: plan_fact(r) for r in facts.itertuples(index=False)}
    return [PlanInput(p.plan_id, p.source, p.img_id, int(p.complexity), tuple(by_id[f] for f in p.fact_ids))
            for p in plans.itertuples(index=False)]


def image_facts(facts: pd.DataFrame) -> dict[tuple[str, str], list[PlanFact]]:
    """(source, img_id) -> every fact of that image: what an answer may not contradict, whatever it is asked."""
    out: dict[tuple[str, str], list[PlanFact]] = {}
    for r in facts.itertuples(index=False):
        out.setdefault((r.source, r.img_id), []).append(plan_fact(r))
    return out


def fact_boxes(facts: pd.DataFrame) -> dict[str, list[dict]]:
    """fact_id -> its boxes as plain dicts (parquet hands back arrays of numpy-typed structs)."""
    return {fid: plain_boxes(boxes) for fid, boxes in zip(facts["fact_id"], facts["boxes"]) if len(boxes)}


def _row(plan: PlanInput, res: Realized, label: str, backend: RealizerBackend, qa_id: str, paraphrase_of: str,
         question: str, boxes: dict[str, list[dict]]) -> tuple:
    asked = [plan.facts[i] for i in res.order]
    original = json.dumps([{"q": f.source_question, "a": f.source_answer} for f in asked], ensure_ascii=False)
    row_boxes = []
    for f in asked:
        row_boxes += [b for b in boxes.get(f.fact_id, []) if b not in row_boxes]
    return (qa_id, paraphrase_of, plan.source, plan.img_id, label, plan.complexity, question, res.answer, original,
            [f.question_class for f in asked], backend.name,
            backend.version_for([f.question_class for f in asked]), res.prompt_hash, row_boxes)


def answered_batches(items: list, answer: Callable[[list], list], batch_size: int, desc: str,
                     unit: str) -> Iterator[tuple[list, list]]:
    """(batch, results) over `items` in batches of `batch_size`, with a progress bar. A backend that returns
    another number of results than it was given stops the stage: its results could not be paired."""
    with tqdm(total=len(items), desc=desc, unit=unit, mininterval=1.0, disable=len(items) < 5000) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            results = answer(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"{desc}: {len(results)} results for {len(batch)} inputs")
            yield batch, results
            bar.update(len(batch))


def realize_plans(plans: pd.DataFrame, facts: pd.DataFrame, backend: RealizerBackend, checker: GroundingChecker,
                  batch_size: int = 2048) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Realise, ground-check, judge and paraphrase all plans in batches; return (qa rows, quarantined plans)."""
    labels = dict(zip(zip(facts["source"], facts["img_id"]), facts["source_label"]))
    boxes = fact_boxes(facts)
    inputs = plan_inputs(plans, facts)
    image = image_facts(facts)
    rows, rejected = [], []

    def reject(plan: PlanInput, res: Rejected) -> None:
        rejected.append({"stage": STAGE, "source": plan.source, "key": plan.plan_id,
                         "reason": res.reason, "detail": res.detail, "raw": res.raw})

    stats = backend.second_opinion_stats  # None unless an LLM backend has `llm.second_opinion` on
    for batch, results in answered_batches(inputs, backend.realize, batch_size, f"realize ({backend.name})", "plan"):
        grounded, uncertain = [], []
        for plan, res in zip(batch, results):
            if isinstance(res, Realized):
                violation = checker.check(res.question, res.answer, plan.facts, image[(plan.source, plan.img_id)],
                                          llm=backend.free_text)
                if violation is None:
                    grounded.append((plan, res))
                    continue
                if stats is not None and violation.reason == UNCERTAIN:
                    uncertain.append((plan, res, violation, image[(plan.source, plan.img_id)]))
                    continue
                res = Rejected(plan.plan_id, violation.reason, violation.detail,
                               json.dumps({"question": res.question, "answer": res.answer}))
            reject(plan, res)
        if uncertain:
            for (plan, _, _, _), res in zip(uncertain, recheck(backend.client, checker, uncertain, stats)):
                if isinstance(res, Rejected):
                    reject(plan, res)
                else:
                    grounded.append((plan, res))
            position = {p.plan_id: i for i, p in enumerate(batch)}
            grounded.sort(key=lambda pair: position[pair[0].plan_id])  # rows in plan order
        for (plan, _), res in zip(grounded, backend.judge_and_paraphrase(grounded)):
            if isinstance(res, Rejected):
                reject(plan, res)
                continue
            label = labels[(plan.source, plan.img_id)]
            rows.append(_row(plan, res, label, backend, plan.plan_id, "", res.question, boxes))
            rows += [_row(plan, res, label, backend, f"{plan.plan_id}-p{i}", plan.plan_id, q, boxes)
                     for i, q in enumerate(res.variants, 1)]
    qa = pd.DataFrame(rows, columns=QA_COLUMNS)
    quarantine = quarantine_frame(rejected)
    return qa, quarantine.sort_values("key", kind="stable").reset_index(drop=True)


# --- Realization in chunks (the Dask runner's fan-out) --------------------------------------------------

def image_chunks(plans: pd.DataFrame, facts: pd.DataFrame, n_chunks: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(plans, facts) of `n_chunks` chunks keyed by a hash of (source, img_id): an image's plans and facts
    travel together, and which chunk an image falls in depends on the image alone, not on the order or
    number of the others. Empty chunks are left out."""
    def chunk_ids(frame: pd.DataFrame) -> np.ndarray:
        return np.array([int(stable_hash(s, i)[:8], 16) % n_chunks for s, i in zip(frame["source"], frame["img_id"])],
                        dtype=np.int64)

    plan_ids, fact_ids = chunk_ids(plans), chunk_ids(facts)
    return [(plans[plan_ids == k].reset_index(drop=True), facts[fact_ids == k].reset_index(drop=True))
            for k in range(n_chunks) if (plan_ids == k).any()]


def realize_chunk(chunk: tuple[pd.DataFrame, pd.DataFrame], config: GenerateConfig, catalog: Catalog,
                  seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`realize_plans` on one chunk, with a backend of its own (a worker process builds it from the config;
    the template backend draws per plan, so the rows do not depend on the chunk)."""
    plans, facts = chunk
    return realize_plans(plans, facts, make_backend(config, catalog, seed), GroundingChecker(catalog))


def in_plan_order(plans: pd.DataFrame, parts: list[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The chunks' (qa rows, quarantined plans) merged as `realize_plans` over all plans returns them: rows
    in plan order (a plan's paraphrases after it, as realized), the quarantine by plan id."""
    rows = [qa for qa, _ in parts if len(qa)] or [pd.DataFrame(columns=QA_COLUMNS)]
    qa = pd.concat(rows, ignore_index=True)
    position = pd.Series(np.arange(len(plans)), index=plans["plan_id"])
    own = qa["paraphrase_of"].where(qa["paraphrase_of"] != "", qa["qa_id"])
    qa = qa.iloc[np.argsort(position.loc[own].to_numpy(), kind="stable")].reset_index(drop=True)
    bad = [q for _, q in parts if len(q)] or [quarantine_frame([])]
    return qa, pd.concat(bad, ignore_index=True).sort_values("key", kind="stable").reset_index(drop=True)
