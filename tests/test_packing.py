"""Packed rows (src/training/packing.py) train the same thing as padded batches: on a tiny GPT-2 with dropout
off, the summed target loss, the per-record losses and every parameter's gradient of packed rows (block-diagonal
4-D mask through SDPA and through eager attention; transformers' own position_ids-based packing) agree with the
ordinary right-padded batch to 1e-5.

    .venv/bin/python -m pytest tests/test_packing.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from src.training.lm_loss import IGNORE_INDEX, TargetIndex, final_hidden, head_loss, output_weight
from src.training.packing import next_fit_rows, pack_examples

TOL = dict(rtol=1e-5, atol=1e-5)


def _examples(seed=0, lengths=(9, 5, 12, 3, 7, 10)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "index": 10 + i,
                    "domain": i % 2, "quality": 0.5 + 0.1 * i})
    return out


def _model(attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg).eval()


def _padded(examples):
    """The unpacked oracle: right-padded rows with a 2-D padding mask (what collate makes)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return ids, mask, labels


def _loss_and_grads(model, hidden, labels, record_ids=None, n_records=None):
    tgt = TargetIndex.from_labels(labels, record_ids, n_records)
    out = head_loss(hidden, output_weight(model), tgt, chunk_rows=8)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    return out.loss.detach(), tgt.per_record(out.token_loss), grads


def test_next_fit_keeps_order_and_never_splits():
    assert next_fit_rows([9, 5, 12, 3, 7, 10], 16) == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError, match="record 1 has 20 tokens"):
        next_fit_rows([3, 20], 16)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_match_padded(attn):
    examples = _examples()
    model = _model(attn)
    ids, mask, labels = _padded(examples)
    ref_loss, ref_rec, ref_g = _loss_and_grads(model, final_hidden(model, input_ids=ids, attention_mask=mask), labels)

    packed = pack_examples(examples, max_length=16, pad_id=0)
    assert packed.input_ids.shape[0] == 4 and packed.n_records == 6 and sum(map(sum, packed.lengths)) == 46
    assert packed.position_ids[0, :9].tolist() == list(range(9)) and packed.position_ids[0, 9:14].tolist() == list(range(5))
    hidden = final_hidden(model, **packed.model_inputs(attn))
    loss, rec, grads = _loss_and_grads(model, hidden, packed.labels, packed.record_ids, packed.n_records)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(rec, ref_rec, **TOL)  # record k of the packed batch is example k
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b, **TOL)
    assert packed.per_record["index"].tolist() == [10, 11, 12, 13, 14, 15]


def test_position_ids_packing_of_transformers_matches_padded():
    """One flat row, no mask: transformers infers the record boundaries from the restarting position ids (only
    without a cache: with use_cache on, as in eval mode by default, it does not look, and records see each other)."""
    examples = _examples(seed=1)
    model = _model("sdpa")
    ids, mask, labels = _padded(examples)
    ref_loss, ref_rec, ref_g = _loss_and_grads(model, final_hidden(model, input_ids=ids, attention_mask=mask), labels)
    flat = pack_examples(examples, max_length=16, pad_id=0).flat()
    assert flat.input_ids.shape == (1, 46)
    hidden = final_hidden(model, input_ids=flat.input_ids, position_ids=flat.position_ids, use_cache=False)
    loss, rec, grads = _loss_and_grads(model, hidden, flat.labels, flat.record_ids, flat.n_records)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(rec, ref_rec, **TOL)
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b, **TOL)
    kw = flat.flash_kwargs()
    assert kw["cu_seq_lens_q"].tolist() == [0, 9, 14, 26, 29, 36, 46] and kw["max_length_q"] == 12


def test_packed_step_losses_match_padded_batch_with_weights_and_rdrop():
    """The loop's step loss on a packed batch (pack_batch) equals it on the padded batch: weighted sums,
    per-record means, R-Drop's KL (two passes: dropout off, so the KL is 0 on both) and the gradients."""
    import functools

    from src.training.lm_loss import step_losses
    from src.training.packing import pack_batch
    from src.training.train_enhanced import rdrop_step_losses

    examples = _examples(seed=2)
    model = _model("sdpa")
    ids, mask, labels = _padded(examples)
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(6)}
    w = torch.tensor([1.0, 0.5, 0.25, 2.0, 1.5, 0.75])
    packed = pack_batch(padded, max_length=16, pad_id=0)
    assert packed["input_ids"].shape[0] < ids.shape[0] and packed["attention_mask"].dim() == 4
    params = list(model.parameters())
    per_record = lambda out: out["targets"].per_record(out["token_loss"]) / out["targets"].counts()  # noqa: E731
    for loss in (step_losses, functools.partial(rdrop_step_losses, alpha=0.5, doubled=True)):
        ref = loss(model, padded, w, smoothing=0.1)
        got = loss(model, packed, w, smoothing=0.1)
        torch.testing.assert_close(got["loss_sum"], ref["loss_sum"], **TOL)
        torch.testing.assert_close(per_record(got), per_record(ref), **TOL)
        for a, b in zip(torch.autograd.grad(got["loss_sum"], params), torch.autograd.grad(ref["loss_sum"], params)):
            torch.testing.assert_close(a, b, **TOL)


# --- the trainer's --packing and --compile ----------------------------------------------------------------------

def test_compile_default_only_on_long_cuda_runs_never_on_windows():
    from src.training import train_enhanced as te

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    n = te.COMPILE_MIN_STEPS
    assert te.compile_wanted(None, cuda, n + 1, "linux") and not te.compile_wanted(None, cuda, n, "linux")
    assert not te.compile_wanted(None, cpu, 100 * n, "linux")
    assert not te.compile_wanted(None, cuda, 100 * n, "win32")
    assert te.compile_wanted(True, cpu, 5, "linux") and not te.compile_wanted(False, cuda, 100 * n, "linux")


def test_packing_with_the_contrastive_loss_is_refused_naming_both(capsys):
    from src.training import train_enhanced as te

    with pytest.raises(SystemExit):
        te.parse_args(["--packing", "--use_code_contrastive"])
    err = capsys.readouterr().err
    assert "--packing" in err and "--use_code_contrastive" in err


def test_packed_training_run_ends_at_the_unpacked_run_weights(tmp_path, tiny_datasets_dir, prepared_data):
    """Two steps of train() with and without --packing (dropout off): the same weights to 1e-5."""
    from safetensors.torch import load_file

    from src.model.theta_model import build_tiny_model
    from src.training import train_enhanced as te

    model = build_tiny_model(tmp_path / "nodrop", tiny_datasets_dir, n_layer=2, n_embd=64, n_head=2,
                             n_positions=256, vocab_size=384, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    for name, extra in (("plain", []), ("packed", ["--packing"])):
        te.train(te.parse_args(["--model_name", str(model), "--data_path", str(prepared_data), "--output_dir",
                                str(tmp_path / name), "--epochs", "1", "--max_steps", "2", "--batch_size", "6",
                                "--learning_rate", "3e-3", "--max_length", "64", "--num_samples", "0",
                                "--domain_eval_frequency", "0", "--no_progress_bar", "--seed", "3", *extra]))
    a, b = (load_file(str(tmp_path / n / "theta_final" / "model.safetensors")) for n in ("plain", "packed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert "packing on (rows of 64)" in (tmp_path / "packed" / "train.log").read_text()


def _compiled_matches_eager(tmp_path, tiny_datasets_dir, prepared_data):
    from safetensors.torch import load_file

    from src.model.theta_model import build_tiny_model
    from src.training import train_enhanced as te

    model = build_tiny_model(tmp_path / "nodrop", tiny_datasets_dir, n_layer=2, n_embd=64, n_head=2,
                             n_positions=256, vocab_size=384, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    for name, extra in (("eager", ["--no_compile"]), ("compiled", ["--compile"])):
        te.train(te.parse_args(["--model_name", str(model), "--data_path", str(prepared_data), "--output_dir",
                                str(tmp_path / name), "--epochs", "1", "--max_steps", "2", "--batch_size", "4",
                                "--learning_rate", "3e-3", "--max_length", "64", "--num_samples", "0",
                                "--domain_eval_frequency", "0", "--no_progress_bar", "--seed", "3", *extra]))
    a, b = (load_file(str(tmp_path / n / "theta_final" / "model.safetensors")) for n in ("eager", "compiled"))
    for k in a:  # fused kernels round differently: measured 2.6e-5 at most after two Adam steps at lr 3e-3
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    assert "torch.compile: first forward" in (tmp_path / "compiled" / "train.log").read_text()


@pytest.mark.skipif(os.environ.get("THETA_COMPILE_TEST") != "1",
                    reason="torch.compile's first CPU step takes about a minute; THETA_COMPILE_TEST=1 runs it")
def test_compiled_training_matches_eager(tmp_path, tiny_datasets_dir, prepared_data):
    """The real thing: inductor generates and compiles C++ kernels for this CPU."""
    _compiled_matches_eager(tmp_path, tiny_datasets_dir, prepared_data)


def test_compiled_training_path_matches_eager_with_the_aot_eager_backend(tmp_path, tiny_datasets_dir, prepared_data,
                                                                         monkeypatch):
    """The same check in every suite run, in seconds: our --compile wiring (the compiled module beside the
    model, dynamic shapes, the first call timed and logged, saving and validation on the plain module) with
    torch.compile's graph capture and AOTAutograd, but without inductor's C++ code generation."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _compiled_matches_eager(tmp_path, tiny_datasets_dir, prepared_data)
