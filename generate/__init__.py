"""Atomic facts -> plans (which facts a QA pair covers) -> realised question/answer pairs.

`compose_plans` decides *what* each pair asks; a realizer backend decides *how* it is phrased. The template
realizer is the offline default; LLM backends implement the same `RealizerBackend` interface.
"""

from generate.backends import PlanFact, PlanInput, Realized, RealizerBackend, Rejected
from generate.grounding import GroundingChecker
from generate.plans import PLAN_COLUMNS, compose_plans
from generate.realize import QA_COLUMNS, make_backend, realize_plans
from generate.template import TemplateRealizer

__all__ = [
    "GroundingChecker", "PLAN_COLUMNS", "QA_COLUMNS", "PlanFact", "PlanInput", "Realized", "RealizerBackend", "Rejected",
    "TemplateRealizer", "compose_plans", "make_backend", "realize_plans",
]
