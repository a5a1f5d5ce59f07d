"""The grounding check against real text: the 143 Kvasir-VQA-x1 test rows in ../shared, their VLM answers
and the x1 authors' LLM judge, the adversarial / faithful corpora, and the check's speed.

The grounding check is the only judge of LLM-written rows, so it is measured on text it did not shape:

1. x1 rows: each row's (question, answer) against the facts of its own atomic pairs (also the image's facts).
   The x1 answers are right by construction, so a rejection is the check's false alarm, unless the answer
   really contradicts its pairs: those (`answer_contradicts_labels`) are listed apart as "x1 label errors
   (candidate)", to be read by a person. Goal: at most 10 % rejected.
2. VLM answers vs the judge: per row and per class the judge scored, `check_statement(response, [that fact],
   image_facts=row facts)`. The judge is the reference (it is itself an LLM: disagreements are listed to be
   read). Goal: the checker accepts at most 5 % of the facts the judge calls wrong.
3. The adversarial corpus (tests/data/grounding_adversarial.yaml, wrong rows written the way LLMs write:
   every one must be rejected, goal 0 accepted) and the faithful one (grounding_faithful.yaml: right rows,
   rejections are false alarms), counted per kind; skipped when the files are not there.
4. Speed: `checker.check` over the x1 rows' (question, answer, facts) repeated to N (160,000; `--quick`
   16,000), timed around the calls only; rows/s and the seconds for 160k rows (goal <= 60 s), with the CPU.
   The check stops at a row's first violation, so while many x1 rows are rejected the figure flatters it
   (the table gives the rejected count beside it).

Facts are built from each atomic (question, answer) pair by the Kvasir-VQA reader's own code
(`sources.kvasir_vqa.parse_answer`, the catalog's source questions, value separator and synonyms); a pair it
cannot parse is counted and listed, and its row is left out of sections 1, 2 and 4.

Listings show the first 30 items; `--list all` shows every one (`--list N`: the first N).

    .venv/bin/python benchmarks/grounding.py [--quick] [--list all|N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml
from _common import ROOT, SHARED, peak_rss_mib, print_json, print_table

from generate.backends import PlanFact
from generate.grounding import GroundingChecker, answer_naturalness
from kvqa.catalog import AnswerType, Catalog, load_catalog
from kvqa.config import LLMConfig
from kvqa.text import normalise_text
from sources.kvasir_vqa import AnswerError, parse_answer

X1_ROWS = SHARED / "kvasir-vqa-x1" / "test-rows-sample.jsonl"
CORPUS_DIR = ROOT / "tests" / "data"
FULL_N, QUICK_N = 160_000, 16_000
GOAL_X1_REJECTED = 0.10
GOAL_JUDGE_WRONG_ACCEPTED = 0.05
GOAL_160K_S = 60.0
LABEL_ERROR = "answer_contradicts_labels"
NOT_STATED = "answer_misses_fact"
RULINGS = ROOT / "benchmarks" / "data" / "x1_judge_rulings.yaml"
REAL_REPLIES = "smollm2_replies.json"


# --- facts: the Kvasir-VQA reader's parsing of an atomic pair ---

def pair_fact(catalog: Catalog, img_id: str, question: str, answer: str) -> PlanFact:
    """One atomic (question, answer) as the Kvasir-VQA reader reads it; AnswerError(reason) when it cannot."""
    q = question.strip()
    if normalise_text(q) in {normalise_text(e) for e in catalog.empty_questions}:
        raise AnswerError("empty_question", "question is empty or 'none'")
    if q in {d.strip() for d in catalog.dropped_questions}:
        raise AnswerError("dropped_question", "dropped from Kvasir-VQA-x1 (subjective)")
    qc = catalog.class_by_question.get(q)
    if qc is None:
        raise AnswerError("unknown_question", f"no catalog class asks {q!r}")
    values = parse_answer(qc, answer, catalog.value_separator)
    return PlanFact(fact_id=f"{img_id}:{qc.name}", question_class=qc.name, answer_type=str(qc.answer_type),
                    values=values, source_question=q, source_answer=answer.strip())


def load_x1(catalog: Catalog, path: Path) -> tuple[list[dict], list[dict], dict]:
    """The x1 rows whose pairs all parse, with their facts (`facts`, `by_class`); the pairs that could not be
    parsed; and the counts read (rows, pairs)."""
    rows, unparsed, read = [], [], Counter()
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        read["rows"] += 1
        read["pairs"] += len(r["original"])
        facts, bad = [], False
        for pair, x1_class in zip(r["original"], r["question_class"]):
            try:
                fact = pair_fact(catalog, r["img_id"], pair["q"], pair["a"])
            except AnswerError as err:
                unparsed.append({"line": line_no, "img_id": r["img_id"], "reason": err.reason, "detail": str(err),
                                 "q": pair["q"], "a": pair["a"]})
                bad = True
                continue
            if fact.question_class != x1_class:
                unparsed.append({"line": line_no, "img_id": r["img_id"], "reason": "class_mismatch",
                                 "detail": f"x1 says {x1_class}, catalog says {fact.question_class}",
                                 "q": pair["q"], "a": pair["a"]})
                bad = True
                continue
            facts.append(fact)
        if not bad:
            rows.append({**r, "line": line_no, "facts": tuple(facts),
                         "by_class": {f.question_class: f for f in facts}})
    return rows, unparsed, read


def limit(items: list, how: str) -> list:
    return items if how == "all" else items[: int(how)]


def show_items(title: str, items: list[dict], how: str, render) -> None:
    shown = limit(items, how)
    more = f" (first {len(shown)}; --list all for every one)" if len(shown) < len(items) else ""
    print(f"\n{title}: {len(items)}{more}")
    for k, it in enumerate(shown, 1):
        print(f"  {k:>3}. " + render(it).replace("\n", "\n       "))


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


# --- 1. the x1 rows themselves ---

def section_x1(checker: GroundingChecker, rows: list[dict], how: str) -> dict:
    rejections = []
    for r in rows:
        v = checker.check(r["question"], r["answer"], r["facts"], image_facts=r["facts"])
        if v is not None:
            rejections.append({"reason": v.reason, "detail": v.detail, "row": r})
    by_reason = Counter(x["reason"] for x in rejections)
    share = len(rejections) / len(rows) if rows else 0.0
    print_table("1. x1 rows: check(question, answer, facts, image_facts=facts)",
                [("rows checked", len(rows)), ("rejected", f"{len(rejections)}  ({pct(len(rejections), len(rows))}, "
                                                          f"goal <= {GOAL_X1_REJECTED:.0%})")]
                + [(f"  {reason}", n) for reason, n in by_reason.most_common()])

    def render(x):
        r = x["row"]
        return (f"{x['reason']}: {x['detail']}\n[line {r['line']}, level {r['complexity']}] "
                f"Q: {r['question']}\nA: {r['answer']}\nfacts: "
                + "; ".join(f"{f.question_class}={list(f.values)}" for f in r["facts"]))

    label_errors = [x for x in rejections if x["reason"] == LABEL_ERROR]
    not_stated = [x for x in rejections if x["reason"] == NOT_STATED]
    other = [x for x in rejections if x["reason"] not in (LABEL_ERROR, NOT_STATED)]
    show_items("x1 label errors (candidate): the answer contradicts its own atomic pairs", label_errors, how, render)
    show_items("x1 answers that do not state a labelled value (a vague or partial answer, or a wording the "
               "catalog lacks)", not_stated, how, render)
    show_items("x1 rows rejected for their question", other, how, render)
    kept = len(rows) - len(label_errors)
    return {"rows": len(rows), "rejected": len(rejections), "rejected_share": round(share, 4),
            "goal_share": GOAL_X1_REJECTED, "within_goal": share <= GOAL_X1_REJECTED,
            "by_reason": dict(by_reason), "label_errors_candidate": len(label_errors),
            "not_stated": len(not_stated), "question_rejected": len(other),
            "rejected_share_without_label_errors": round((len(rejections) - len(label_errors)) / kept, 4) if kept else None}


# --- 2. the VLM's answers against the x1 judge ---

def section_judge(checker: GroundingChecker, rows: list[dict], how: str) -> dict:
    cells: dict[str, Counter] = defaultdict(Counter)  # class -> (judge, checker) -> n
    disagreements = []
    for r in rows:
        for cls, score in r["scores"].items():
            fact = r["by_class"][cls]
            v = checker.check_statement(r["response"], [fact], image_facts=r["facts"])
            judge_right, accepted = bool(score), v is None
            cells[cls][(judge_right, accepted)] += 1
            if judge_right != accepted:
                disagreements.append({"cls": cls, "fact": fact, "judge": judge_right, "v": v, "row": r})
    total = sum(cells.values(), Counter())

    def agree(c: Counter) -> int:
        return c[(True, True)] + c[(False, False)]

    def line(name: str, c: Counter) -> tuple:
        n = sum(c.values())
        return (name, *(f"{x:>11}" for x in (n, c[(True, True)], c[(True, False)], c[(False, True)],
                                              c[(False, False)], pct(agree(c), n))))

    table = [("class", *(f"{h:>11}" for h in ("facts", "right+acc", "right+rej", "wrong+acc", "wrong+rej",
                                                "agreement")))]
    table += [line(cls, cells[cls]) for cls in sorted(cells, key=lambda c: (-sum(cells[c].values()), c))]
    table.append(line("all", total))
    n_all = sum(total.values())
    print_table("2. VLM answers vs the x1 judge: check_statement(response, [fact], image_facts=row facts)\n"
                "   right/wrong = the judge's score, acc/rej = the checker's verdict", table)
    wrong = total[(False, True)] + total[(False, False)]
    wrong_accepted = total[(False, True)] / wrong if wrong else 0.0
    print_table("judge vs checker, all classes", [
        ("", "checker accepts", "checker rejects"),
        ("judge: right", f"{total[(True, True)]:>15}", f"{total[(True, False)]:>15}"),
        ("judge: wrong", f"{total[(False, True)]:>15}", f"{total[(False, False)]:>15}"),
        ("judge-wrong facts accepted", f"{total[(False, True)]} / {wrong} = {pct(total[(False, True)], wrong)} "
                                       f"(goal <= {GOAL_JUDGE_WRONG_ACCEPTED:.0%})", "")])

    def render(x):
        r, f = x["row"], x["fact"]
        said = "judge right, checker rejects" if x["judge"] else "judge wrong, checker accepts"
        why = f" ({x['v'].reason}: {x['v'].detail})" if x["v"] else ""
        return (f"{said}{why}\n{f.question_class}={list(f.values)} [line {r['line']}] Q: {r['question']}\n"
                f"response: {r['response']}")

    show_items("disagreements", disagreements, how, render)
    rulings = {(r["line"], r["class"]): r for r in yaml.safe_load(RULINGS.read_text())["rulings"]}
    accepted_wrong = [x for x in disagreements if not x["judge"]]
    mistaken = [x for x in accepted_wrong if rulings.get((x["row"]["line"], x["cls"]), {}).get("ruling") == "judge_mistaken"]
    unread = [x for x in accepted_wrong if (x["row"]["line"], x["cls"]) not in rulings]
    rightly_wrong = wrong - len(mistaken)
    rightly_accepted = len(accepted_wrong) - len(mistaken)
    rightly_share = rightly_accepted / rightly_wrong if rightly_wrong else 0.0
    print_table(f"judge-wrong facts the check accepts, read ({RULINGS.name})", [
        ("accepted", len(accepted_wrong)), ("ruled: the judge is mistaken", len(mistaken)),
        ("not read yet (counted against the check)", len(unread)),
        ("facts the judge rightly scores wrong", rightly_wrong),
        ("of those accepted", f"{rightly_accepted} = {pct(rightly_accepted, rightly_wrong)} "
                              f"(goal <= {GOAL_JUDGE_WRONG_ACCEPTED:.0%})")])
    return {"facts": n_all, "agreement": round(agree(total) / n_all, 4) if n_all else None,
            "agreement_by_class": {c: round(agree(v) / sum(v.values()), 4) for c, v in sorted(cells.items())},
            "judge_right_accepted": total[(True, True)], "judge_right_rejected": total[(True, False)],
            "judge_wrong_accepted": total[(False, True)], "judge_wrong_rejected": total[(False, False)],
            "judge_wrong_accepted_share": round(wrong_accepted, 4), "judge_mistaken_ruled": len(mistaken),
            "rightly_wrong": rightly_wrong, "rightly_wrong_accepted": rightly_accepted,
            "rightly_wrong_accepted_share": round(rightly_share, 4), "goal_share": GOAL_JUDGE_WRONG_ACCEPTED,
            "within_goal": rightly_share <= GOAL_JUDGE_WRONG_ACCEPTED}


# --- 3. the adversarial and faithful corpora ---

def corpus_cases(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data = data.get("cases", [])
    return list(data or [])


def corpus_facts(catalog: Catalog, specs: list[dict], prefix: str) -> tuple[PlanFact, ...]:
    """PlanFacts of a case's `facts` / `image` entries ({class, values}); KeyError / ValueError on a class or
    value the catalog lacks (YAML's bare yes / no, read as booleans, are taken as "yes" / "no")."""
    out = []
    for k, spec in enumerate(specs or []):
        qc = catalog.classes[spec["class"]]
        values = spec["values"] if isinstance(spec["values"], list) else [spec["values"]]
        values = tuple("yes" if v is True else "no" if v is False else str(v) for v in values)
        bad = [v for v in values if not v.isdigit()] if qc.answer_type == AnswerType.count \
            else [v for v in values if v not in qc.values]
        if bad or not values:
            raise ValueError(f"{qc.name}: {bad or 'no values'} not in its vocabulary")
        out.append(PlanFact(fact_id=f"{prefix}-{k}", question_class=qc.name, answer_type=str(qc.answer_type),
                            values=values, source_question=qc.atomic_question, source_answer="; ".join(values)))
    return tuple(out)


def run_corpus(checker: GroundingChecker, catalog: Catalog, path: Path) -> tuple[dict, list[dict]]:
    """Per kind: cases, accepted, rejected; and every case with its verdict (invalid cases counted apart)."""
    per_kind: dict[str, Counter] = defaultdict(Counter)
    verdicts = []
    for k, case in enumerate(corpus_cases(path)):
        kind = str(case.get("kind", "?"))
        try:
            facts = corpus_facts(catalog, case.get("facts"), f"c{k}")
            image = corpus_facts(catalog, case.get("image"), f"c{k}i")
        except (KeyError, TypeError, ValueError) as err:
            per_kind[kind]["invalid"] += 1
            verdicts.append({"n": k, "case": case, "kind": kind, "invalid": f"bad fact: {err!r}"})
            continue
        v = checker.check(str(case.get("question", "")), str(case.get("answer", "")), facts,
                          image_facts=facts + image, llm=bool(case.get("llm", False)))
        per_kind[kind]["cases"] += 1
        per_kind[kind]["accepted" if v is None else "rejected"] += 1
        verdicts.append({"n": k, "case": case, "kind": kind, "v": v, "facts": facts})
    return per_kind, verdicts


def section_corpora(checker: GroundingChecker, catalog: Catalog, corpus_dir: Path, how: str) -> dict:
    out: dict = {}
    for name, bad_verdict, goal in (("adversarial", "accepted", "0 accepted"), ("faithful", "rejected", "")):
        path = corpus_dir / f"grounding_{name}.yaml"
        if not path.is_file():
            print(f"\n3. {name} corpus: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                  "not there, skipped")
            out[name] = None
            continue
        per_kind, verdicts = run_corpus(checker, catalog, path)
        tot = sum(per_kind.values(), Counter())
        def line(kind: str, c: Counter) -> tuple:
            note = f"  ({c['invalid']} invalid)" if c["invalid"] else ""
            return (kind, f"{c['cases']:>5}", f"{c[bad_verdict]:>8}", f"{pct(c[bad_verdict], c['cases']):>8}{note}")

        print_table(f"3. {name} corpus ({path.name}): {bad_verdict} per kind" + (f" (goal {goal})" if goal else ""),
                    [("kind", f"{'cases':>5}", f"{bad_verdict:>8}", f"{'share':>8}")]
                    + [line(kind, c) for kind, c in sorted(per_kind.items())] + [line("all", tot)])
        wrong = [x for x in verdicts if "invalid" not in x and (x["v"] is None) == (bad_verdict == "accepted")]
        invalid = [x for x in verdicts if "invalid" in x]

        def render(x):
            c = x["case"]
            why = x.get("invalid") or (f"{x['v'].reason}: {x['v'].detail}" if x["v"] else "accepted")
            facts = "; ".join(f"{f.get('class')}={f.get('values')}" for f in c.get("facts") or [])
            image = "; ".join(f"{f.get('class')}={f.get('values')}" for f in c.get("image") or [])
            return (f"[{x['kind']}{', llm' if c.get('llm') else ''}] {why}\nfacts: {facts}"
                    + (f" | image: {image}" if image else "") + f"\nQ: {c.get('question')}\nA: {c.get('answer')}")

        show_items(f"{name} cases {bad_verdict}", wrong, how, render)
        if invalid:
            show_items(f"{name} cases not run (a class or value the catalog lacks)", invalid, how, render)
        out[name] = {"cases": tot["cases"], bad_verdict: tot[bad_verdict], "invalid": tot["invalid"],
                     f"{bad_verdict}_by_kind": {k: c[bad_verdict] for k, c in sorted(per_kind.items())},
                     "cases_by_kind": {k: c["cases"] for k, c in sorted(per_kind.items())}}
    return out


# --- 4. speed ---

# --- 5. a real model's replies ---

def section_real_model(checker: GroundingChecker, catalog: Catalog, corpus_dir: Path, how: str) -> dict | None:
    """The compose replies of SmolLM2-135M-Instruct under a real `vllm serve` (tests/data/smollm2_replies.json):
    the check plus the LLM backend's naturalness rules, per reason; the accepted replies against the ones read by
    hand as right."""
    path = corpus_dir / REAL_REPLIES
    if not path.is_file():
        print(f"\n5. real model replies: {path} not there, skipped")
        return None
    doc = json.loads(path.read_text())
    llm = LLMConfig()
    images = {k: {c: PlanFact(f"{k}:{c}", c, str(catalog.classes[c].answer_type), tuple(v),
                              catalog.classes[c].atomic_question, "; ".join(v)) for c, v in facts.items()}
              for k, facts in doc["images"].items()}
    by_reason, unread = Counter(), []
    for r in doc["replies"]:
        image = images[r["image"]]
        v = (checker.check(r["question"], r["answer"], [image[c] for c in r["classes"]], list(image.values()), llm=True)
             or answer_naturalness(r["answer"], llm.min_answer_words, llm.max_answer_words))
        by_reason[v.reason if v else "accepted"] += 1
        if v is None and not r["right"]:
            unread.append(r)
    n = len(doc["replies"])
    print_table(f"5. a real model's replies ({REAL_REPLIES}: SmolLM2-135M-Instruct, vllm serve on the CPU)",
                [("replies", n)] + [(f"  {reason}", f"{k:>5}  {pct(k, n)}") for reason, k in by_reason.most_common()]
                + [("accepted, not read as right", len(unread))])
    show_items("accepted replies nobody has read as right", unread, how, lambda r: f"Q: {r['question']}\nA: {r['answer']}")
    return {"replies": n, "by_reason": dict(by_reason), "accepted": by_reason["accepted"],
            "read_as_right": sum(r["right"] for r in doc["replies"]), "accepted_unread": len(unread)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def section_speed(checker: GroundingChecker, rows: list[dict], n: int) -> dict:
    base = [(r["question"], r["answer"], r["facts"]) for r in rows]
    work = [base[k % len(base)] for k in range(n)]
    check = checker.check
    rejected = 0
    t0 = time.perf_counter()
    for q, a, facts in work:
        rejected += check(q, a, facts, facts) is not None
    wall = time.perf_counter() - t0
    rate = n / wall if wall else float("inf")
    s_160k = FULL_N / rate
    cpu = cpu_model()
    print_table(f"4. speed: checker.check over {n:,} rows (the {len(base)} x1 rows repeated)", [
        ("rows", f"{n:,}"), ("wall s", f"{wall:.2f}"), ("rows/s", f"{rate:,.0f}"),
        ("µs per row", f"{1e6 * wall / n:.1f}"),
        ("s for 160k rows", f"{s_160k:.1f}{'' if n == FULL_N else ' (projected)'}  (goal <= {GOAL_160K_S:.0f})"),
        ("rejected", f"{rejected:,}"), ("CPU", cpu), ("peak RSS MiB", peak_rss_mib())])
    return {"rows": n, "wall_s": round(wall, 3), "rows_per_s": round(rate), "us_per_row": round(1e6 * wall / n, 1),
            "s_per_160k": round(s_160k, 2), "projected": n != FULL_N, "goal_s": GOAL_160K_S,
            "within_goal": s_160k <= GOAL_160K_S, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"speed over {QUICK_N:,} rows instead of {FULL_N:,}")
    ap.add_argument("--list", default="30", metavar="all|N", help="items per listing (default 30)")
    ap.add_argument("--rows", type=int, default=None, help="speed section's row count (overrides --quick)")
    ap.add_argument("--corpus-dir", type=Path, default=CORPUS_DIR, help="where grounding_*.yaml are")
    args = ap.parse_args()
    if args.list != "all" and not args.list.isdigit():
        ap.error("--list takes 'all' or a number")
    if not X1_ROWS.is_file():
        print(f"grounding benchmark: {X1_ROWS} is not there (the x1 test rows live in ../shared/data)",
              file=sys.stderr)
        sys.exit(2)
    catalog = load_catalog()
    checker = GroundingChecker(catalog)
    rows, unparsed, read = load_x1(catalog, X1_ROWS)
    print_table(f"x1 rows: {X1_ROWS.name}", [
        ("rows read", read["rows"]), ("atomic pairs", read["pairs"]),
        ("pairs not parsed", len(unparsed)), ("rows used (every pair parsed)", len(rows)),
        ("facts", sum(len(r["facts"]) for r in rows))])
    show_items("atomic pairs not parsed (their rows left out)", unparsed, args.list,
               lambda u: f"line {u['line']}: {u['reason']}: {u['detail']}\nq: {u['q']!r}  a: {u['a']!r}")

    figures: dict = {"benchmark": "grounding", "x1_rows": read["rows"], "x1_rows_used": len(rows),
                     "atomic_pairs": read["pairs"], "pairs_unparsed": len(unparsed),
                     "pairs_unparsed_by_reason": dict(Counter(u["reason"] for u in unparsed))}
    figures["x1"] = section_x1(checker, rows, args.list)
    figures["judge"] = section_judge(checker, rows, args.list)
    figures.update(section_corpora(checker, catalog, args.corpus_dir, args.list))
    n = args.rows or (QUICK_N if args.quick else FULL_N)
    figures["speed"] = section_speed(checker, rows, n) if rows else None
    figures["real_model"] = section_real_model(checker, catalog, args.corpus_dir, args.list)
    figures["peak_rss_mib"] = peak_rss_mib()
    print_json(figures)


if __name__ == "__main__":
    main()
