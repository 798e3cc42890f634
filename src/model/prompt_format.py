"""How a record becomes token ids: the prompt the model is given and the completion it is trained to produce.

Two formats, one interface (documentation/PROMPT_FORMATS.md):

- ``QAFormat`` ("qa"): Theta's own ``Question: ...\\nAnswer: ...<eos>`` text (``Context: ...`` first when there is
  context, a system message or earlier turns). The trained end is the tokenizer's EOS.
- ``ChatFormat`` ("chat"): the tokenizer's chat template. The system message, the earlier turns and the question are
  messages; the prompt is the template's rendering with ``add_generation_prompt=True``; the completion is the
  assistant reply plus the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ``</s>``...),
  found by rendering a probe conversation and reading what follows the reply. That token is the trained end and a
  generation stop id.

``resolve_format(name, tokenizer)`` picks one for ``auto|qa|chat``: ``auto`` is what a saved Theta folder records,
else chat when the tokenizer has a chat template, else Q&A. Whatever the format, the prompt ids start with BOS once
when the tokenizer adds one (a chat template writes it itself), and the completion never does (it is encoded
without special tokens).

Every folder ``ThetaModel.save`` writes records its format (``theta_prompt_format.json``, through
:func:`write_prompt_format`) and carries a chat template: the one a chat run was trained with, or for a Q&A run
:data:`QA_CHAT_TEMPLATE`, which renders Theta's Q&A format, so ``pipeline("text-generation")`` given a list of
messages prompts the model as it was trained.

    from src.model.prompt_format import resolve_format
    fmt = resolve_format("auto", tokenizer)
    prompt_ids, completion_ids = fmt.encode([{"question": "What is DNS?", "answer": "It maps names."}])[0]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from src.utils.common import UserError

logger = logging.getLogger(__name__)

FORMAT_NAMES = ("auto", "qa", "chat")
FORMAT_FILE = "theta_prompt_format.json"  # written into every saved folder: the format the model was trained in
QA_EOS_TEXT = "<|endoftext|>"  # the end-of-text text of GPT-2 and theta-tiny, in the tokenizer-free helpers

# Theta's Q&A format as a chat template (Jinja, as transformers renders it): system messages and earlier turns
# become the Context lines, the last user message the question; a final assistant message (a whole conversation,
# as training sees it) is the answer, ended with EOS. The same text QAFormat.render writes (tested).
QA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(lines=[], question=none, answer=none) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.lines = ns.lines + [m['content'] | trim] -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{%- if ns.question is not none -%}{%- set ns.lines = ns.lines + ['Question: ' + ns.question] -%}{%- endif -%}"
    "{%- set ns.question = m['content'] | trim -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if loop.last -%}{%- set ns.answer = m['content'] | trim -%}"
    "{%- else -%}{%- set ns.lines = ns.lines + ['Question: ' + (ns.question or '') + '\\nAnswer: '"
    " + (m['content'] | trim)] -%}{%- set ns.question = none -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.lines -%}{{ 'Context: ' + (ns.lines | join('\\n')) + '\\n' }}{%- endif -%}"
    "{{ 'Question: ' + (ns.question or '') + '\\nAnswer:' }}"
    "{%- if ns.answer is not none -%}{{ ' ' + ns.answer + eos_token }}{%- endif -%}"
)


class PromptFormatError(UserError):
    """A prompt format that cannot be used with this model; the message names the model and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer-free Q&A text (the tests' oracle and the thin split_prompt/format_prompt in theta_model.py)
# ---------------------------------------------------------------------------------------------------------------

def qa_context(context: str | None = None, system: str | None = None,
               history: Sequence[tuple[str, str]] = ()) -> str:
    """The ``Context:`` text of a Q&A prompt: the system message, the record's context, then each earlier turn
    as ``Question: q\\nAnswer: a`` (oldest first), one per line; empty when there is none."""
    lines = [s.strip() for s in (system, context) if s and s.strip()]
    lines += [f"Question: {q.strip()}\nAnswer: {a.strip()}" for q, a in history]
    return "\n".join(lines)


def qa_split(question: str, answer: str | None = None, context: str | None = None, system: str | None = None,
             history: Sequence[tuple[str, str]] = (), eos_text: str = QA_EOS_TEXT) -> tuple[str, str]:
    """``(prompt, completion)`` text of the Q&A format; ``prompt + completion`` is the training text.

    The completion starts with the space after ``Answer:`` (a byte-level BPE joins it to the first answer word as
    generation will) and ends with ``eos_text``; without an answer it is empty.
    """
    prompt = f"Question: {question.strip()}\nAnswer:"
    ctx = qa_context(context, system, history)
    if ctx:
        prompt = f"Context: {ctx}\n" + prompt
    completion = f" {answer.strip()}{eos_text}" if answer is not None else ""
    return prompt, completion


# ---------------------------------------------------------------------------------------------------------------
# The formats
# ---------------------------------------------------------------------------------------------------------------

def data_record(rec: dict) -> dict:
    """The fields of a prepared (or test) record that a format reads: question, answer, context. Data preparation
    already folds a conversation's system message and earlier turns into ``context``; keys a user's file carried
    through under the names ``system`` or ``history`` are not read, so they cannot change the training ids."""
    return {"question": rec["question"], "answer": rec.get("answer"), "context": rec.get("context")}


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos_id]`` when the tokenizer's post-processor puts BOS before a text (Llama, Mistral), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if len(with_special) > len(plain) and with_special[0] == bos else []


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class PromptFormat:
    """The interface both formats share. Bound to one tokenizer (it reads its special tokens and template).

    Records are dicts with ``question``, ``answer`` (optional), ``context``, ``system`` and ``history`` (a list of
    earlier ``(question, answer)`` turns), the last three optional.
    """

    name = ""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    # what each format defines
    def render(self, question: str, answer: str | None = None, context: str | None = None,
               system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
        """``(prompt text, completion text)``; the completion is empty without an answer."""
        raise NotImplementedError

    @property
    def end_id(self) -> int:
        """The token that ends every trained completion."""
        raise NotImplementedError

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _completion_ids(self, records: list[dict], completions: list[str]) -> list[list[int]]:
        raise NotImplementedError

    # shared
    def _render_all(self, records: list[dict], with_answer: bool) -> list[tuple[str, str]]:
        return [self.render(r["question"], r.get("answer") if with_answer else None, r.get("context"),
                            r.get("system"), r.get("history") or ()) for r in records]

    def encode_prompts(self, records: list[dict]) -> list[list[int]]:
        """The prompt ids of each record (its answer, if any, is not read): what generation is given."""
        return self._prompt_ids([p for p, _ in self._render_all(records, False)]) if records else []

    def encode(self, records: list[dict]) -> list[tuple[list[int], list[int]]]:
        """``(prompt ids, completion ids)`` of each record, in one batched tokenizer call per side (the Rust
        tokenizer encodes a whole list in parallel; per-record calls dominated start-up on large data sets)."""
        if not records:
            return []
        rendered = self._render_all(records, True)
        prompts = self._prompt_ids([p for p, _ in rendered])
        completions = self._completion_ids(records, [c for _, c in rendered])
        return list(zip(prompts, completions))

    def stop_ids(self, generation_config=None) -> list[int]:
        """Generation stops at any of these: the trained end first, then the tokenizer's EOS and the EOS ids of
        ``generation_config`` (a family may list several, as Llama-3 does)."""
        ids = [self.end_id] + _id_list(self.tokenizer.eos_token_id)
        if generation_config is not None:
            ids += _id_list(getattr(generation_config, "eos_token_id", None))
        return list(dict.fromkeys(i for i in ids if i is not None))

    def describe(self) -> dict:
        """What a saved folder records (FORMAT_FILE) and the run summary shows."""
        tok = self.tokenizer
        return {"prompt_format": self.name, "end_token": tok.convert_ids_to_tokens(self.end_id),
                "end_token_id": self.end_id, "stop_token_ids": self.stop_ids()}


class QAFormat(PromptFormat):
    """Theta's own format: ``[Context: ...\\n]Question: {question}\\nAnswer: {answer}<eos>``.

    The prompt ids are the prompt text's (BOS first when the tokenizer adds one); the completion is
    ``" " + answer`` without special tokens, then the EOS id. For GPT-2 and theta-tiny (no BOS) these are exactly
    the ids Theta has always trained on (the regression tests hold them).
    """

    name = "qa"

    def render(self, question, answer=None, context=None, system=None, history=()):
        return qa_split(question, answer, context, system, history, eos_text=self.tokenizer.eos_token or "")

    @property
    def end_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _prompt_ids(self, texts):
        bos = _bos_prefix(self.tokenizer)
        return [bos + ids for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _completion_ids(self, records, completions):
        # the answer text without the EOS text, then the EOS id itself: the same ids whether or not the EOS text
        # would tokenise back to one token
        answers = [" " + (r.get("answer") or "").strip() for r in records]
        return [ids + [self.end_id] for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]


class ChatFormat(PromptFormat):
    """The tokenizer's chat template: system message, earlier turns and the question as messages.

    Prompt: the template with ``add_generation_prompt=True``, tokenised as ``apply_chat_template`` does (no
    special tokens added: the template writes BOS itself when the family wants one). Completion: what the whole
    conversation's rendering has between the prompt and the end of the end-of-turn token (the reply, plus
    anything the template writes around it), encoded without special tokens. What a template writes after the
    end-of-turn token (ChatML's and Phi-3's newline) is neither trained nor generated: generation stops at the
    end-of-turn token. A record's context goes into the user message as ``Context: ...`` before the question.
    """

    name = "chat"
    _PROBE_QUESTION, _PROBE_REPLY = "Theta probe question", "Theta probe reply"

    def __init__(self, tokenizer, model_name: str | None = None):
        super().__init__(tokenizer)
        if not has_chat_template(tokenizer):
            raise PromptFormatError(_no_template_message(tokenizer, model_name))
        try:
            self.end_text, self._reply_to_end = self._find_end_of_turn()
        except Exception as err:  # a template that refuses a plain user/assistant exchange (jinja raise_exception)
            name = model_name or getattr(tokenizer, "name_or_path", "") or "this model"
            raise PromptFormatError(f"the chat template of {name} cannot render a user question and an assistant "
                                    f"reply ({type(err).__name__}: {err}); use --prompt_format qa") from err
        self._end_id = tokenizer.convert_tokens_to_ids(self.end_text)

    def _find_end_of_turn(self) -> tuple[str, str]:
        """``(end-of-turn token, the text from a reply's end through that token)``, read off a probe conversation;
        a template that writes no special token after the reply falls back to the EOS token (appended)."""
        tok = self.tokenizer
        full = self._apply(self.messages(self._PROBE_QUESTION, self._PROBE_REPLY), False)
        after = full[full.rindex(self._PROBE_REPLY) + len(self._PROBE_REPLY):]
        specials = {t for t in tok.all_special_tokens if t}
        specials |= {t.content for t in tok.added_tokens_decoder.values() if t.special}
        found = [(after.find(t), -len(t), t) for t in specials if after.find(t) >= 0]
        if not found:
            logger.warning("the chat template of %s writes no special token after the assistant reply; Theta ends "
                           "each reply with the EOS token %r instead", getattr(tok, "name_or_path", "the model"),
                           tok.eos_token)
            return tok.eos_token, tok.eos_token
        pos, _, token = min(found)  # the first one (the longest where two start at the same place)
        return token, after[:pos + len(token)]

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    @staticmethod
    def messages(question: str, answer: str | None = None, context: str | None = None, system: str | None = None,
                 history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """The conversation as chat messages (the answer, when given, as the last assistant message)."""
        out = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
        for q, a in history:
            out += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
        user = question.strip()
        if context and context.strip():
            user = f"Context: {context.strip()}\n\n{user}"
        out.append({"role": "user", "content": user})
        if answer is not None:
            out.append({"role": "assistant", "content": answer.strip()})
        return out

    def render(self, question, answer=None, context=None, system=None, history=()):
        prompt = self._apply(self.messages(question, None, context, system, history), True)
        if answer is None:
            return prompt, ""
        reply = answer.strip()
        full = self._apply(self.messages(question, reply, context, system, history), False)
        at = full.find(reply, len(prompt)) if full.startswith(prompt) else -1
        if at >= 0 and full.startswith(self._reply_to_end, at + len(reply)):
            return prompt, full[len(prompt):at + len(reply) + len(self._reply_to_end)]
        # a template whose whole conversation does not continue its generation prompt (one that writes the last
        # assistant turn differently): the reply and the end-of-turn text, as the probe showed them
        return prompt, reply + self._reply_to_end

    @property
    def end_id(self) -> int:
        return self._end_id

    def _prompt_ids(self, texts):
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _completion_ids(self, records, completions):
        return self.tokenizer(completions, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Choosing a format, and recording it in saved folders
# ---------------------------------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template of its own (Theta's Q&A template does not count: it is the
    Q&A format)."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template != QA_CHAT_TEMPLATE


def _no_template_message(tokenizer, model_name: str | None) -> str:
    name = model_name or getattr(tokenizer, "name_or_path", "") or "this model"
    why = "was trained in Theta's Q&A format" if getattr(tokenizer, "chat_template", None) == QA_CHAT_TEMPLATE \
        else "has no chat template (tokenizer.chat_template is not set)"
    return (f"--prompt_format chat: the tokenizer of {name} {why}. Use --prompt_format qa (or auto, which picks "
            "Q&A for it), or a model whose tokenizer ships a chat template (an instruct/chat model).")


def recorded_format(folder: Path | str | None) -> str | None:
    """The format a saved Theta folder records (FORMAT_FILE), or None (not a folder, or written elsewhere)."""
    if folder is None:
        return None
    path = Path(folder) / FORMAT_FILE
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("prompt_format")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in ("qa", "chat") else None


def resolve_format(name: str | PromptFormat | None, tokenizer, folder: Path | str | None = None,
                   model_name: str | None = None) -> PromptFormat:
    """The format for ``--prompt_format name`` (``auto``, ``qa``, ``chat``; a format object passes through).

    ``auto``: the format ``folder`` records (a model Theta saved), else chat when the tokenizer has a chat
    template, else Q&A. ``chat`` without a template is a PromptFormatError naming the model and the fix.
    """
    if isinstance(name, PromptFormat):
        return name
    name = name or "auto"
    if name not in FORMAT_NAMES:
        raise PromptFormatError(f"--prompt_format {name!r}: choose one of {', '.join(FORMAT_NAMES)}")
    if name == "auto":
        name = recorded_format(folder) or ("chat" if has_chat_template(tokenizer) else "qa")
    if name == "chat":
        return ChatFormat(tokenizer, model_name or (str(folder) if folder else None))
    return QAFormat(tokenizer)


def write_prompt_format(folder: Path, prompt_format: PromptFormat | None) -> None:
    """Record ``prompt_format`` in a just-saved model ``folder``: FORMAT_FILE, the chat template the model answers
    in (a Q&A run: :data:`QA_CHAT_TEMPLATE`, replacing any template the base model had; a chat run: the
    template it was trained with, already saved with the tokenizer), and the stop ids as the generation config's
    EOS, so ``pipeline("text-generation")`` stops where Theta does. Called by ``ThetaModel.save`` inside its
    temporary folder."""
    if prompt_format is None:
        return
    folder = Path(folder)
    if isinstance(prompt_format, QAFormat):
        (folder / "chat_template.jinja").write_text(QA_CHAT_TEMPLATE, encoding="utf-8")
        _drop_key(folder / "tokenizer_config.json", "chat_template")  # the .jinja file is the one template
    info = prompt_format.describe()
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
        stops = list(dict.fromkeys(info["stop_token_ids"] + _id_list(gen.get("eos_token_id"))))
        wanted = stops[0] if len(stops) == 1 else stops
        if gen.get("eos_token_id") != wanted:
            gen["eos_token_id"] = wanted
            gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / FORMAT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _drop_key(path: Path, key: str) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if key in data:
        del data[key]
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
