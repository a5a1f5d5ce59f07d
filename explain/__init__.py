"""Explanations (Medico 2026 subtask 2): QA rows + facts -> grounded textual explanations and the source
boxes/masks as visual explanations (`explain.explain`); the subtask-2 validation subset, reference
submission and submission validator (`explain.medico`)."""

from explain.explain import (EXPLANATION_COLUMNS, ExplainItem, Explained, ExplanationPhrasings, LLMExplainer,
                             TemplateExplainer, check_explanation, explain_items, explain_rows, load_phrasings,
                             make_explainer, mask_index, visual_explanation)

__all__ = ["EXPLANATION_COLUMNS", "ExplainItem", "Explained", "ExplanationPhrasings", "LLMExplainer",
           "TemplateExplainer", "check_explanation", "explain_items", "explain_rows", "load_phrasings",
           "make_explainer", "mask_index", "visual_explanation"]
