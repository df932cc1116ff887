"""MuseD-style deduction (arXiv 2410.09528): syllogism chains over invented terms, built backwards.

Start from a conclusion (form A "All S are P", E "No S are P", I "Some S are P", O "Some S are not P");
each of `depth` steps replaces one proposition by the two premises of a valid syllogism with a fresh
middle term. Only the moods valid without existential import are used (Barbara; Celarent, Cesare,
Camestres; Darii, Datisi, Disamis; Ferio, Festino, Baroco, Bocardo), so the conclusion follows under
the modern (Boolean) reading: a term may be empty, "All S are P" does not say any S exists.
Distractors are premises about fresh terms ("All N are X" / "No N are X" with N fresh, or a fact about
two fresh terms): any model of the chain extends to them (N empty), so they neither contradict the
premises nor add a conclusion about S and P.

Modes: "conclusion" (answer: the conclusion about S and P, converses of E and I accepted) and "judge"
(answer true / false / unknown for a candidate statement).

`satisfiable` / `entails` decide these propositions exactly by regions: with k terms, a model is fixed
by which of the 2^k regions (term memberships) are non-empty; A and E forbid regions, I and O need one.
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple

from nanokimi.tasks.base import Example, GeneratedTask, TaskError

FORMS = "AEIO"
NEGATION = {"A": "O", "O": "A", "E": "I", "I": "E"}
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


class Prop(NamedTuple):
    form: str
    subject: str
    predicate: str

    def text(self) -> str:
        s, p = self.subject, self.predicate
        return {"A": f"All {s} are {p}", "E": f"No {s} are {p}", "I": f"Some {s} are {p}",
                "O": f"Some {s} are not {p}"}[self.form]

    def negated(self) -> "Prop":
        return Prop(NEGATION[self.form], self.subject, self.predicate)

    def canonical(self) -> "Prop":
        """E and I convert (No S are P == No P are S): a representative with sorted terms."""
        if self.form in "EI" and self.predicate < self.subject:
            return Prop(self.form, self.predicate, self.subject)
        return self


def _moods(s: str, p: str, m: str) -> dict[str, list[tuple[Prop, Prop]]]:
    """Premise pairs with middle term m that validly give each conclusion form about (s, p)."""
    return {
        "A": [(Prop("A", m, p), Prop("A", s, m))],
        "E": [(Prop("E", m, p), Prop("A", s, m)), (Prop("E", p, m), Prop("A", s, m)),
              (Prop("A", p, m), Prop("E", s, m))],
        "I": [(Prop("A", m, p), Prop("I", s, m)), (Prop("A", m, p), Prop("I", m, s)),
              (Prop("I", m, p), Prop("A", m, s))],
        "O": [(Prop("E", m, p), Prop("I", s, m)), (Prop("E", p, m), Prop("I", s, m)),
              (Prop("A", p, m), Prop("O", s, m)), (Prop("O", m, p), Prop("A", m, s))],
    }


def satisfiable(props: list[Prop]) -> bool:
    """Whether some assignment of (possibly empty) sets to the terms makes every proposition true."""
    terms = sorted({t for prop in props for t in prop[1:]})
    bit = {t: 1 << i for i, t in enumerate(terms)}
    universal = [(bit[p.subject], bit[p.predicate], p.form) for p in props if p.form in "AE"]
    regions = [r for r in range(1 << len(terms))
               if not any(r & s and ((form == "A" and not r & q) or (form == "E" and r & q))
                          for s, q, form in universal)]
    for prop in props:
        s, q = bit[prop.subject], bit[prop.predicate]
        if prop.form == "I" and not any(r & s and r & q for r in regions):
            return False
        if prop.form == "O" and not any(r & s and not r & q for r in regions):
            return False
    return True


def entails(premises: list[Prop], claim: Prop) -> bool:
    return not satisfiable(list(premises) + [claim.negated()])


def invented_terms(rng: random.Random, count: int) -> list[str]:
    terms: set[str] = set()
    while len(terms) < count:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 2)))
        terms.add(word + rng.choice(["", "b", "k", "m", "p", "x"]) + "s")
    return sorted(terms, key=lambda _: rng.random())


def make_problem(rng: random.Random, depth: int, distractors: int = 0) -> dict:
    """{"premises": shuffled [Prop], "conclusion": Prop, "proof": [(p1, p2, derived)] in proof order,
    "chain": the premises without distractors}."""
    terms = iter(invented_terms(rng, depth + 2 + 2 * distractors))
    s, p = next(terms), next(terms)
    conclusion = Prop(rng.choice(FORMS), s, p)
    open_props, derivations = [conclusion], []
    for _ in range(depth):
        target = open_props.pop(rng.randrange(len(open_props)))
        first, second = rng.choice(_moods(target.subject, target.predicate, next(terms))[target.form])
        open_props += [first, second]
        derivations.append((first, second, target))
    chain = list(open_props)
    used = sorted({t for prop in chain for t in prop[1:]})
    extra = []
    for _ in range(distractors):
        fresh = next(terms)
        if rng.random() < 0.7:
            extra.append(Prop(rng.choice("AE"), fresh, rng.choice(used)))
        else:
            extra.append(Prop(rng.choice(FORMS), fresh, next(terms)))
    premises = chain + extra
    rng.shuffle(premises)
    return {"premises": premises, "conclusion": conclusion, "proof": derivations[::-1], "chain": chain}


PROP_TEXT = re.compile(r"(All|No|Some)\s+([a-z]+)\s+are\s+(not\s+)?([a-z]+)", re.IGNORECASE)


def parse_prop(text: str) -> Prop | None:
    match = PROP_TEXT.search(text)
    if not match:
        return None
    quantifier, subject, negation, predicate = match.groups()
    quantifier = quantifier.lower()
    if negation and quantifier != "some":
        return None
    form = {"all": "A", "no": "E"}.get(quantifier, "O" if negation else "I")
    return Prop(form, subject.lower(), predicate.lower())


class MuseD(GeneratedTask):
    name = "mused"
    stop = ("\n\n",)
    instruction = "Reason step by step from the premises. End with '#### ' and the answer."

    def __init__(self, levels="1-6", per_level: int = 50, distractors: int = 0, mode: str = "conclusion",
                 seed: int = 0, few_shot: int = 0):
        from nanokimi.tasks.ladder import parse_levels

        super().__init__(few_shot)
        if mode not in ("conclusion", "judge"):
            raise TaskError(f"mused mode must be 'conclusion' or 'judge', got {mode!r}.")
        if per_level < 1 or distractors < 0:
            raise TaskError(f"mused needs per_level >= 1 and distractors >= 0, got {per_level} and {distractors}.")
        self.levels, self.per_level, self.distractors = parse_levels(levels), per_level, distractors
        self.mode, self.seed = mode, seed

    def generate(self, split: str, depth: int, index: int) -> Example:
        rng = random.Random(f"mused:{self.seed}:{self.mode}:{self.distractors}:{split}:{depth}:{index}")
        problem = make_problem(rng, depth, self.distractors)
        conclusion = problem["conclusion"]
        premises = "".join(f"{prop.text()}.\n" for prop in problem["premises"])
        proof = "".join(f"{a.text()}. {b.text()}. So {c.text()[0].lower() + c.text()[1:]}.\n"
                        for a, b, c in problem["proof"])
        meta = {"premises": [tuple(p) for p in problem["premises"]], "conclusion": tuple(conclusion)}
        if self.mode == "conclusion":
            about = f"{conclusion.subject} and {conclusion.predicate}"
            question = f"Premises:\n{premises}Question: what follows about {about}?\n"
            answer = conclusion.text()
        else:
            candidate, answer = self._candidate(rng, problem)
            meta["candidate"] = tuple(candidate)
            question = f"Premises:\n{premises}Question: is it true, false or unknown that {candidate.text().lower()}?\n"
        return Example(id=f"{split}/{depth}/{index}", question=question, answer=answer,
                       solution=proof + f"#### {answer}", difficulty=depth, meta=meta)

    @staticmethod
    def _candidate(rng: random.Random, problem: dict) -> tuple[Prop, str]:
        conclusion, premises = problem["conclusion"], problem["premises"]
        kind = rng.choice(["true", "false", "unknown"])
        if kind == "unknown":
            s, p = conclusion.subject, conclusion.predicate
            options = [Prop(f, a, b) for f in FORMS for a, b in ((s, p), (p, s))]
            rng.shuffle(options)
            for option in options:
                if not entails(premises, option) and not entails(premises, option.negated()):
                    return option, "unknown"
            kind = "true"
        return (conclusion, "true") if kind == "true" else (conclusion.negated(), "false")

    def extract(self, response: str) -> str | None:
        _, marker, tail = response.partition("####")
        if not marker:
            return None
        tail = tail.strip().splitlines()[0] if tail.strip() else ""
        if self.mode == "judge":
            word = re.match(r"[a-zA-Z]+", tail)
            return word.group(0).lower() if word and word.group(0).lower() in ("true", "false", "unknown") else None
        prop = parse_prop(tail)
        return None if prop is None else prop.canonical().text()

    def answers_match(self, extracted: str, answer: str) -> bool:
        if self.mode == "judge":
            return extracted == answer.strip().lower()
        reference = parse_prop(answer)
        return reference is not None and extracted == reference.canonical().text()
