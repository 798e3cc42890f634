"""Every accepted input shape mapped to Theta's ``{question, answer, context, ...}`` records, one function used by
data preparation and by every converter, so a conversation becomes the same records whichever path it takes.

    from src.data_processing.record_shapes import shape_item
    result = shape_item({"instruction": "Say hi.", "input": "", "output": "Hi!"}, max_history_turns=3)
    result.records, result.reason, result.notes

Shapes (documentation/DATASETS.md has an example of each and what happens to every field):
canonical ``question``/``answer``; Dolly ``instruction``/``context``/``response``/``category``; Alpaca
``instruction``/``input``/``output`` with ``system`` and ``history``; ``prompt``/``completion`` (KTO ``label``);
``prompt``/``chosen``/``rejected`` (strings or message lists); ShareGPT and OpenAI ``conversations``/``messages``
(``system``, ``tools``, ``function_call``/``observation`` and ``tool`` turns, content-part lists); ShareGPT
preference (``conversations`` + ``chosen``/``rejected``); Theta ``conversation``/``exchanges`` lists; a bare list
of messages; ``text``-only items are refused (pre-training text, not question/answer pairs), and so are prompts
without an answer (``missing_answer``).

Sharp edges, decided once here:
- A rejected reply and a KTO ``label: false`` completion are never answers (counted, never trained on).
- Each assistant turn is one record whose context is the system message plus the ``max_history_turns`` exchanges
  before it (and the tool calls and results of its own exchange): a later turn keeps what it depends on.
- An assistant message with ``weight: 0`` (OpenAI fine-tuning data) is context of the turns after it, never a
  target.
- An assistant turn that only calls a tool is context, not a target; with ``tool_calls="drop"`` a conversation
  that uses tools is dropped whole with the reason ``tool_call_conversation``, never re-paired.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

USER_ROLES = {"user", "human", "prompter", "question"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt", "answer"}
SYSTEM_ROLES = {"system", "developer"}
TOOL_CALL_ROLES = {"function_call", "tool_call", "tool_calls"}
TOOL_RESULT_ROLES = {"observation", "tool", "function", "ipython", "tool_response"}
DEFAULT_MAX_HISTORY_TURNS = 3
# Pairs inside Theta-style ``conversation`` / ``exchanges`` lists.
PAIR_QUESTION_KEYS = ("user", "human", "question", "input", "prompt", "query")
PAIR_ANSWER_KEYS = ("assistant", "bot", "answer", "output", "response", "reply")


@dataclass
class ShapeResult:
    """What one input item became: records, or the reason it gave none; ``notes`` counts what was set aside
    (rejected replies, undesirable examples, tool turns kept as context...)."""
    records: list[dict] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    notes: Counter = field(default_factory=Counter)


def message_text(content: object) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI content list joined by newlines (image and
    audio parts have no text and are left out). None when there is no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        texts += [p for p in content if isinstance(p, str)]
        return "\n".join(texts) if texts else None
    return None


def _tool_call_text(msg: dict) -> str | None:
    """OpenAI ``tool_calls`` / ``function_call`` of an assistant message as one readable line each."""
    calls = []
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        calls.append(f"{fn.get('name', '?')}({fn.get('arguments', '')})")
    fc = msg.get("function_call")
    if isinstance(fc, dict):
        calls.append(f"{fc.get('name', '?')}({fc.get('arguments', '')})")
    return "; ".join(calls) if calls else None


def tools_line(tools: object) -> str | None:
    """``Tools: name1, name2`` from a tools list (OpenAI or ShareGPT, possibly a JSON string)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return f"Tools: {tools.strip()[:200]}" if tools.strip() else None
    if not isinstance(tools, list) or not tools:
        return None
    names = []
    for t in tools:
        if isinstance(t, dict):
            fn = t.get("function", t)
            names.append(str(fn.get("name", "?")) if isinstance(fn, dict) else "?")
    return f"Tools: {', '.join(names)}" if names else None


def build_context(system: str | None, history: list[str], current: list[str], max_history_turns: int) -> str | None:
    """The context of one target turn: system, the last ``max_history_turns`` exchanges, then the turns of the
    current exchange before the answer (tool calls and results). None when empty."""
    parts = [system] if system else []
    if max_history_turns > 0:
        parts += history[-max_history_turns:]
    parts += current
    return "\n\n".join(p for p in parts if p) or None


def normalise_role(msg: dict) -> str:
    role = str(msg.get("role", msg.get("from", ""))).strip().lower()
    if role in USER_ROLES:
        return "user"
    if role in ASSISTANT_ROLES:
        return "assistant"
    if role in SYSTEM_ROLES:
        return "system"
    if role in TOOL_CALL_ROLES:
        return "tool_call"
    if role in TOOL_RESULT_ROLES:
        return "tool_result"
    return role or "?"


def conversation_records(messages: list, max_history_turns: int, tool_calls: str = "keep",
                         system: str | None = None, tools: object = None,
                         result: ShapeResult | None = None) -> ShapeResult:
    """One record per assistant turn with text, its question the latest user message (see module docstring)."""
    result = result if result is not None else ShapeResult()
    history: list[str] = []  # finished exchanges as "User: ...\nAssistant: ..."
    current: list[str] = []  # tool turns and extra assistant turns of the exchange in progress
    question: str | None = None
    exchange: list[str] = []
    used_tools = weighted_out = False
    tl = tools_line(tools)
    system_parts = [s for s in (system, tl) if s]
    for msg in messages:
        if not isinstance(msg, dict):
            result.notes["bad_message"] += 1
            continue
        role = normalise_role(msg)
        text = message_text(msg.get("content", msg.get("value")))
        call = _tool_call_text(msg) if role == "assistant" else None
        if role == "system":
            if text and text.strip():
                system_parts.insert(0, text.strip())
        elif role == "user":
            if question is not None and exchange:
                history.append("\n".join(exchange))
            if text is None or not text.strip():
                question, exchange, current = None, [], []
                result.notes["empty_message"] += 1
                continue
            question, current = text, []
            exchange = [f"User: {text.strip()}"]
        elif role in ("tool_call", "tool_result") or call:
            used_tools = True
            label = "Tool result" if role == "tool_result" else "Tool call"
            line = f"{label}: {(text or call or '').strip()}"
            if call and text and text.strip() and role == "assistant":
                line = f"Assistant: {text.strip()}\nTool call: {call}"
            current.append(line)
            exchange.append(line)
            result.notes["tool_turns_as_context"] += 1
        elif role == "assistant":
            if text is None or not text.strip():
                result.notes["empty_message"] += 1
                continue
            if question is None:
                result.notes["assistant_turn_without_question"] += 1
                continue
            if _weight_zero(msg):  # OpenAI fine-tuning data: a reply the model sees but is not trained to give
                result.notes["weight_0_reply_as_context"] += 1
                current.append(f"Assistant: {text.strip()}")
                exchange.append(f"Assistant: {text.strip()}")
                weighted_out = True
                continue
            ctx = build_context("\n".join(system_parts) or None, history, current, max_history_turns)
            rec = {"question": question, "answer": text, "turn": len(result.records)}
            if ctx:
                rec["context"] = ctx
            result.records.append(rec)
            current.append(f"Assistant: {text.strip()}")
            exchange.append(f"Assistant: {text.strip()}")
        else:
            result.notes["unknown_role"] += 1
    if question is not None and len(exchange) == 1:
        result.notes["unanswered_last_turn"] += 1
    if used_tools and tool_calls == "drop":
        result.records.clear()
        result.reason, result.detail = "tool_call_conversation", "uses tool calls and --tool_calls is drop"
        return result
    if not result.records and result.reason is None:
        result.reason, result.detail = "no_answered_turn", (
            "every assistant reply has weight 0 (context, never a target)" if weighted_out else
            "no assistant reply follows a user message")
    return result


def _weight_zero(msg: dict) -> bool:
    """An OpenAI fine-tuning ``weight`` of 0 (``false`` too); a missing weight, or 1, trains the reply."""
    weight = msg.get("weight")
    return weight is not None and not isinstance(weight, str) and weight == 0


def _as_messages(value: object, default_role: str) -> list | None:
    """A prompt/chosen/completion value as a message list (a string becomes one message)."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict) and ("content" in value or "value" in value):
        return [value]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    return None


def _last_assistant_only(messages: list, max_history_turns: int, tool_calls: str, system: str | None,
                         tools: object, result: ShapeResult) -> ShapeResult:
    """Preference / completion data: only the final assistant reply is a target; earlier turns are context."""
    conv = conversation_records(messages, max_history_turns, tool_calls, system, tools)
    result.notes.update(conv.notes)
    if conv.reason:
        result.reason, result.detail = conv.reason, conv.detail
        return result
    last = conv.records[-1]
    last["turn"] = 0
    if len(conv.records) > 1:
        result.notes["earlier_turns_as_context"] += len(conv.records) - 1
    result.records.append(last)
    return result


def _pairs_records(pairs: list, max_history_turns: int, result: ShapeResult) -> ShapeResult:
    """Theta-style ``[{"user": q, "assistant": a}, ...]`` (or question/answer) pairs as a conversation."""
    messages = []
    for p in pairs:
        if not isinstance(p, dict):
            continue
        if "role" in p or "from" in p:
            messages.append(p)
            continue
        q = next((p[k] for k in PAIR_QUESTION_KEYS if isinstance(p.get(k), str)), None)
        a = next((p[k] for k in PAIR_ANSWER_KEYS if isinstance(p.get(k), str)), None)
        if q is not None:
            messages.append({"role": "user", "content": q})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    return conversation_records(messages, max_history_turns, result=result)


def _alpaca_context(item: dict, max_history_turns: int) -> str | None:
    history = []
    for h in item.get("history") or []:
        if isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h):
            history.append(f"User: {h[0].strip()}\nAssistant: {h[1].strip()}")
    system = item.get("system") if isinstance(item.get("system"), str) and item["system"].strip() else None
    return build_context(system.strip() if system else None, history, [], max_history_turns)


def _carry(item: dict, rec: dict, keys=("id", "domain", "category", "source_dataset")) -> dict:
    for k in keys:
        if item.get(k) not in (None, "") and k not in rec:
            rec[k] = item[k]
    return rec


def shape_item(item: object, max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS,
               tool_calls: str = "keep") -> ShapeResult:
    """Map one input item to records (see the module docstring for the shapes and the rules)."""
    result = ShapeResult()
    if isinstance(item, list):  # a bare list of messages
        if item and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in item):
            return conversation_records(item, max_history_turns, tool_calls, result=result)
        return ShapeResult(reason="unsupported_shape", detail=f"list of {len(item)} items that are not messages")
    if not isinstance(item, dict):
        return ShapeResult(reason="unsupported_shape", detail=f"item is {type(item).__name__}")
    label = item.get("label")
    if label is False or (isinstance(label, str) and label.strip().lower() == "false"):
        return ShapeResult(reason="undesirable_example", detail="KTO label false: never a target")
    system = item.get("system") if isinstance(item.get("system"), str) else None
    if "question" in item or "answer" in item:
        rec = dict(item)
        rec.pop("label", None)
        result.records.append(rec)
    elif "instruction" in item and ("output" in item or "response" in item):
        question, answer = item["instruction"], item.get("output", item.get("response"))
        extra = item.get("input") if "output" in item else None
        if isinstance(question, str) and isinstance(extra, str) and extra.strip():
            question = f"{question}\n\n{extra}"
        rec = {"question": question, "answer": answer}
        context = item.get("context") if "response" in item else None  # Dolly's reference text
        alpaca_ctx = _alpaca_context(item, max_history_turns)
        parts = [p for p in (alpaca_ctx, context.strip() if isinstance(context, str) else None) if p]
        if parts:
            rec["context"] = "\n\n".join(parts)
        result.records.append(_carry(item, rec))
    elif ("chosen" in item or "rejected" in item) and ("prompt" in item or "conversations" in item
                                                       or "messages" in item or isinstance(item.get("chosen"), list)):
        result.notes["rejected_reply_not_trained"] += 1 if "rejected" in item else 0
        prompt = item.get("prompt", item.get("conversations", item.get("messages")))
        prompt_msgs = _as_messages(prompt, "user") if prompt is not None else []
        chosen = item.get("chosen")
        chosen_msgs = _as_messages(chosen, "assistant") if chosen is not None else None
        if prompt_msgs is None or not chosen_msgs:
            return ShapeResult(reason="unsupported_shape", detail="preference item without a usable chosen reply",
                               notes=result.notes)
        _last_assistant_only(prompt_msgs + chosen_msgs, max_history_turns, tool_calls, system, item.get("tools"),
                             result)
        for r in result.records:
            r["preference"] = "chosen"
            _carry(item, r)
    elif "prompt" in item and "completion" in item:
        prompt_msgs = _as_messages(item["prompt"], "user")
        completion_msgs = _as_messages(item["completion"], "assistant")
        if prompt_msgs is None or completion_msgs is None:
            return ShapeResult(reason="unsupported_shape", detail="prompt/completion are not text or messages")
        _last_assistant_only(prompt_msgs + completion_msgs, max_history_turns, tool_calls, system,
                             item.get("tools"), result)
        for r in result.records:
            _carry(item, r)
            if item.get("label") is True:
                r["kto_label"] = True
    elif isinstance(item.get("conversations") or item.get("messages"), list):
        conversation_records(item.get("conversations") or item.get("messages"), max_history_turns, tool_calls,
                             system, item.get("tools"), result)
        _number_turns(item, result)
    elif isinstance(item.get("conversation") or item.get("exchanges"), list):
        _pairs_records(item.get("conversation") or item.get("exchanges"), max_history_turns, result)
        _number_turns(item, result)
    elif ("prompt" in item or "instruction" in item) and not any(
            k in item for k in ("completion", "output", "response", "chosen")):
        return ShapeResult(reason="missing_answer",
                           detail=f"a prompt without a completion, output or response (keys: {sorted(item)[:8]}): "
                                  "nothing to train on")
    elif "text" in item:
        return ShapeResult(reason="pretraining_text",
                           detail="a 'text'-only item is pre-training text, not a question/answer pair; "
                                  "give question/answer fields or use a chat shape")
    else:
        keys = [str(k) for k in item]
        guess = _guess_columns(keys)
        hint = (f"; if these are the question and the answer, name them: --columns question={guess[0]},"
                f"answer={guess[1]}" if guess else "")
        return ShapeResult(reason="unsupported_shape", detail=f"keys: {sorted(keys)[:8]}{hint}")
    return result


QUESTION_HINTS = ("quest", "prompt", "ask", "query", "frage", "pregunta", "input")
ANSWER_HINTS = ("answ", "repl", "resp", "output", "solution", "antwort", "respuesta", "reponse")


def _guess_columns(keys: list[str]) -> tuple[str, str] | None:
    """The item's likeliest question and answer fields, for the ``--columns`` hint: names that start with q / a
    or hold a question / answer word, else the first two fields in the item's own order."""
    def first(hints: tuple[str, ...], letter: str, skip: str | None) -> str | None:
        for k in keys:
            low = k.lower()
            if k != skip and (low.startswith(letter) or any(h in low for h in hints)):
                return k
        return None

    q = first(QUESTION_HINTS, "q", None)
    a = first(ANSWER_HINTS, "a", q)
    if q and a:
        return q, a
    return (keys[0], keys[1]) if len(keys) >= 2 else None


def _number_turns(item: dict, result: ShapeResult) -> None:
    for rec in result.records:
        if item.get("id") not in (None, ""):
            rec["id"] = f"{item['id']}-t{rec['turn']}"
        if item.get("domain") not in (None, ""):
            rec["domain"] = item["domain"]
