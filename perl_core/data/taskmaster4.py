"""Taskmaster-4 (coffee ordering), the reward data released with PERL (Byrne & Ganesh, Google, CC BY 4.0).

`data.path` is the folder holding `reward/*.json` and `dialogs/*.json` (see its README).

* reward files -> **pointwise** rows: the context turns rendered as text, the prompt ending with
  the agent cue "\\nAgent:", the candidate generation as the response, `reward` (1.0 / 0.0) as the label.
* dialogs -> **sft** rows: every agent action in a dialog (an API call or a spoken reply) is a
  target, the turns before it (API calls and their results included) the prompt. API calls
  are made by the agent after a user turn; the dataset stores them as annotations of that user
  utterance, in order (`api_call`, `request`, `api_response`, `response`).

One rendering serves both, so the policy writes exactly what the reward model was shown:

    User: Can I get a decaf cortado?
    Agent: CALL get_menu_items {"query": "Cortado "}
    API: get_menu_items -> {"items": [{"menu_item_id": "cortado-0004", "name": "Cortado"}]}
    Agent: Got it, one decaf cortado.

JSON payloads are re-serialised compactly when they parse; the few that do not (malformed
quoting in the source) are kept verbatim, so nothing is dropped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from perl_core.config import DataConfig
from perl_core.data.local import load_json, source_files
from perl_core.data.schema import Item, Record, Reject, decode_json
from perl_core.errors import DataError, UserError

AGENT_CUE = "\nAgent:"
SOURCE = "taskmaster4"


def _payload(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = decode_json(value)
        except ValueError:
            return value.strip()
    return json.dumps(value, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def render_action(turn: dict) -> str:
    """What follows "Agent:" for one agent turn: a spoken reply, or `CALL name {args}`."""
    if "api" in turn:
        return " ".join(f"CALL {name} {_payload(args)}" if args is not None else f"CALL {name}"
                        for name, args in turn["api"].items())
    return _one_line(turn["text"])


def render_turn(turn: dict) -> str:
    role = turn.get("role")
    if role == "user":
        return f"User: {_one_line(turn['text'])}"
    if role == "agent":
        return f"Agent: {render_action(turn)}"
    if role == "api":
        return "API: " + " ".join(f"{name} -> {_payload(resp)}" for name, resp in turn["response"].items())
    raise ValueError(f"unknown role {role!r} (expected agent, user or api)")


def render_prompt(turns: list[dict]) -> str:
    return "\n".join(render_turn(t) for t in turns) + AGENT_CUE if turns else AGENT_CUE.lstrip("\n")


def dialog_turns(utterances: list[dict]) -> list[dict]:
    """Dialog utterances -> reward-style turns, API calls (annotations of user turns) in order."""
    turns: list[dict] = []
    for u in utterances:
        speaker = u.get("speaker")
        if speaker not in ("user", "assistant"):
            raise ValueError(f"utterance {u.get('index')}: speaker {speaker!r} (expected user or assistant)")
        turns.append({"role": "user" if speaker == "user" else "agent", "text": u.get("text") or ""})
        call = None
        for a in u.get("annotations") or []:
            name, value = a.get("name"), a.get("value")
            if name == "api_call":
                call = {"role": "agent", "api": {value: None}}
                turns.append(call)
            elif name == "request" and call is not None:
                call["api"] = {next(iter(call["api"])): value}
            elif name == "api_response":
                turns.append({"role": "api", "response": {value: None}})
            elif name == "response" and turns and turns[-1]["role"] == "api":
                turns[-1]["response"] = {next(iter(turns[-1]["response"])): value}
    return turns


def _load_array(path: Path) -> list:
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"expected a JSON array, got {type(data).__name__}", file=str(path))
    return data


def _folders(data_cfg: DataConfig) -> tuple[Path, Path]:
    if not data_cfg.path:
        raise UserError("taskmaster4 needs --path (data.path): the folder with reward/ and dialogs/, "
                        "e.g. ../shared/datasets/taskmaster4")
    root = Path(data_cfg.path).expanduser()
    reward, dialogs = root / "reward", root / "dialogs"
    if not (reward.is_dir() or dialogs.is_dir()):
        raise UserError(f"data.path: {root} holds neither reward/ nor dialogs/ (the Taskmaster-4 layout)")
    return reward, dialogs


def read_reward(path: Path) -> Iterator[Item]:
    try:
        rows = _load_array(path)
    except DataError as err:
        yield Reject.from_error(err, view="pointwise")
        return
    for index, raw in enumerate(rows, start=1):
        field = "context"
        try:
            context = decode_json(raw["context"])
            field = "generation"
            generation = decode_json(raw["generation"])
            field = "reward"
            label = raw["reward"]
            field = "context"
            prompt = render_prompt(context)
            field = "generation"
            response = " " + render_action(generation)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            msg = "missing field" if isinstance(err, KeyError) else f"cannot read it: {err}"
            yield Reject(file=str(path), index=index, field=field, view="pointwise", reason=msg, raw=raw)
            continue
        kind = "api" if "api" in generation else "text"
        yield Record(view="pointwise", file=str(path), index=index,
                     row={"id": raw.get("conversation_id"), "prompt": prompt, "response": response,
                          "label": label, "kind": kind, "source": SOURCE})


def read_dialogs(path: Path) -> Iterator[Item]:
    try:
        rows = _load_array(path)
    except DataError as err:
        yield Reject.from_error(err, view="sft")
        return
    for index, raw in enumerate(rows, start=1):
        try:
            turns = dialog_turns(raw["utterances"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            yield Reject(file=str(path), index=index, field="utterances", view="sft",
                         reason=f"cannot read the dialog: {err}", raw=str(raw)[:500])
            continue
        cid = raw.get("conversation_id", f"{path.stem}-{index}")
        targets = [i for i, t in enumerate(turns) if t["role"] == "agent"]
        if not targets:
            yield Reject(file=str(path), index=index, field="utterances", view="sft",
                         reason="dialog has no assistant turn to learn from", raw=cid)
        for i in targets:
            yield Record(view="sft", file=str(path), index=index,
                         row={"id": f"{cid}#{i}", "prompt": render_prompt(turns[:i]),
                              "response": " " + render_action(turns[i]),
                              "kind": "api" if "api" in turns[i] else "text", "source": SOURCE})


def read(data_cfg: DataConfig) -> Iterator[Item]:
    reward, dialogs = _folders(data_cfg)
    for path in sorted(reward.glob("*.json")):
        yield from read_reward(path)
    for path in sorted(dialogs.glob("*.json")):
        yield from read_dialogs(path)


def describe(data_cfg: DataConfig) -> dict:
    reward, dialogs = _folders(data_cfg)
    files = {}
    for folder in (reward, dialogs):
        if folder.is_dir():
            files.update({f"{folder.name}/{k}": v for k, v in source_files(str(folder)).items()})
    return {"type": "taskmaster4", "files": files,
            "credit": "Taskmaster-4 by Bill Byrne and Saravanan Ganesh (Google LLC), CC BY 4.0"}
