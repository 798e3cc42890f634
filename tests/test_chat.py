"""The chat command remembers the conversation: earlier turns reach the model through its prompt format (the Q&A
format's ``Context:`` part for theta-tiny; chat messages with a chat template: tests/test_prompt_format.py), bounded
by the model's context length (oldest turns dropped first), and ``/reset`` forgets.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_chat.py -q
"""

from __future__ import annotations

import argparse

import pytest

from conftest import run_script
from src.model import theta_model
from src.model.theta_model import ThetaModel, format_prompt, split_prompt


def chat_args(max_length: int) -> argparse.Namespace:
    return argparse.Namespace(max_length=max_length, temperature=0.0, top_p=0.9, top_k=50, repetition_penalty=1.2,
                              seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> ThetaModel:
    return ThetaModel.load(tiny_model_dir, device="cpu")


def scripted_chat(tm: ThetaModel, lines: list[str], max_length: int, monkeypatch, answers=None) -> list[dict]:
    """Run chat() on ``lines`` as the user's input; returns each generation call's question, context (the earlier
    turns as the Q&A prompt writes them) and answer."""
    calls = []
    real = ThetaModel.generate_with_stats

    def recording(self, prompt, *args, history=None, **kwargs):
        if answers is None:
            out = real(self, prompt, *args, history=history, **kwargs)
        else:  # a fixed long answer fills the context quickly; no generation needed to test the memory
            out = {"text": answers, "new_tokens": 1, "seconds": 1.0, "tokens_per_sec": 1.0}
        context = "\n".join(f"{format_prompt(q)} {a}" for q, a in history) if history else None
        prompt_ids = self.prompt_format.encode_prompts([{"question": prompt, "history": history}])[0]
        assert prompt_ids == self.tokenizer(split_prompt(prompt, context=context)[0])["input_ids"]
        calls.append({"question": prompt, "context": context, "answer": out["text"], "prompt_tokens": len(prompt_ids)})
        return out

    monkeypatch.setattr(ThetaModel, "generate_with_stats", recording)
    feed = iter(lines)

    def read(_prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert theta_model.chat(tm, chat_args(max_length), read=read) == 0
    return calls


def test_chat_keeps_the_conversation_and_reset_forgets_it(tiny, monkeypatch, capsys):
    calls = scripted_chat(tiny, ["What is DNS?", "And TCP?", "/reset", "What is a VPN?", "exit"], 6, monkeypatch)
    assert [c["question"] for c in calls] == ["What is DNS?", "And TCP?", "What is a VPN?"]
    assert calls[0]["context"] is None
    # The second question sees the first turn, written by the prompt format itself (no end-of-text token).
    assert calls[1]["context"] == f"{format_prompt('What is DNS?')} {calls[0]['answer']}"
    assert "<|endoftext|>" not in calls[1]["context"]
    assert calls[2]["context"] is None  # after /reset
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and out.count("theta> ") == 3


def test_chat_memory_is_bounded_by_the_context_length_oldest_first(tiny, monkeypatch):
    n_positions = tiny.model.config.n_positions
    max_length = 32
    long_answer = " ".join(["the router forwards packets between networks"] * 6)
    questions = [f"Question number {i} about routers?" for i in range(12)]
    calls = scripted_chat(tiny, questions, max_length, monkeypatch, answers=long_answer)
    turns = [f"{format_prompt(q)} {long_answer}" for q in questions]
    dropped_any = False
    for i, c in enumerate(calls):
        # room for the answer is always left, counted with the tokenizer directly
        assert c["prompt_tokens"] <= n_positions - max_length, i
        if i == 0:
            continue
        # the context is the most recent turns, contiguous and ending with the previous one
        for k in range(i):
            if c["context"] == "\n".join(turns[k:i]):
                dropped_any |= k > 0
                # one more (older) turn would not have fitted
                if k > 0:
                    bigger = split_prompt(c["question"], context="\n".join(turns[k - 1:i]))[0]
                    assert len(tiny.tokenizer(bigger)["input_ids"]) > n_positions - max_length
                break
        else:
            pytest.fail(f"call {i}: context is not a run of the latest turns: {c['context']!r:.200}")
    assert dropped_any  # twelve long turns do not fit: the oldest went first


def test_chat_command_from_stdin(tiny_model_dir):
    """The real command, with scripted stdin: two questions, /reset, a question too long to answer, exit."""
    too_long = "why " * 400
    proc = run_script(["-m", "src.model.theta_model", "chat", "--model_path", str(tiny_model_dir), "--max_length",
                       "4", "--temperature", "0", "--device", "cpu"],
                      input=f"What is DNS?\nAnd TCP?\n/reset\n{too_long}\nWhat is UDP?\nexit\n", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("theta> ") == 3 and "(conversation cleared)" in proc.stdout
    assert "error: the question is" in proc.stderr and "Traceback" not in proc.stderr
