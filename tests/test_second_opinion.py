"""The LLM second opinion on answers the grounding rules cannot read (generate/second_opinion.py), through the
real `openai` client against the loopback stand-in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from generate import GroundingChecker, compose_plans, make_backend, realize_plans
from generate.backends import PlanFact, PlanInput
from generate.llm import facts_json
from generate.realize import image_facts, plan_inputs
from generate.second_opinion import class_prompt, missed_facts, reply_model, value_schema
from generate.prompts import load_prompt
from kvqa.config import GenerateConfig, KvasirVQASource, LLMConfig, PlanConfig
from kvqa.tables import stable_hash
from openai_standin import FLIP, OpenAIStandIn
from sources import read_sources

ASKS = "Which value does this answer state for"
REF = re.compile(r"\(ref ([a-p]+)\)")


@pytest.fixture(scope="module")
def small(real_csv, catalog):
    """Facts of 12 real images and every 4th of their plans (~80 plans of levels 1-3)."""
    facts = read_sources([KvasirVQASource(metadata_csv=real_csv, image_dir=real_csv.parent)], catalog).facts
    facts = facts[facts.img_id.isin(sorted(facts.img_id.unique())[100:112])].reset_index(drop=True)
    plans = compose_plans(facts, PlanConfig(), seed=42)
    return facts, plans.iloc[::4].reset_index(drop=True)


def config(url: str, cache: Path, **kw) -> GenerateConfig:
    return GenerateConfig(backend="openai", llm=LLMConfig(base_url=url, cache_dir=cache, concurrency=8, timeout_s=5,
                                                          max_retries=2, backoff_base_s=0.01,
                                                          api_key_env="KVQA_TEST_KEY", **kw))


def is_vague(messages: list[dict]) -> bool:
    return int(stable_hash(messages[1]["content"])[:8], 16) % 2 == 0


def says_yes(ref: str) -> bool:
    """The second opinion states the value for half of the vague answers (all of a plan's facts alike)."""
    return ref[0] < "i"


def chooser(messages: list[dict], attempt: int) -> str | None:
    user = messages[1]["content"]
    if ASKS in user:
        ref = REF.search(user)
        return "second_yes" if ref and says_yes(ref.group(1)) else None
    if user.startswith("Facts about") and is_vague(messages[:2]):
        return "vague"
    return None


def run(cfg: GenerateConfig, small, catalog):
    facts, plans = small
    backend = make_backend(cfg, catalog, seed=42)
    qa, rejected = realize_plans(plans, facts, backend, GroundingChecker(catalog))
    return qa, rejected, backend


def vague_plans(backend, small) -> dict[str, PlanInput]:
    facts, plans = small
    return {p.plan_id: p for p in plan_inputs(plans, facts)
            if is_vague(backend.compose.render(facts=facts_json(p), k=p.complexity))}


def asked(standin) -> list[dict]:
    return [b for b in standin.bodies if b["response_format"]["json_schema"]["name"] == "second_opinion"]


def test_uncertain_rows_are_accepted_or_kept_by_the_second_opinion(small, catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("KVQA_TEST_KEY", "sk-test")
    facts, plans = small
    with OpenAIStandIn(chooser=chooser) as standin:
        qa, rejected, backend = run(config(standin.url, tmp_path / "cache", second_opinion=True), small, catalog)
        sent, bodies = standin.requests, asked(standin)
        qa2, rejected2, backend2 = run(config(standin.url, tmp_path / "cache", second_opinion=True), small, catalog)
        assert standin.requests == sent  # the re-run: every reply from the cache, second opinions included
    vague = vague_plans(backend, small)
    own = qa[qa.paraphrase_of == ""]
    assert len(own) + len(rejected) == len(plans)  # counts reconcile
    accepted = {r.qa_id: r.answer for r in own.itertuples() if r.qa_id in vague}
    kept = {r.key: r for r in rejected.itertuples()}
    assert set(accepted) | set(kept) == set(vague) and not set(accepted) & set(kept)  # the others all grounded
    for plan_id, answer in accepted.items():
        assert says_yes(REF.search(answer).group(1))
    for plan_id, r in kept.items():
        raw = json.loads(r.raw)
        assert not says_yes(REF.search(raw["answer"]).group(1))
        assert r.reason == "answer_misses_fact" and "; second opinion: " in r.detail and "not_stated" in r.detail
        assert set(map(tuple, raw["second_opinion"].values())) == {("not_stated",)}
        assert set(raw["second_opinion"]) == {f.question_class for f in vague[plan_id].facts}
    assert accepted and kept  # both outcomes shown
    # One request per missed fact (every fact of a vague answer), each with its class's vocabulary as the enum.
    assert len(bodies) == sum(len(p.facts) for p in vague.values())
    assert backend.usage["second_opinion"]["requests"] == len(bodies)
    for body in bodies:
        name = re.search(rf"{ASKS} (\w+) ", body["messages"][1]["content"]).group(1)
        assert body["response_format"]["json_schema"]["schema"]["properties"]["value"] == \
            value_schema(catalog.classes[name])
    assert backend.second_opinion_stats.as_dict() == {"asked": len(vague), "accepted": len(accepted),
                                                      "kept_rejected": len(kept)}
    assert set(backend.second_opinion_stats.accepted_verdicts) == set(accepted)
    # Rows stay in plan order; the re-run gives the same tables from the cache.
    order = list(plans.plan_id)
    assert list(own.qa_id) == sorted(own.qa_id, key=order.index)
    assert qa.equals(qa2) and rejected.equals(rejected2)
    assert backend2.second_opinion_stats.as_dict() == backend.second_opinion_stats.as_dict()
    assert backend2.usage["second_opinion"]["last_execution"]["requests"] == 0


def test_second_opinion_off_sends_none(small, catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("KVQA_TEST_KEY", "sk-test")
    with OpenAIStandIn(chooser=chooser) as standin:
        qa, rejected, backend = run(config(standin.url, tmp_path / "cache"), small, catalog)
        assert not asked(standin)
    vague = vague_plans(backend, small)
    assert set(rejected.key) == set(vague) and set(rejected.reason) == {"answer_misses_fact"}
    assert not rejected.detail.str.contains("second opinion").any()
    assert backend.second_opinion_stats is None and "second_opinion" not in backend.usage


def test_contradictions_are_never_asked(small, catalog, tmp_path, monkeypatch):
    """A contradicted answer is decided by the rules; so is a miss beside a contradiction of another fact."""
    monkeypatch.setenv("KVQA_TEST_KEY", "sk-test")
    facts, plans = small
    with OpenAIStandIn(chooser=lambda m, a: "contradict" if m[1]["content"].startswith("Facts") else None) as standin:
        qa, rejected, backend = run(config(standin.url, tmp_path / "cache", second_opinion=True), small, catalog)
        assert not asked(standin)
    assert set(rejected.reason) == {"answer_contradicts_labels"} and len(qa) + len(rejected) == len(plans)
    assert backend.second_opinion_stats.as_dict() == {"asked": 0, "accepted": 0, "kept_rejected": 0}
    # A level-2 answer that states nothing of its first fact and contradicts its second.
    checker, image = GroundingChecker(catalog), image_facts(facts)
    standin = OpenAIStandIn()
    for p in plan_inputs(plans, facts):
        second = p.facts[-1]
        if p.complexity != 2 or second.answer_type != "yes_no":
            continue
        flipped = PlanFact(second.fact_id, second.question_class, second.answer_type,
                           (FLIP[second.values[0]],), second.source_question, second.source_answer)
        answer = standin.realizer.realize_one(PlanInput("p", "s", "i", 1, (flipped,))).answer
        facts_of = image[(p.source, p.img_id)]
        verdict = checker.check_statement(answer, p.facts, facts_of)
        if verdict is not None and verdict.reason == "answer_misses_fact":
            assert missed_facts(checker, answer, p.facts, facts_of) is None
            break
    else:
        pytest.fail("no level-2 plan with a yes/no second fact")


def test_reply_schema_and_model_per_class(catalog):
    prompt = load_prompt("second_opinion")
    assert prompt.schema_["properties"]["value"] == {}  # filled per request
    count, multi, single = (catalog.classes[n] for n in ("polyp_count", "abnormality_presence", "procedure_type"))
    assert class_prompt(prompt, single).schema_["properties"]["value"] == {
        "type": "string", "enum": ["colonoscopy", "gastroscopy", "capsule endoscopy", "not_stated"]}
    assert class_prompt(prompt, multi).schema_["properties"]["value"]["items"]["enum"][-2:] == ["none", "not_stated"]
    assert prompt.schema_["properties"]["value"] == {}  # the file's template is not changed
    assert reply_model(count).model_validate_json('{"value": 2}').value == 2
    assert reply_model(count).model_validate_json('{"value": "not_stated"}').value == "not_stated"
    assert reply_model(multi).model_validate_json('{"value": ["polyp", "hemorrhoids"]}').value == ["polyp",
                                                                                                   "hemorrhoids"]
    for model, bad in ((single, '{"value": "sigmoidoscopy"}'), (multi, '{"value": []}'), (count, '{"value": -1}'),
                       (single, '{"value": "colonoscopy", "why": "x"}')):
        with pytest.raises(ValidationError):
            reply_model(model).model_validate_json(bad)
