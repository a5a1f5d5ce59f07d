"""Plans + facts -> QA rows through a realizer backend, with provenance, counted and reconciled.

QA table (`stages/qa.parquet`), the release's columns plus provenance:

| column | type | meaning |
|---|---|---|
| qa_id | str | stable id (= plan_id) |
| source | str | source name |
| img_id | str | image id |
| source_label | str | the image's category in its source (for split stratification) |
| complexity | int | number of atomic facts merged into the question (1-3) |
| question | str | natural question covering every fact |
| answer | str | concise answer consistent with every fact |
| original | str | JSON list `[{"q": verbatim atomic question, "a": atomic answer}]`, in question order |
| question_class | list[str] | one class per atomic pair, in question order |
| generator | str | backend name (`template`, ...) |
| generator_version | str | template or prompt version and hash |

Rejected plans go to the quarantine table with their reason: plans = QA rows + rejected, always.
"""

from __future__ import annotations

import json

import pandas as pd
from tqdm.auto import tqdm

from generate.backends import PlanFact, PlanInput, Realized, RealizerBackend
from generate.template import TemplateRealizer
from kvqa.catalog import Catalog
from kvqa.config import GenerateConfig
from kvqa.tables import quarantine_frame

QA_COLUMNS = ["qa_id", "source", "img_id", "source_label", "complexity", "question", "answer", "original",
              "question_class", "generator", "generator_version"]
STAGE = "generate"


def make_backend(config: GenerateConfig, catalog: Catalog, seed: int) -> RealizerBackend:
    if config.backend == "template":
        return TemplateRealizer(catalog, seed)
    raise ValueError(f"unknown generate backend {config.backend!r}")


def plan_inputs(plans: pd.DataFrame, facts: pd.DataFrame) -> list[PlanInput]:
    """Resolve each plan's fact ids into the facts a backend needs."""
    by_id = {
        r.fact_id: PlanFact(r.fact_id, r.question_class, r.answer_type, tuple(r.values), r.source_question,
                            r.source_answer)
        for r in facts.itertuples(index=False)
    }
    return [PlanInput(p.plan_id, p.source, p.img_id, int(p.complexity), tuple(by_id[f] for f in p.fact_ids))
            for p in plans.itertuples(index=False)]


def realize_plans(plans: pd.DataFrame, facts: pd.DataFrame, backend: RealizerBackend,
                  batch_size: int = 2048) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the backend over all plans in batches; return (qa rows, quarantined plans)."""
    labels = dict(zip(zip(facts["source"], facts["img_id"]), facts["source_label"]))
    inputs = plan_inputs(plans, facts)
    rows, rejected = [], []
    with tqdm(total=len(inputs), desc=f"realize ({backend.name})", unit="plan", mininterval=1.0,
              disable=len(inputs) < 5000) as bar:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            results = backend.realize(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"backend {backend.name} returned {len(results)} results for {len(batch)}")
            for plan, res in zip(batch, results):
                if isinstance(res, Realized):
                    asked = [plan.facts[i] for i in res.order]
                    rows.append((
                        plan.plan_id, plan.source, plan.img_id, labels[(plan.source, plan.img_id)],
                        plan.complexity, res.question, res.answer,
                        json.dumps([{"q": f.source_question, "a": f.source_answer} for f in asked],
                                   ensure_ascii=False),
                        [f.question_class for f in asked], backend.name, backend.version,
                    ))
                else:
                    rejected.append({"stage": STAGE, "source": plan.source, "key": plan.plan_id,
                                     "reason": res.reason, "detail": res.detail, "raw": res.raw})
            bar.update(len(batch))
    return pd.DataFrame(rows, columns=QA_COLUMNS), quarantine_frame(rejected)
