"""Evaluate a trained model on the held-out test set; write the metrics to stats/ and an HTML report with plots.

Teacher-forced metrics (perplexity, token accuracy) cover answer tokens only: the prompt and padding are masked
and every answer token weighs the same. Generated-answer metrics (exact match, token F1, BLEU-1..4, ROUGE-L)
compare each model answer with its reference. Everything is also broken down per domain. Before any of it, the
test set is checked against the model's training data (named in the run folder's ``training_config.json``):
an overlap is refused, because it would make every number here look better than the model is.

    python src/training/evaluate_model.py --model_path models/<run>/theta_final
    python -m src.training.evaluate_model --model_path models/<run>/theta_final --test_data Datasets/test_set.json \
        --output_file stats/evaluation_<run>.json --num_samples 5 --seed 42
    python -m src.training.evaluate_model --model_path models/<run>/theta_final --baseline_model theta-tiny

Writes ``--output_file`` (default ``stats/evaluation_<run>.json``) and ``stats/<run>/``: ``report.html`` plus
``loss_curve.png``, ``learning_rate.png``, ``token_accuracy.png``, ``domains.png`` (and ``baseline_deltas.png``
with ``--baseline_model``). See documentation/EVALUATION.md for what every number means.
"""

from __future__ import annotations

import argparse
import logging
import re
import string
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from transformers.utils import logging as hf_logging

from src.model.prompt_format import FORMAT_NAMES, data_record, resolve_format
from src.model.theta_model import ThetaModel
from src.training.report import coverage, fixed, recorded_path
from src.training.lm_data import TokenizedDataset, collate, evaluate
from src.utils.common import (PROJECT_ROOT, FlagParser, UserError, atomic_write_json, read_json,
                              remove_stale_temporaries, run_entry_point, setup_logging)
from src.utils.run_lock import lock_outputs, release_locks
from src.utils.data_contract import question_key

logger = logging.getLogger(__name__)

# Headline metrics, in report order; the baseline deltas and the per-domain tables use the same keys.
TEXT_METRICS = ("exact_match", "f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
BLEU_WEIGHTS = {"bleu_1": (1.0,), "bleu_2": (0.5, 0.5), "bleu_3": (1 / 3, 1 / 3, 1 / 3),
                "bleu_4": (0.25, 0.25, 0.25, 0.25)}


# ---------------------------------------------------------------------------------------------------------------
# Text metrics: exact match, token F1 (SQuAD), BLEU (nltk), ROUGE-L
# ---------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_WORDS = re.compile(r"\w+|[^\w\s]")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation removed, articles (a/an/the) removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised tokens (a multiset overlap).

    Two empty answers agree (1.0); one empty answer against a non-empty one scores 0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu_tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks as separate tokens (BLEU and ROUGE-L count n-grams of these)."""
    return _WORDS.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence: the textbook dynamic programme, O(len(a) * len(b)), one row."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1): precision LCS/len(prediction), recall LCS/len(reference), over ``bleu_tokens``."""
    pred, ref = bleu_tokens(prediction), bleu_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (nltk, one reference per answer), smoothed with Chen & Cherry's method 1.

    Smoothing matters for short answers: without it one missing 4-gram makes BLEU-4 exactly 0.
    """
    hyps = [bleu_tokens(p) for p in predictions]
    refs = [[bleu_tokens(r)] for r in references]
    if not any(hyps):  # nltk divides by the hypothesis length
        return {name: 0.0 for name in BLEU_WEIGHTS}
    smooth = SmoothingFunction().method1
    return {name: float(corpus_bleu(refs, hyps, weights=w, smoothing_function=smooth))
            for name, w in BLEU_WEIGHTS.items()}


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L per answer, plus corpus BLEU-1..4."""
    n = len(predictions)
    if n == 0:
        return {name: 0.0 for name in TEXT_METRICS} | {"records": 0}
    out = {"exact_match": sum(map(exact_match, predictions, references)) / n,
           "f1": sum(map(token_f1, predictions, references)) / n}
    out.update(bleu_scores(predictions, references))
    out["rouge_l"] = sum(map(rouge_l, predictions, references)) / n
    out["records"] = n
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data: the test set, and the training data it must not overlap
# ---------------------------------------------------------------------------------------------------------------

def load_test_records(path: Path) -> list[dict]:
    """A flat list, a ``{"qa_pairs": [...]}`` wrapper or a prepared file; records need question and answer."""
    data = read_json(path, "test set (--test_data)")
    if isinstance(data, dict):
        data = data.get("records", data.get("qa_pairs"))
    if not isinstance(data, list):
        raise UserError(f"--test_data {path}: expected a list of records (or a qa_pairs/records wrapper)")
    records = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) \
                or not isinstance(rec.get("answer"), str) or not rec["question"].strip() or not rec["answer"].strip():
            raise UserError(f"--test_data {path}: record {i} needs non-empty 'question' and 'answer' strings")
        records.append({**rec, "domain": rec.get("domain") or "unknown"})
    if not records:
        raise UserError(f"--test_data {path} holds no records")
    return records


def run_name(model_path: Path) -> str:
    """The run id of ``models/<run>/theta_final`` (the model folder's parent), else the folder's own name."""
    return model_path.parent.name if model_path.name.startswith("theta_") else model_path.name


def run_folder(model_path: Path) -> Path | None:
    """``models/<run>/`` for ``models/<run>/theta_final`` (any ``theta_*`` folder inside a run), else None."""
    model_path = Path(model_path)
    return model_path.parent if model_path.name.startswith("theta_") else None


def training_data_path(run_dir: Path | None) -> Path | None:
    """The prepared file the run trained on (``args.data_path`` of its training_config.json), when it can be found.

    A relative path was relative to where training ran: the project root for the overnight scripts, so both the
    current folder and the project root are tried.
    """
    if run_dir is None or not (run_dir / "training_config.json").is_file():
        return None
    try:
        config = read_json(run_dir / "training_config.json", "training config")
    except UserError as err:
        logger.warning("cannot check the test set against the training data: %s", err)
        return None
    data_path = (config.get("args") or {}).get("data_path") if isinstance(config, dict) else None
    if not data_path:
        return None
    found = recorded_path(data_path)
    if found is not None and found.is_file():
        return found
    logger.warning("cannot check the test set against the training data: %s (args.data_path of %s) is gone",
                   data_path, run_dir / "training_config.json")
    return None


NEAR_DUPLICATE_REFUSE_SHARE = 0.05  # a test set with more of its questions near a training record is refused
NEAR_DUPLICATE_EXAMPLES = 5


def check_no_overlap(test_records: list[dict], model_path: Path, test_path: Path) -> dict:
    """Refuse (UserError) a test set that shares a question with the model's training data, or of which more
    than ``NEAR_DUPLICATE_REFUSE_SHARE`` of the questions are near-duplicates of training records.

    Questions are compared through ``question_key`` (src/utils/data_contract.py), the one key data preparation
    uses to keep the test set apart, so a test set preparation wrote is never refused for a question that only
    looks the same under a cruder key ("C#" and "C++"). Near-duplicates (a paraphrase or a typo of a trained
    question with its answer: "What's a firewall?", "What is a firewal?") are found with the measure and the
    candidate search preparation drops them with (``near_duplicates.held_out_overlaps``): counted, shown with
    examples, and refused above the share. Shared ids alone are reported but not refused: ids from different
    files can coincide without the text being the same. Returns what was checked, for the results file.
    """
    from src.data_processing.near_duplicates import DEFAULT_THRESHOLD, held_out_overlaps

    data_path = training_data_path(run_folder(model_path))
    if data_path is None:
        logger.warning("no training data found for %s (no run folder training_config.json with args.data_path): "
                       "the test set cannot be checked for leakage", model_path)
        return {"checked": False}
    data = read_json(data_path, "training data")
    train = data.get("records", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    train = [r for r in train if isinstance(r, dict) and isinstance(r.get("question"), str)]
    train_questions = {question_key(r["question"]): r.get("id") for r in train}
    train_ids = {str(r.get("id")) for r in train if r.get("id") not in (None, "")}
    overlap = [r for r in test_records if question_key(r["question"]) in train_questions]
    if overlap:
        shown = "; ".join(f"{r.get('id', '?')}: {r['question'][:60]!r}" for r in overlap[:5])
        raise UserError(
            f"--test_data {test_path} overlaps the training data of this model ({data_path}): {len(overlap)} of "
            f"{len(test_records)} test questions were trained on (e.g. {shown}). Metrics on them would be "
            "inflated. Use the held-out set data preparation used (python -m src.utils.data_layout names it) or "
            "remove those records, then evaluate again.")
    with_answers = [r for r in train if isinstance(r.get("answer"), str)]
    near = held_out_overlaps([(r["question"], r["answer"]) for r in test_records],
                             [(r["question"], r["answer"]) for r in with_answers], DEFAULT_THRESHOLD)
    examples = [{"test_id": test_records[i].get("id"), "test_question": test_records[i]["question"][:200],
                 "train_id": with_answers[j].get("id"), "train_question": with_answers[j]["question"][:200],
                 "similarity": sim} for i, j, sim in near[:NEAR_DUPLICATE_EXAMPLES]]
    share = len(near) / len(test_records) if test_records else 0.0
    if near:
        shown = "; ".join(f"{e['test_question'][:50]!r} ~ {e['train_question'][:50]!r} ({e['similarity']})"
                          for e in examples[:3])
        logger.warning("%d of %d test questions (%.1f%%) are near-duplicates of training records (question and "
                       "answer both at least %.2f similar, the measure data preparation uses), e.g. %s",
                       len(near), len(test_records), 100 * share, DEFAULT_THRESHOLD, shown)
    if share > NEAR_DUPLICATE_REFUSE_SHARE:
        raise UserError(
            f"--test_data {test_path}: {len(near)} of {len(test_records)} test questions ({share:.0%}, more than "
            f"{NEAR_DUPLICATE_REFUSE_SHARE:.0%}) nearly repeat a training record of this model ({data_path}), "
            f"e.g. {shown}. Metrics on them would be inflated. Remove or rewrite those records, or use the held-out "
            "set data preparation used (python -m src.utils.data_layout names it), then evaluate again.")
    shared_ids = sorted(str(r["id"]) for r in test_records
                        if r.get("id") not in (None, "") and str(r["id"]) in train_ids)
    if shared_ids:
        logger.warning("%d test record id(s) also occur in the training data with other questions (e.g. %s); "
                       "not an overlap of text, evaluating", len(shared_ids), ", ".join(shared_ids[:5]))
    return {"checked": True, "training_data": str(data_path), "training_records": len(train),
            "overlapping_questions": 0, "shared_ids": len(shared_ids), "near_duplicates": len(near),
            "near_duplicate_share": round(share, 4), "near_duplicate_threshold": DEFAULT_THRESHOLD,
            "near_duplicate_refused_above": NEAR_DUPLICATE_REFUSE_SHARE, "near_duplicate_examples": examples}


# ---------------------------------------------------------------------------------------------------------------
# Model metrics
# ---------------------------------------------------------------------------------------------------------------

def teacher_forced_metrics(tm: ThetaModel, records: list[dict], batch_size: int, max_length: int) -> dict:
    """Answer-token loss, perplexity and token accuracy (overall and per domain), via ``evaluate`` of
    src/training/lm_data.py (the one validation uses), in the records' order."""
    max_length = min(max_length, tm.context_length)
    ds = TokenizedDataset(records, tm.tokenizer, max_length, prompt_format=tm.prompt_format)
    if len(ds) == 0:
        raise UserError("no test record leaves room for an answer token within --max_length; raise --max_length")
    # The records in file order, in consecutive batches (the figures do not depend on the order).
    batches = [collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))], tm.tokenizer.pad_token_id)
               for start in range(0, len(ds), batch_size)]
    m = evaluate(tm.model, batches, tm.device, nullcontext(), ds.domain_names)
    # The answer tokens a full-length read would score: what the figures above cover a part of when records
    # were truncated or skipped (the same tokenisation, without the length limit).
    full = TokenizedDataset(records, tm.tokenizer, 10 ** 9, prompt_format=tm.prompt_format).target_tokens()
    # A skipped record was cut too (only a cut can leave no answer token), so "truncated" here counts the
    # evaluated records whose answer was cut: evaluated + skipped = all records, truncated <= evaluated.
    m.update(evaluated_records=len(ds), truncated=ds.truncated - ds.skipped, skipped=ds.skipped,
             answer_tokens_full=full, max_length=max_length)
    return m


@torch.no_grad()
def generate_answers(tm: ThetaModel, records: list[dict], settings: dict, batch_size: int) -> tuple[list[str], dict]:
    """Answer every test question, ``batch_size`` prompts at a time (left padding), with ``settings``.

    Returns the answers (in record order) and generation timing. The RNG is seeded once with
    ``settings["seed"]`` before the first batch, so the same settings and batch size give the same answers.
    """
    context = tm.context_length
    answers, new_tokens, seconds = [""] * len(records), 0, 0.0
    torch.manual_seed(settings["seed"])
    # The prompts as the model's format writes them (the one generate_batch uses). Prompts that leave no room for
    # an answer get an empty answer (counted): scoring them 0 is honest.
    lengths = [len(ids) for ids in tm.prompt_format.encode_prompts([data_record(r) for r in records])]
    too_long = [i for i, n in enumerate(lengths) if n >= context]
    kept = [i for i, n in enumerate(lengths) if n < context]
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        out = tm.generate_batch([records[i]["question"] for i in chunk], settings["max_new_tokens"],
                                settings["temperature"], settings["top_p"], settings["top_k"],
                                settings["repetition_penalty"], None, [records[i].get("context") for i in chunk])
        seconds += out[0]["seconds"]
        for i, o in zip(chunk, out):
            answers[i], new_tokens = o["text"], new_tokens + o["new_tokens"]
    return answers, {"new_tokens": new_tokens, "seconds": round(seconds, 3),
                     "tokens_per_sec": new_tokens / seconds if seconds > 0 else 0.0, "prompts_too_long": len(too_long)}


def evaluate_one(tm: ThetaModel, records: list[dict], args: argparse.Namespace, settings: dict) -> dict:
    """Every metric of one model on ``records``: overall, per domain, and the answers themselves."""
    start = time.time()
    forced = teacher_forced_metrics(tm, records, args.batch_size, args.max_length)
    answers, timing = generate_answers(tm, records, settings, args.batch_size)
    references = [r["answer"] for r in records]
    by_domain = defaultdict(list)
    for i, r in enumerate(records):
        by_domain[r["domain"]].append(i)
    per_domain = {}
    for domain, idx in sorted(by_domain.items()):
        text = text_metrics([answers[i] for i in idx], [references[i] for i in idx])
        per_domain[domain] = {**forced["domains"].get(domain, {}), **text}
    return {
        "perplexity": forced["perplexity"], "loss": forced["loss"], "token_accuracy": forced["token_accuracy"],
        "answer_tokens": forced["tokens"], "answer_tokens_full": forced["answer_tokens_full"],
        "evaluated_records": forced["evaluated_records"], "truncated": forced["truncated"],
        "skipped": forced["skipped"], "max_length": forced["max_length"], "generated_answers": len(answers),
        **text_metrics(answers, references), "per_domain": per_domain,
        "generation_timing": timing, "answers": answers, "seconds": round(time.time() - start, 2),
    }


def run_config(run_dir: Path | None) -> dict:
    """The run folder's training_config.json, or {} when there is none (or it cannot be read)."""
    if run_dir is None or not (Path(run_dir) / "training_config.json").is_file():
        return {}
    try:
        config = read_json(Path(run_dir) / "training_config.json", "training config")
    except UserError:
        return {}
    return config if isinstance(config, dict) else {}


def base_figures(model_path: Path, records: list[dict], args: argparse.Namespace, vocab: dict) -> dict | None:
    """The teacher-forced figures (perplexity, loss, token accuracy) of the model the run started from, untrained
    for this data: its ``--warm_start`` folder, else its ``--model_name`` (theta-tiny: rebuilt from the run's
    ``--datasets_dir`` only when that data changed; the folder under models/base/ otherwise). The report's verdict
    compares the trained model with it. None without a run folder; ``{"model", "error"}`` when it cannot be
    loaded (a hub model that is not cached, offline). Cost: one teacher-forced pass over the test set."""
    targs = run_config(run_folder(model_path)).get("args") or {}
    name = targs.get("warm_start") or targs.get("model_name")
    if not name:
        return None
    try:
        if Path(name).exists():
            base_tm = ThetaModel.load(name, device=args.device)
        else:
            kwargs = {"datasets_dir": Path(targs["datasets_dir"])} if targs.get("datasets_dir") else {}
            base_tm = ThetaModel(str(name), device=args.device, **kwargs)
        forced = teacher_forced_metrics(base_tm, records, args.batch_size, args.max_length)
    except (UserError, OSError, ValueError) as err:
        logger.warning("the untrained base %s could not be evaluated (%s): the verdict has no base to compare", name,
                       err)
        return {"model": str(name), "error": str(err)}
    out = {"model": str(name), "perplexity": forced["perplexity"], "loss": forced["loss"],
           "token_accuracy": forced["token_accuracy"], "answer_tokens": forced["tokens"],
           "same_tokenizer": base_tm.tokenizer.get_vocab() == vocab}
    logger.info("untrained base %s: perplexity %s, token accuracy %s on the same test set", name,
                fixed(out["perplexity"], 4), fixed(out["token_accuracy"], 3))
    return out


def load_any_model(name_or_path: str | Path, device: str) -> ThetaModel:
    """A model folder through ``ThetaModel.load``; otherwise a hub name or ``theta-tiny``."""
    return ThetaModel.load(name_or_path, device=device) if Path(name_or_path).exists() \
        else ThetaModel(str(name_or_path), device=device)


def evaluate_model(args: argparse.Namespace) -> dict:
    """Check the test set, evaluate the model (and the baseline), return the results dict."""
    model_path = Path(args.model_path)
    records = load_test_records(Path(args.test_data))
    leakage = check_no_overlap(records, model_path, Path(args.test_data))
    torch.manual_seed(args.seed)
    settings = {"decoding": "sampling" if args.temperature > 0 else "greedy", "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "repetition_penalty": args.repetition_penalty, "seed": args.seed, "batch_size": args.batch_size}
    tm = ThetaModel.load(model_path, device=args.device)
    tm.prompt_format = resolve_format(args.prompt_format, tm.tokenizer, model_path, str(model_path))
    logger.info("evaluating %s on %d test records (%s decoding, up to %d new tokens, seed %d, prompt format %s)",
                model_path, len(records), settings["decoding"], args.max_new_tokens, args.seed, tm.prompt_format.name)
    ours = evaluate_one(tm, records, args, settings)
    answers = ours.pop("answers")
    vocab = len(tm.tokenizer)
    vocab_map = tm.tokenizer.get_vocab()
    result = {
        "run": run_name(model_path), "model_path": str(model_path), "test_data": str(args.test_data),
        "test_records": len(records), "device": str(tm.device), "prompt_format": tm.prompt_format.name, **ours,
        "generation": settings,
        "leakage_check": leakage, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    del tm
    if args.base_perplexity:
        base = base_figures(model_path, records, args, vocab_map)
        if base is not None:
            result["base"] = base
    baseline_answers = None
    if args.baseline_model:
        logger.info("evaluating the baseline %s with the same settings", args.baseline_model)
        base_tm = load_any_model(args.baseline_model, args.device)
        base = evaluate_one(base_tm, records, args, settings)
        baseline_answers = base.pop("answers")
        result["baseline"] = {"model": str(args.baseline_model), **base}
        keys = ("perplexity", "loss", "token_accuracy") + TEXT_METRICS
        result["deltas"] = {k: ours[k] - base[k] for k in keys}
        result["per_domain_deltas"] = {d: {k: m[k] - base["per_domain"][d][k] for k in keys if k in m
                                           and k in base["per_domain"].get(d, {})}
                                       for d, m in ours["per_domain"].items()}
        if len(base_tm.tokenizer) != vocab:
            result["baseline"]["note"] = ("different tokenizers: perplexity and token accuracy count different "
                                          "tokens, so only the text metrics compare like for like")
    result["samples"] = [
        {"id": r.get("id"), "domain": r["domain"], "question": r["question"], "reference": r["answer"],
         "generated": answers[i], "f1": token_f1(answers[i], r["answer"]), "rouge_l": rouge_l(answers[i], r["answer"]),
         **({"baseline_generated": baseline_answers[i]} if baseline_answers is not None else {})}
        for i, r in enumerate(records[:args.num_samples])]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = FlagParser(description="Evaluate a Theta model on the held-out test set and write a report.")
    io = p.add_argument_group("input and output")
    io.add_argument("--model_path", type=Path, required=True, help="model folder, e.g. models/<run>/theta_final")
    io.add_argument("--test_data", type=Path, default=None,
                    help="held-out test set (default: the one data preparation uses: Datasets/test_set.json when "
                         "you wrote one, else the sample's, else Datasets/enhanced_test_set.json)")
    io.add_argument("--output_file", type=Path, default=None,
                    help="metrics file (default stats/evaluation_<run>.json); the report goes to <its folder>/<run>/")
    io.add_argument("--baseline_model", type=str, default=None,
                    help="also evaluate this model (folder, hub name or theta-tiny) and report the deltas")
    io.add_argument("--no_report", action="store_true", help="write the metrics file only, no HTML report or plots")
    io.add_argument("--base_perplexity", action=argparse.BooleanOptionalAction, default=True,
                    help="also score the untrained model the run started from (its --model_name or --warm_start, "
                         "from training_config.json) teacher-forced on the same test set, for the report's verdict")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--batch_size", type=int, default=8, help="records per forward pass and per generation batch")
    ev.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--max_length", type=int, default=512, help="longest teacher-forced sequence in tokens")
    ev.add_argument("--prompt_format", choices=FORMAT_NAMES, default="auto",
                    help="auto (default: the format the folder was trained in), qa or chat; the baseline model "
                         "always takes its own auto (documentation/PROMPT_FORMATS.md)")
    ev.add_argument("--num_samples", type=int, default=5, help="generated examples stored and shown with references")
    gen = p.add_argument_group("generation (every test question is answered for EM/F1/BLEU/ROUGE-L)")
    gen.add_argument("--max_new_tokens", type=int, default=128,
                     help="most tokens generated per answer (short limits lower BLEU through its brevity penalty)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    gen.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (sampling only)")
    gen.add_argument("--top_k", type=int, default=50, help="top-k sampling (sampling only)")
    gen.add_argument("--repetition_penalty", type=float, default=1.2, help="repetition penalty (1 = none)")
    gen.add_argument("--seed", type=int, default=42, help="seed set before generation (recorded in the results)")
    args = p.parse_args(argv)
    for bad, message in [(args.batch_size < 1, "--batch_size must be at least 1"),
                         (args.max_length < 8, "--max_length must be at least 8"),
                         (args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
                         (args.num_samples < 0, "--num_samples must be >= 0"),
                         (args.temperature < 0, "--temperature must be >= 0"),
                         (not 0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
                         (args.top_k < 0, "--top_k must be >= 0"),
                         (args.repetition_penalty <= 0, "--repetition_penalty must be > 0")]:
        if bad:
            p.error(message)
    if args.output_file is None:
        args.output_file = PROJECT_ROOT / "stats" / f"evaluation_{run_name(args.model_path)}.json"
    if args.test_data is None:
        from src.utils.data_layout import resolve_test_set

        args.test_data = resolve_test_set(PROJECT_ROOT / "Datasets")
    return args


def log_summary(result: dict) -> None:
    """The console summary: the figures, each line with what it was computed on (see report.coverage)."""
    forced, generated, warning = coverage(result)
    logger.info("test set: %s records", fixed(result["test_records"], 1))
    logger.info("  perplexity %s | token accuracy %s | loss %s   on %s", fixed(result["perplexity"], 4),
                fixed(result["token_accuracy"], 3), fixed(result["loss"], 4), forced)
    logger.info("  EM %s | F1 %s | BLEU-4 %s | ROUGE-L %s   on %s", fixed(result["exact_match"], 3),
                fixed(result["f1"], 3), fixed(result["bleu_4"], 3), fixed(result["rouge_l"], 3), generated)
    if warning:
        logger.warning("  %s", warning)
    for domain, m in sorted(result["per_domain"].items()):
        logger.info("    %-22s perplexity %10s  token accuracy %s  F1 %s  ROUGE-L %s", domain,
                    fixed(m.get("perplexity", float("nan")), 4), fixed(m.get("token_accuracy", float("nan")), 3),
                    fixed(m["f1"], 3), fixed(m["rouge_l"], 3))
    if "deltas" in result:
        d = result["deltas"]
        logger.info("vs baseline %s: perplexity %s, token accuracy %s, F1 %s, ROUGE-L %s", result["baseline"]["model"],
                    _signed(d["perplexity"], 4), _signed(d["token_accuracy"], 3), _signed(d["f1"], 3),
                    _signed(d["rouge_l"], 3))


def _signed(value: float, digits: int) -> str:
    text = fixed(value, digits)
    return text if text.startswith("-") else "+" + text


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    # Not while the run is training (or being evaluated or optimised), and one writer per metrics file.
    locks = lock_outputs("evaluation", reads=[args.model_path], writes=[args.output_file])
    try:
        output = Path(args.output_file)
        remove_stale_temporaries(output.parent, names=[output.name])  # what a killed evaluation left
        return _evaluate_and_write(args)
    finally:
        release_locks(locks)


def _evaluate_and_write(args: argparse.Namespace) -> int:
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the log lines
    result = evaluate_model(args)
    from src.training.report import load_run_facts, verdict
    result["verdict"] = verdict(result, load_run_facts(run_folder(Path(args.model_path))))
    # The metrics first: whatever happens to the report (a plot that cannot be drawn, a full disk), the
    # figures the night produced are on disk.
    atomic_write_json(args.output_file, result)  # atomic, with the umask mode
    log_summary(result)
    logger.info("verdict:")
    for line in result["verdict"]:
        logger.info("  %s", line)
    if not args.no_report:
        report_dir = Path(args.output_file).parent / result["run"]
        try:
            from src.training.report import write_report

            result["report"] = str(write_report(result, run_folder(Path(args.model_path)), report_dir))
        except Exception as err:  # the report is a view of the metrics; losing it must not lose them
            result["report_error"] = f"{type(err).__name__}: {err}"
            logger.error("report not written (%s); the metrics are in %s. Rebuild it with: python -m "
                         "src.training.report --results %s --run_dir %s", result["report_error"], args.output_file,
                         args.output_file, run_folder(Path(args.model_path)) or "models/<run>")
        atomic_write_json(args.output_file, result)  # atomic, with the umask mode
    logger.info("metrics -> %s%s", args.output_file, f"; report -> {result['report']}" if "report" in result else "")
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
