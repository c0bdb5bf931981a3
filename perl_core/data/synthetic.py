"""The embedded default: a coffee-ordering preference task with a gold oracle.

A customer asks for a drink ("Customer: Hi, can I get a large oat milk latte with an extra
shot?\\nAgent:"); an agent reply (" Sure! One large oat milk latte with an extra shot. Anything
else?") is scored by :func:`gold_score`, a programmatic rubric that reads the order back out of
the prompt and checks the reply against it. Because the oracle knows the truth, later stages
can measure real improvement (gold score of policy samples) and catch reward hacking (proxy
reward up while gold goes down).

Why a tiny model can learn it and no single token decides a label: a reply's worth depends on
whether the drink, size, milk, extras and name it repeats are the ones in the *prompt* (a
comparison, not a keyword), and politeness, rudeness and closings each come in many phrasings.

Everything is deterministic from ``data.synthetic.seed``; `generate` returns the three views.
The rubric (weights below) is documented in docs/data.md.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional

from perl_core.config import SyntheticConfig
from perl_core.data.schema import Record

# ---------------------------------------------------------------- the catalogue
DRINKS = ["latte", "cappuccino", "americano", "mocha", "flat white", "espresso", "cold brew", "chai latte"]
SIZES = ["small", "medium", "large"]
MILKS = ["oat milk", "almond milk", "soy milk", "whole milk"]
EXTRAS = ["an extra shot", "vanilla syrup", "caramel syrup", "whipped cream"]
NAMES = ["Sam", "Alex", "Maya", "Jordan", "Priya", "Leo", "Nina", "Omar", "Chloe", "Ben", "Zoe", "Ravi"]

# How an extra may be mentioned (the oracle accepts any of these).
EXTRA_SYNONYMS = {
    "an extra shot": ["extra shot", "double shot", "additional shot"],
    "vanilla syrup": ["vanilla syrup", "vanilla"],
    "caramel syrup": ["caramel syrup", "caramel"],
    "whipped cream": ["whipped cream", "whip"],
}

POLITE = ["Sure!", "Of course!", "Absolutely!", "Happy to help!", "Certainly!", "Great choice!",
          "Sure thing!", "My pleasure!", "Thanks for your order!", "You got it!"]
NEUTRAL = ["Okay.", "Right.", "Noted.", ""]
RUDE = ["Ugh, fine.", "Whatever.", "Fine, if you insist.", "Hurry up, I'm busy.", "Seriously? Fine.",
        "Not this again.", "Make up your mind next time."]
CLOSINGS = ["Anything else?", "Is that right?", "Does that sound good?", "Will that be all?",
            "Can I get you anything else?", "Did I get that right?", "Is that correct?"]
FILLER = [
    "It has been a really busy morning here and the line keeps getting longer by the minute.",
    "I was just telling my coworker about a podcast on the history of the bean trade.",
    "The weather outside looks a bit cloudy today but it might clear up later on.",
    "We are thinking about repainting the walls a brighter color sometime next month.",
    "My cat knocked a plant off the shelf this morning so I was running late.",
    "Our music playlist has been stuck on the same album for three days now.",
]

# Phrases the oracle recognises in a reply (lower case, matched on word boundaries).
POLITE_PHRASES = ["sure", "of course", "absolutely", "happy to help", "certainly", "great choice",
                  "my pleasure", "thanks", "thank you", "you got it", "coming right up", "please", "glad to"]
RUDE_PHRASES = ["ugh", "whatever", "if you insist", "hurry up", "i'm busy", "seriously", "not this again",
                "make up your mind", "do it yourself", "go away"]
CLOSING_PHRASES = ["anything else", "is that right", "sound good", "will that be all", "get that right",
                   "is that correct", "look right"]

# ---------------------------------------------------------------- the rubric
WEIGHTS = {"drink": 0.30, "size": 0.12, "milk": 0.12, "extras": 0.12, "name": 0.04,
           "closing": 0.10, "polite": 0.10, "brevity": 0.10}
PENALTIES = {"wrong_drink": 0.15, "wrong_size": 0.10, "wrong_milk": 0.10, "wrong_extra": 0.08,
             "wrong_name": 0.05, "rude": 0.20, "per_word_over": 0.02, "max_length": 0.30}
BREVITY_BASE, BREVITY_PER_ITEM, BREVITY_SLACK = 14, 2, 6


@dataclass(frozen=True)
class Order:
    drink: str
    size: Optional[str]
    milk: Optional[str] = None
    extras: tuple[str, ...] = ()
    name: Optional[str] = None

    @property
    def n_items(self) -> int:
        return 1 + (self.size is not None) + (self.milk is not None) + len(self.extras) + (self.name is not None)


def _pattern(phrases: list[str]) -> re.Pattern:
    # longest first, so "chai latte" wins over "latte" and "whole milk" over nothing else
    alts = sorted(phrases, key=len, reverse=True)
    return re.compile(r"(?<![\w'])(" + "|".join(re.escape(p) for p in alts) + r")(?![\w'])", re.IGNORECASE)


_DRINK_RE, _SIZE_RE, _MILK_RE = _pattern(DRINKS), _pattern(SIZES), _pattern(MILKS)
_EXTRA_OF = {syn: extra for extra, syns in EXTRA_SYNONYMS.items() for syn in syns}
_EXTRA_RE = _pattern(list(_EXTRA_OF))
_NAME_RE = _pattern(NAMES)
_POLITE_RE, _RUDE_RE, _CLOSING_RE = _pattern(POLITE_PHRASES), _pattern(RUDE_PHRASES), _pattern(CLOSING_PHRASES)
_WORD_RE = re.compile(r"[\w']+")


@dataclass
class Mentions:
    drinks: set = field(default_factory=set)
    sizes: set = field(default_factory=set)
    milks: set = field(default_factory=set)
    extras: set = field(default_factory=set)
    names: set = field(default_factory=set)


def find_mentions(text: str) -> Mentions:
    canon = {p.lower(): p for p in DRINKS + SIZES + MILKS + NAMES}
    return Mentions(
        drinks={canon[m.lower()] for m in _DRINK_RE.findall(text)},
        sizes={canon[m.lower()] for m in _SIZE_RE.findall(text)},
        milks={canon[m.lower()] for m in _MILK_RE.findall(text)},
        extras={_EXTRA_OF[m.lower()] for m in _EXTRA_RE.findall(text)},
        names={canon[m.lower()] for m in _NAME_RE.findall(text)},
    )


def parse_order(prompt: str) -> Optional[Order]:
    """The order in the customer's (last) turn, or None when it names no drink."""
    customer = prompt.rsplit("Customer:", 1)[-1].split("\nAgent:")[0]
    m = find_mentions(customer)
    if not m.drinks:
        return None
    pick = lambda items, order: next((x for x in order if x in items), None)  # noqa: E731 - catalogue order
    return Order(drink=pick(m.drinks, DRINKS), size=pick(m.sizes, SIZES), milk=pick(m.milks, MILKS),
                 extras=tuple(e for e in EXTRAS if e in m.extras), name=pick(m.names, NAMES))


def gold_breakdown(prompt: str, response: str) -> dict[str, float]:
    """Every credit and penalty of the rubric for one reply; `total` is the gold score in [0, 1]."""
    order = parse_order(prompt)
    if order is None:
        return {"total": 0.0}
    said = find_mentions(response)
    lower = response.lower()
    words = len(_WORD_RE.findall(response))
    confirmed = order.drink in said.drinks
    s: dict[str, float] = {}
    s["drink"] = WEIGHTS["drink"] * confirmed
    s["size"] = WEIGHTS["size"] * (order.size in said.sizes if order.size else confirmed)
    s["milk"] = WEIGHTS["milk"] * (order.milk in said.milks if order.milk else confirmed and not said.milks)
    if order.extras:
        s["extras"] = WEIGHTS["extras"] * len(said.extras & set(order.extras)) / len(order.extras)
    else:
        s["extras"] = WEIGHTS["extras"] * (confirmed and not said.extras)
    s["name"] = WEIGHTS["name"] * (order.name in said.names if order.name else confirmed and not said.names)
    s["closing"] = WEIGHTS["closing"] * bool(_CLOSING_RE.search(lower))
    rude = bool(_RUDE_RE.search(lower))
    s["polite"] = WEIGHTS["polite"] * (bool(_POLITE_RE.search(lower)) and not rude)
    budget = BREVITY_BASE + BREVITY_PER_ITEM * order.n_items
    over = max(0, words - budget)
    s["brevity"] = WEIGHTS["brevity"] * confirmed * max(0.0, 1.0 - over / BREVITY_SLACK)
    s["wrong_items"] = -(PENALTIES["wrong_drink"] * len(said.drinks - {order.drink})
                         + PENALTIES["wrong_size"] * len(said.sizes - {order.size})
                         + PENALTIES["wrong_milk"] * len(said.milks - {order.milk})
                         + PENALTIES["wrong_extra"] * len(said.extras - set(order.extras))
                         + PENALTIES["wrong_name"] * len(said.names - {order.name}))
    s["rude"] = -PENALTIES["rude"] * rude
    s["length"] = -min(PENALTIES["max_length"], PENALTIES["per_word_over"] * max(0, over - BREVITY_SLACK))
    s = {k: float(v) for k, v in s.items()}
    s["total"] = round(min(1.0, max(0.0, sum(s.values()))), 6)
    return s


def gold_score(prompt: str, response: str) -> float:
    """The gold oracle: how good `response` is as the agent's reply to the order in `prompt`, in [0, 1]."""
    return gold_breakdown(prompt, response)["total"]


# ---------------------------------------------------------------- prompts
_REQUESTS = [
    "Hi, can I get {a} {desc}?",
    "I'd like {a} {desc}, please.",
    "Could I please have {a} {desc}?",
    "Hello! {A} {desc} for me, please.",
    "Can you make me {a} {desc}? Thanks!",
    "Hey there, I'll take {a} {desc}.",
    "Good morning. {A} {desc}, if you can.",
    "One {desc}, please.",
]
_NAME_LINES = [" It's for {name}.", " My name is {name}.", " Name's {name}.", " The name is {name}."]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _describe(drink: str, size: Optional[str], milk: Optional[str], extras: tuple[str, ...], milk_first: bool) -> str:
    head = " ".join(x for x in (size, milk if milk_first else None, drink) if x)
    rest = ([] if milk_first or not milk else [milk]) + list(extras)
    return head + (" with " + _join(rest) if rest else "")


def _article(text: str) -> str:
    return "an" if text[0] in "aeiou" else "a"


def sample_order(rng: random.Random) -> Order:
    n_extras = rng.choices([0, 1, 2], weights=[0.4, 0.4, 0.2])[0]
    return Order(
        drink=rng.choice(DRINKS),
        size=rng.choice(SIZES),
        milk=rng.choice(MILKS) if rng.random() < 0.6 else None,
        extras=tuple(e for e in EXTRAS if e in rng.sample(EXTRAS, n_extras)),
        name=rng.choice(NAMES) if rng.random() < 0.4 else None,
    )


def render_prompt(order: Order, rng: random.Random) -> str:
    desc = _describe(order.drink, order.size, order.milk, order.extras, milk_first=rng.random() < 0.5)
    template = rng.choice(_REQUESTS)
    a = _article(desc)
    text = template.format(a=a, A=a.capitalize(), desc=desc)
    if order.name:
        text += rng.choice(_NAME_LINES).format(name=order.name)
    return f"Customer: {text}\nAgent:"


# ---------------------------------------------------------------- replies
def _part(rng: random.Random, quality: float, right, wrong_choices: list):
    """right with probability `quality`, else omitted or a wrong catalogue item, half and half."""
    if rng.random() < quality:
        return right
    return rng.choice(wrong_choices) if wrong_choices and rng.random() < 0.5 else None


def compose_response(order: Order, rng: random.Random, quality: float) -> str:
    """A reply whose parts are each right with probability `quality` (omitted or wrong otherwise)."""
    q = quality
    drink = _part(rng, q, order.drink, [d for d in DRINKS if d != order.drink])
    size = _part(rng, q, order.size, [s for s in SIZES if s != order.size])
    if order.milk:
        milk = _part(rng, q, order.milk, [m for m in MILKS if m != order.milk])
    else:
        milk = rng.choice(MILKS) if rng.random() < (1 - q) / 3 else None
    extras = []
    for extra in order.extras:
        got = _part(rng, q, extra, [e for e in EXTRAS if e not in order.extras])
        if got and got not in extras:
            extras.append(got)
    if rng.random() < (1 - q) / 3:
        spare = [e for e in EXTRAS if e not in order.extras and e not in extras]
        if spare:
            extras.append(rng.choice(spare))
    if order.name:
        name = _part(rng, q, order.name, [n for n in NAMES if n != order.name])
    else:
        name = rng.choice(NAMES) if rng.random() < (1 - q) / 4 else None

    mood = rng.random()
    opener = rng.choice(POLITE if mood < q else RUDE if mood < q + (1 - q) / 2 else NEUTRAL)
    body_drink = drink or "drink"
    milk_first = rng.random() < 0.5
    desc = _describe(body_drink, size, milk, tuple(extras), milk_first)
    for_name = f" for {name}" if name else ""
    body = rng.choice([
        f"One {desc}{for_name}.",
        f"I have {_article(desc)} {desc}{for_name}.",
        f"That's {_article(desc)} {desc}{for_name}.",
        f"{_article(desc).capitalize()} {desc}{for_name}, got it.",
    ])
    parts = [opener, body]
    if rng.random() < 1 - q:
        parts.append(rng.choice(FILLER))
        if rng.random() < 1 - q:
            parts.append(rng.choice(FILLER))
    if rng.random() < q:
        parts.append(rng.choice(CLOSINGS))
    return " " + " ".join(p for p in parts if p)


def perfect_response(order: Order) -> str:
    """The reply that scores 1.0: polite, the whole order copied from the prompt, a closing question."""
    desc = _describe(order.drink, order.size, order.milk, order.extras, milk_first=True)
    for_name = f" for {order.name}" if order.name else ""
    return f" Sure! One {desc}{for_name}. Anything else?"


# ---------------------------------------------------------------- the three views
def generate(cfg: SyntheticConfig) -> dict[str, list[dict]]:
    """{"pairwise": [...], "pointwise": [...], "sft": [...]} with `id` and `gold` on every row.

    Each request gets `responses_per_prompt` candidates of random quality (pairwise, pointwise)
    and one reply of quality `sft_quality` (sft, so the anchor is mediocre and RL has room).
    """
    rng = random.Random(cfg.seed)
    views: dict[str, list[dict]] = {"pairwise": [], "pointwise": [], "sft": []}
    for i in range(cfg.n_prompts):
        order = sample_order(rng)
        prompt = render_prompt(order, rng)
        pid = f"syn-{i:05d}"
        candidates = []
        for j in range(cfg.responses_per_prompt):
            response = compose_response(order, rng, quality=rng.uniform(0.2, 1.0))
            gold = gold_score(prompt, response)
            candidates.append((gold, response))
            label = int(gold >= cfg.label_threshold)
            views["pointwise"].append({"id": f"{pid}-{j}", "prompt": prompt, "response": response,
                                       "label": label, "gold": gold})
        pairs = [(a, b) for a in range(len(candidates)) for b in range(a + 1, len(candidates))
                 if abs(candidates[a][0] - candidates[b][0]) >= cfg.min_gap]
        for a, b in rng.sample(pairs, min(cfg.pairs_per_prompt, len(pairs))):
            (ga, ra), (gb, rb) = sorted([candidates[a], candidates[b]], reverse=True)
            views["pairwise"].append({"id": f"{pid}-{a}{b}", "prompt": prompt, "chosen": ra, "rejected": rb,
                                      "gold_chosen": ga, "gold_rejected": gb})
        response = compose_response(order, rng, quality=cfg.sft_quality)
        views["sft"].append({"id": pid, "prompt": prompt, "response": response,
                             "gold": gold_score(prompt, response)})
    return views


# ---------------------------------------------------------------- as a data source
VERSION = 1  # bump when generation changes: it is part of the prepared data's fingerprint


def describe(data_cfg) -> dict:
    return {"type": "synthetic", "generator_version": VERSION, "synthetic": data_cfg.synthetic.model_dump(mode="json")}


def read(data_cfg):

    for view, rows in generate(data_cfg.synthetic).items():
        for i, row in enumerate(rows, start=1):
            yield Record(view=view, row=row, file="synthetic", index=i)
