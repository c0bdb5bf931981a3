"""The rewards the policy optimises (`policy.rewards`): the reward model and programmatic functions, weighted.

    r_i = sum_j w_j * r_ij        r_i0 = the reward model's score (normalised by running moments,
                                  policy.normalize_rewards), r_ij = f_j(prompts, responses, rows)_i

A programmatic reward is any importable `module:function` taking the step's prompts, responses and
one row per response (the prompt's data row, plus `finished`: the response ended its turn with the
end token instead of running into max_new_tokens) and returning one float per response; a term's
`kwargs` are passed as keyword arguments. A function that raises, returns the wrong number of
values or a non-finite one stops the run with a message naming it and the row.

Shipped here, for our data: `gold_rubric` (the synthetic task's gold oracle, an RLVR baseline),
`length_penalty`, `ends_turn` and `valid_api_call` (Taskmaster-4's `CALL name {json}` actions).
"""
from __future__ import annotations

import importlib
import json
import math
import re
from typing import Callable, Optional, Sequence

import torch

from perl_core.config import RewardTerm
from perl_core.errors import UserError

RewardFunction = Callable[..., Sequence[float]]


def resolve(terms: list[RewardTerm]) -> list[Optional[RewardFunction]]:
    """Each term's function, imported (None for the reward model); a name that does not import is a UserError."""
    functions = []
    for i, term in enumerate(terms):
        if term.function is None:
            functions.append(None)
            continue
        module, _, name = term.function.partition(":")
        where = f"policy.rewards[{i}].function={term.function!r}"
        if not module or not name:
            raise UserError(f"{where}: expected `module:function`, e.g. perl_core.policy.rewards:gold_rubric")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"{where}: cannot import it ({err})") from None
        if not callable(fn):
            raise UserError(f"{where}: {name} is not a function")
        functions.append(fn)
    return functions


def _call(term: RewardTerm, fn: RewardFunction, prompts, responses, rows) -> list:
    return list(fn(list(prompts), list(responses), list(rows), **term.kwargs))


def function_rewards(term: RewardTerm, fn: RewardFunction, prompts: list[str], responses: list[str],
                     rows: list[dict]) -> torch.Tensor:
    """`fn`'s rewards for the batch as a float tensor; any failure names the function and the first bad row."""
    name = term.function

    def where(i: int) -> str:
        return f"response {i} (prompt {prompts[i][:60]!r}, response {responses[i][:60]!r})"

    try:
        values = _call(term, fn, prompts, responses, rows)
    except Exception as err:  # find the row that breaks it: the user's code, not ours
        for i in range(len(responses)):
            try:
                _call(term, fn, prompts[i:i + 1], responses[i:i + 1], rows[i:i + 1])
            except Exception as row_err:
                raise UserError(f"reward function {name} raised {type(row_err).__name__}: {row_err} on "
                                f"{where(i)}") from None
        raise UserError(f"reward function {name} raised {type(err).__name__}: {err} on the batch of "
                        f"{len(responses)} responses") from None
    if len(values) != len(responses):
        raise UserError(f"reward function {name} returned {len(values)} values for {len(responses)} responses "
                        "(expected one float per response)")
    for i, value in enumerate(values):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UserError(f"reward function {name} returned {value!r} for {where(i)} (expected a finite float)")
    return torch.tensor([float(v) for v in values])


def combine(components: list[torch.Tensor], terms: list[RewardTerm]) -> torch.Tensor:
    """sum_j w_j * r_j (a weight of 1 adds the term as it is)."""
    total = None
    for values, term in zip(components, terms):
        part = values if term.weight == 1.0 else term.weight * values
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------- shipped rewards
def gold_rubric(prompts: list[str], responses: list[str], rows: list[dict]) -> list[float]:
    """The synthetic task's gold oracle in [0, 1] (perl_core.data.synthetic.gold_score): a verifiable reward."""
    from perl_core.data.synthetic import gold_score

    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def length_penalty(prompts: list[str], responses: list[str], rows: list[dict], *, max_words: int = 30,
                   per_word: float = 0.05) -> list[float]:
    """-per_word for every word beyond max_words; 0 for a response within it."""
    return [-per_word * max(0, len(r.split()) - max_words) for r in responses]


def ends_turn(prompts: list[str], responses: list[str], rows: list[dict]) -> list[float]:
    """1 when the response ended its turn (the end token came before max_new_tokens), else 0."""
    return [1.0 if row["finished"] else 0.0 for row in rows]


_CALL_RE = re.compile(r"CALL[ \t]+([A-Za-z_][A-Za-z0-9_]*)")


def parse_api_calls(text: str) -> Optional[list[tuple[str, Optional[dict]]]]:
    """`CALL name {json}` (or `CALL name`), one or more, as perl_core.data.taskmaster4.render_action writes
    them: [(name, args)], or None when the text starts as a call but does not parse to its end."""
    decoder, calls, at, text = json.JSONDecoder(), [], 0, text.strip()
    while at < len(text):
        m = _CALL_RE.match(text, at)
        if m is None:
            return None
        at, args = m.end(), None
        rest = len(text[at:]) - len(text[at:].lstrip())
        if text[at + rest:at + rest + 1] == "{":
            try:
                args, end = decoder.raw_decode(text, at + rest)
            except ValueError:
                return None
            at = end
        calls.append((m.group(1), args))
        at += len(text[at:]) - len(text[at:].lstrip())
    return calls


def valid_api_call(prompts: list[str], responses: list[str], rows: list[dict], *,
                   apis: Optional[list[str]] = None, spoken: float = 1.0) -> list[float]:
    """Taskmaster-4: 1 for an action that is a well-formed call (every call's name in `apis` when given),
    0 for one that starts `CALL` and does not parse; a spoken reply (no `CALL`) scores `spoken`."""
    scores = []
    for response in responses:
        if not response.strip().startswith("CALL"):
            scores.append(spoken)
            continue
        calls = parse_api_calls(response)
        ok = bool(calls) and all(apis is None or name in apis for name, _ in calls)
        scores.append(1.0 if ok else 0.0)
    return scores
