"""Each training technique against an independent computation, and all of them together through a resume."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from full_logits import full_logits_rdrop, full_logits_token_losses
from helpers import loss_setup
from recipe_harness.common import TECHNIQUE_FLAGS
import src.training.train_enhanced as te


def _toy_model(n_layer=2, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, n_positions=32, vocab_size=50,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


# --- EMA ---------------------------------------------------------------------------------------------------------

def test_ema_matches_swa_utils_oracle():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _toy_model()
    ema = te.ExponentialMovingAverage(model, decay=0.9, warmup_epochs=1)
    oracle = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(12):
        epoch = step // 4
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        if ema.maybe_start(model, epoch):  # after one epoch: start from the weights of now...
            oracle.update_parameters(model)  # ...as the oracle's first update copies them
            assert step == 4
        elif ema.active:
            ema.update(model)
            oracle.update_parameters(model)
    shadow = dict(zip(ema.names, ema.shadow))
    for name, p in oracle.module.named_parameters():
        assert torch.allclose(shadow[name], p, atol=1e-6), name


def test_ema_applied_swaps_in_and_restores():
    model = _toy_model()
    ema = te.ExponentialMovingAverage(model, decay=0.5)
    ema.start(model)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # shadow = 0.5 raw + 0.5 (raw + 1) = raw + 0.5
    with ema.applied(model):
        for n, p in model.named_parameters():
            assert torch.allclose(p, raw[n] + 0.5)
    for n, p in model.named_parameters():
        assert torch.allclose(p, raw[n] + 1.0)
    state = ema.state_dict()
    other = te.ExponentialMovingAverage(model, decay=0.5)
    other.load_state_dict(state, model)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    warm = te.ExponentialMovingAverage(model, decay=0.999, decay_warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


# --- label smoothing and quality weighting ----------------------------------------------------------------------

def _lm_batch():
    """Three records of a toy vocabulary: a prompt (labels -100), one padded, as collate makes them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels[2, 7:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "quality": torch.tensor([1.0, 0.2, 0.6]),
            "index": torch.arange(3), "has_code": torch.zeros(3, dtype=torch.bool), "domain": torch.zeros(3).long()}


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.2])
def test_label_smoothing_matches_torch_cross_entropy(eps):
    """The trainer's loss with --use_label_smoothing (the recipe's one module) against F.cross_entropy over the
    model's full logits with label_smoothing=eps."""
    model = _toy_model(dropout=0.0).eval()
    batch = _lm_batch()
    setup = loss_setup("--use_label_smoothing", "--label_smoothing_epsilon", str(eps))
    out = te.TrainModule(model, setup)(batch, setup.record_weights(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    oracle = F.cross_entropy(logits[:, :-1].reshape(-1, 50), batch["labels"][:, 1:].reshape(-1), label_smoothing=eps,
                             ignore_index=-100)
    assert float(out["loss_sum"]) / setup.normaliser([batch]) == pytest.approx(float(oracle), rel=1e-5)


def test_quality_weighting_multiplies_the_smoothed_per_record_loss():
    setup = loss_setup("--use_label_smoothing", "--label_smoothing_epsilon", "0.1", "--use_quality_weighting",
                       "--quality_weighting_floor", "0.5")
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "quality": torch.tensor([1.0, 0.2]),
             "labels": torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, -100, -100]])}
    w = setup.record_weights(batch)
    assert w.tolist() == pytest.approx([1.0, 0.6])
    assert setup.normaliser([batch]) == pytest.approx(3 * 1.0 + 1 * 0.6)  # shifted target tokens x weight
    assert te.LossSetup().normaliser([batch]) == 4
    model = _toy_model(dropout=0.0).eval()  # and the loss: each record's smoothed token losses x its weight
    full = _lm_batch()
    out = te.TrainModule(model, setup)(full, setup.record_weights(full))
    tok, mask = full_logits_token_losses(model(input_ids=full["input_ids"],
                                               attention_mask=full["attention_mask"]).logits, full["labels"], 0.1)
    weights = 0.5 + 0.5 * full["quality"]
    assert float(out["loss_sum"]) == pytest.approx(float((tok * mask * weights[:, None]).sum()), rel=1e-5)


# --- R-Drop ------------------------------------------------------------------------------------------------------

def _rdrop(model, batch, alpha, doubled=True):
    """R-Drop's step loss as the trainer computes it: its sums, and its KL and CE as means over the targets."""
    ones = torch.ones(batch["input_ids"].shape[0])
    out = te.rdrop_step_losses(model, batch, ones, alpha=alpha, doubled=doubled)
    n = len(out["targets"])
    return {"total": float(out["loss_sum"]) / n, "kl": float(out["sums"]["kl"]) / n}


def test_rdrop_kl_is_zero_without_dropout_and_forms_agree():
    model = _toy_model(dropout=0.1)
    batch = _lm_batch()
    model.eval()  # dropout off
    a = _rdrop(model, batch, alpha=1.0, doubled=True)
    b = _rdrop(model, batch, alpha=1.0, doubled=False)
    assert a["kl"] == pytest.approx(0.0, abs=1e-6) and b["kl"] == pytest.approx(0.0, abs=1e-6)
    assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    plain, pmask = full_logits_token_losses(model(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert a["total"] == pytest.approx(float(plain.detach().sum() / pmask.sum()), rel=1e-5)  # KL 0: the plain CE


def test_rdrop_total_is_ce_plus_alpha_kl_with_dropout():
    model = _toy_model(dropout=0.3)
    model.train()
    batch = _lm_batch()
    torch.manual_seed(3)
    out = _rdrop(model, batch, alpha=0.5)
    torch.manual_seed(3)  # the oracle draws the same two dropout masks
    oracle = full_logits_rdrop(model, batch["input_ids"], batch["attention_mask"], batch["labels"], alpha=0.5)
    assert out["kl"] > 1e-4 and out["kl"] == pytest.approx(float(oracle["kl"]), rel=1e-4)
    assert out["total"] == pytest.approx(float(oracle["ce"] + 0.5 * oracle["kl"]), rel=1e-5)
    assert float(oracle["token_loss"][~oracle["mask"]].abs().sum()) == 0.0


# --- LLRD --------------------------------------------------------------------------------------------------------

def test_llrd_table_for_a_four_layer_model():
    model = _toy_model(n_layer=4)
    groups = te.get_llrd_optimizer_groups(model, llrd_factor=0.5, weight_decay=0.01)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["names"]}
    decay_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    expected = {"transformer.wte.weight": 1.0, "transformer.ln_f.weight": 1.0, "transformer.ln_f.bias": 1.0,
                "transformer.h.3.attn.c_attn.weight": 1.0, "transformer.h.2.attn.c_attn.weight": 0.5,
                "transformer.h.1.mlp.c_fc.weight": 0.25, "transformer.h.0.ln_1.weight": 0.125,
                "transformer.h.0.mlp.c_proj.bias": 0.125, "transformer.wpe.weight": 0.0625}
    for name, scale in expected.items():
        assert scale_of[name] == scale, name
    assert decay_of["transformer.h.0.mlp.c_proj.bias"] == 0.0 and decay_of["transformer.h.0.ln_1.weight"] == 0.0
    assert decay_of["transformer.h.2.attn.c_attn.weight"] == 0.01
    assert set(scale_of) == {n for n, _ in model.named_parameters()}  # every parameter once (lm_head is tied)
    # the scheduler honours lr_scale, and the log reports the head's rate
    args = te.parse_args(["--use_llrd", "--llrd_factor", "0.5", "--learning_rate", "1e-3", "--warmup_proportion", "0"])
    opt = te.build_optimizer(model, args, te.techniques_on(args))
    sched = te.build_scheduler(opt, args, total_steps=10)
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert len(rates) == len(opt.param_groups)  # every group named apart
    assert te.output_lr(opt, model) == pytest.approx(1e-3)
    assert min(rates.values()) == pytest.approx(1e-3 * 0.0625)
    sched.step()
    assert te.output_lr(opt, model) == pytest.approx(1e-3 * (0.5 * (1 + math.cos(math.pi * 1 / 10))))


# --- gradient noise -----------------------------------------------------------------------------------------------

def test_gradient_noise_variance_and_seed():
    p = torch.nn.Parameter(torch.zeros(200_000))
    p.grad = torch.zeros_like(p)
    std = te.add_gradient_noise([p], step=9, eta=0.3, generator=torch.Generator().manual_seed(0))
    assert std == pytest.approx(math.sqrt(0.3 / 10 ** 0.55))
    assert float(p.grad.std()) == pytest.approx(std, rel=0.02)
    q = torch.nn.Parameter(torch.zeros(200_000))
    q.grad = torch.zeros_like(q)
    te.add_gradient_noise([q], step=9, eta=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.grad, q.grad)


# --- CPU offload ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_cpu_offload_updates_equal_plain_adamw(fraction):
    a, b = _toy_model(seed=5), _toy_model(seed=5)
    args = te.parse_args(["--use_llrd", "--llrd_factor", "0.8", "--learning_rate", "1e-2", "--weight_decay", "0.1"])
    llrd = te.techniques_on(args)
    plain = torch.optim.AdamW(te.build_param_groups(a, args, llrd), lr=1e-2, foreach=False)
    offload = te.CPUOffloadOptimizer(te.build_param_groups(b, args, llrd), fraction=fraction, lr=1e-2)
    for opt in (plain, offload):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_scale"]
    assert offload.offloaded_fraction == pytest.approx(fraction, abs=0.35)
    for step in range(5):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in a.parameters()]
        for model, g in ((a, grads), (b, grads)):
            for p, gr in zip(model.parameters(), g):
                p.grad = gr.clone()
        plain.step()
        offload.step()  # a plain step() for the caller: the host copies are its own business
        offload.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n
    # state round trip
    again = te.CPUOffloadOptimizer(te.build_param_groups(b, args, llrd), fraction=fraction, lr=1e-2)
    again.load_state_dict(offload.state_dict())
    assert all(torch.equal(x, y) for xs, ys in zip(again.masters, offload.masters) for x, y in zip(xs, ys))


def test_cpu_offload_refuses_fp16():
    with pytest.raises(SystemExit):
        te.parse_args(["--use_cpu_offload", "--precision", "fp16"])


# --- code-contrastive loss ---------------------------------------------------------------------------------------

def test_code_contrastive_loss_learns_to_match_pairs():
    torch.manual_seed(0)
    B, T, C = 6, 8, 16
    hidden = torch.randn(B, T, C)
    labels = torch.full((B, T), -100)
    labels[:, 4:] = 1  # question = first 4 tokens, answer = last 4
    attn = torch.ones(B, T, dtype=torch.long)
    # each record's answer states share a record-specific direction with its question states
    hidden[:, 4:] += hidden[:, :4].mean(1, keepdim=True) * 2
    loss_fn = te.CodeContrastiveLoss(C, projection_size=8, temperature=0.1, scope="all")
    has_code, index = torch.ones(B, dtype=torch.bool), torch.arange(B)
    q, a = loss_fn.pooled(hidden, labels, attn)
    bank = {"q": q, "a": a, "index": index}  # the others' vectors as negatives; each record's own is masked out
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    first = float(loss_fn(hidden, labels, attn, has_code, index, bank)["loss_sum"])
    for _ in range(30):
        loss = loss_fn(hidden, labels, attn, has_code, index, bank)["loss_sum"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first
    with torch.no_grad():
        sim = loss_fn.similarity(q, a)
    matched = sim.diag().mean()
    shuffled = sim[torch.arange(B), torch.roll(torch.arange(B), 1)].mean()
    assert matched > shuffled
    # by hand for record 0: -log softmax over [own pair, the 5 others' answers] and the same from the answer side
    with torch.no_grad():
        zq, za = loss_fn.project(q), loss_fn.project(a)
        row = torch.cat([(zq[0] @ za[0:1].T), zq[0] @ za[1:].T]) / 0.1
        col = torch.cat([(za[0] @ zq[0:1].T), za[0] @ zq[1:].T]) / 0.1
        by_hand = 0.5 * (-(row.log_softmax(0)[0]) - col.log_softmax(0)[0])
        one = loss_fn(hidden[:1], labels[:1], attn[:1], has_code[:1], index[:1], bank)["loss_sum"]
    assert float(one) == pytest.approx(float(by_hand), rel=1e-4, abs=1e-6)
    # scope "code": only records with code take part; an empty bank (the first step) gives exactly 0
    only_one = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    out = te.CodeContrastiveLoss(C, scope="code")(hidden, labels, attn, only_one, index, None)
    assert float(out["loss_sum"]) == 0.0 and out["q"].shape == (1, C)


# --- samplers -----------------------------------------------------------------------------------------------------

def test_curriculum_pool_grows_from_the_easiest():
    diffs = [5, 1, 3, 1, 2, 4, 2, 5, 3, 1]
    ids = [f"r{i}" for i in range(10)]
    cur = te.CurriculumSampler(diffs, ids, start_fraction=0.4, epochs=4, full_at=0.5, pacing="linear")
    assert [cur.fraction(e) for e in range(4)] == pytest.approx([0.4, 0.7, 1.0, 1.0])
    assert sorted(diffs[i] for i in cur.pool(0)) == [1, 1, 1, 2]
    assert len(cur.pool(1)) == 7 and len(cur.pool(2)) == 10
    root = te.CurriculumSampler(diffs, ids, 0.4, 4, 0.5, "root")
    assert root.fraction(1) == pytest.approx(0.4 + 0.6 * math.sqrt(0.5))
    step = te.CurriculumSampler(diffs, ids, 0.4, 8, 0.5, "step")
    assert [step.fraction(e) for e in (0, 1, 2, 3, 4)] == pytest.approx([0.4, 0.4, 0.7, 0.7, 1.0])


def test_dynamic_tracker_weights_and_weighted_draws():
    tracker = te.DynamicCurriculumTracker(4, warmup_epochs=1, momentum=0.5, min_weight=0.5, max_weight=2.0)
    tracker.update([0, 1, 2, 3], [1.0, 2.0, 4.0, 10.0])
    tracker.update([3], [2.0])  # running average: 0.5 * 10 + 0.5 * 2 = 6
    assert tracker.weights(0).tolist() == [1, 1, 1, 1]  # warmup: uniform
    # median of [1, 2, 4, 6] = 3 -> 1/3, 2/3, 4/3, 2 (clipped to [0.5, 2])
    assert tracker.weights(1).tolist() == pytest.approx([0.5, 2 / 3, 4 / 3, 2.0])
    draws = Counter()
    sampler = te.WeightedRecordSampler(None, [tracker])
    for seed in range(300):
        draws.update(sampler.draw([0, 1, 2, 3], 1, torch.Generator().manual_seed(seed)))
    total = sum(draws.values())
    expected = np.array([0.5, 2 / 3, 4 / 3, 2.0]) / (0.5 + 2 / 3 + 4 / 3 + 2.0)
    assert np.allclose([draws[i] / total for i in range(4)], expected, atol=0.02)
    assert tracker.difficult_ratio() == pytest.approx(0.25)  # only 6 is above 1.5 x 3


def test_domain_stratified_batches_follow_the_mix():
    domains = [0] * 60 + [1] * 30 + [2] * 10
    strat = te.DomainStratifiedSampler(domains, {0: 1, 1: 1, 2: 2})
    order = strat.arrange(list(range(100)), batch_size=8)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    for b in batches:
        counts = Counter(domains[i] for i in b)
        assert counts[0] == 2 and counts[1] == 2 and counts[2] == 4
    uniform = te.DomainStratifiedSampler(domains).arrange(list(range(100)), batch_size=6)
    assert Counter(domains[i] for i in uniform) == {0: 32, 1: 32, 2: 32}  # small domains repeat


def test_training_sampler_composes_and_shards_like_one_process():
    n = 40
    diffs = [i % 5 + 1 for i in range(n)]
    ids = [f"r{i}" for i in range(n)]
    domains = [i % 4 for i in range(n)]

    def make(rank, world, batch):
        return te.TrainingSampler(n, batch, seed=7, rank=rank, world=world,
                                  parts=[te.CurriculumSampler(diffs, ids, 0.5, 4), te.DomainStratifiedSampler(domains)])
    one = make(0, 1, 4)
    pool = set(one.pool(0))
    assert all(i in pool for b in one.batches(0) for i in b)  # the curriculum picks the pool
    assert len(one.batches(0)) == one.num_batches(0) == 5
    for b in one.batches(0):
        assert sorted(Counter(domains[i] for i in b).values()) == [1, 1, 1, 1]  # stratification shapes batches
    r0, r1 = make(0, 2, 2), make(1, 2, 2)
    for g, (a, b) in zip(one.batches(2), zip(r0.batches(2), r1.batches(2))):
        assert sorted(g) == sorted(a + b)  # DDP ranks together see the same global batch
    assert one.batches(3) == make(0, 1, 4).batches(3)  # deterministic per (seed, epoch)


# --- validation metrics -------------------------------------------------------------------------------------------

def test_generation_scores_by_hand():
    s = te.GenerationCheck.score_answer("What does a firewall filter?",
                                          "A firewall filters network traffic using rules.",
                                          "A firewall filters traffic traffic traffic")
    assert s["length"] == 6
    assert s["distinct_2"] == pytest.approx(4 / 5)  # bigrams: a-firewall, firewall-filters, filters-traffic, traffic-traffic x2
    assert s["keyword_recall"] == pytest.approx(3 / 6)  # firewall, filters, traffic of 6 reference words
    assert s["coherence"] == pytest.approx(2 * 1 / 4)  # "firewall" of {what, does, firewall, filter}, x2


def test_domain_check_scores_equal_one_question_at_a_time(tiny_model_dir):
    """Oracle: each chosen question answered alone (generate_with_stats) and scored by hand's function; the
    check answers them in one batch, and must pick the same questions and give the same means."""
    from src.model.theta_model import ThetaModel

    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    recs = [{"domain": d, "question": q, "answer": a} for d, q, a in [
        ("networking", "What does a firewall filter?", "A firewall filters network traffic by rules."),
        ("programming", "How do I reverse a list in Python?", "Use reversed() or slicing with a step of -1."),
        ("networking", "What is DNS?", "DNS maps host names to addresses."),
        ("networking", "What is a subnet mask used for?", "It splits an address into network and host parts."),
        ("programming", "Was ist eine Liste?", "Eine geordnete Folge von Werten.")]]
    out = te.GenerationCheck(per_domain=2, max_new_tokens=12).run(tm, recs)
    for domain, chosen in (("networking", recs[0:3:2]), ("programming", [recs[1], recs[4]])):
        scores = [te.GenerationCheck.score_answer(r["question"], r["answer"], tm.generate_with_stats(
            r["question"], max_length=12, temperature=0.0)["text"]) for r in chosen]
        for key in ("length", "distinct_2", "keyword_recall", "pair_f1", "coherence", "reference_match"):
            assert out[domain][key] == pytest.approx(float(np.mean([s[key] for s in scores]))), (domain, key)
    assert sorted(out) == ["networking", "programming"]


# --- everything together ------------------------------------------------------------------------------------------

# Every technique at the interaction matrix's settings (the one table, recipe_harness/common.py), contrastive on
# every record, and the generation check each epoch.
ALL_ON = [flag for flags in TECHNIQUE_FLAGS.values() for flag in flags] + [
    "--code_contrastive_scope", "all", "--domain_eval_frequency", "1", "--domain_eval_per_domain", "1"]


def _args(model_dir, data, out, *extra):
    return te.parse_args(["--model_name", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
                          "--epochs", "3", "--batch_size", "4", "--learning_rate", "3e-3", "--max_length", "96",
                          "--num_samples", "0", "--seed", "3", "--no_progress_bar", *ALL_ON, *extra])


def test_all_techniques_resume_equals_uninterrupted(tmp_path, tiny_model_dir, prepared_data):
    full = te.train(_args(tiny_model_dir, prepared_data, tmp_path / "full"))
    assert full["exit_code"] == 0 and full["ema_weights"]
    log = (tmp_path / "full" / "train.log").read_text()
    for line in ("EMA: decay 0.8", "label smoothing", "R-Drop", "LLRD", "gradient noise", "CPU offload",
                 "code-contrastive", "curriculum:", "dynamic curriculum", "domain stratification"):
        assert line in log, line
    history = json.loads((tmp_path / "full" / "loss_history.json").read_text())
    assert history[-1]["ema"]["active"] and history[0]["curriculum_fraction"] < 1.0
    assert history[-1]["train_kl"] > 0 and "domain_eval" in history[-1]
    run = tmp_path / "resumed"
    stop = str(history[0]["step"] + 3)  # mid-epoch 2: after the EMA has started and the tracker has weights
    first = te.train(_args(tiny_model_dir, prepared_data, run, "--stop_after_step", stop))
    assert first["exit_code"] == te.EXIT_INTERRUPTED
    second = te.train(_args(tiny_model_dir, prepared_data, run, "--stop_after_step", stop))
    assert second["global_step"] == full["global_step"]
    a = load_file(str(tmp_path / "full" / "theta_final" / "model.safetensors"))
    b = load_file(str(run / "theta_final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_length_grouping_keeps_records_and_mix_and_cuts_padding():
    rng = np.random.default_rng(0)
    n = 96
    lengths = rng.integers(10, 400, n).tolist()
    domains = [i % 3 for i in range(n)]

    def make(group):
        return te.TrainingSampler(n, 4, seed=1, parts=[te.DomainStratifiedSampler(domains)],
                                  lengths=lengths if group else None, group_chunk=8)
    plain, grouped = make(False).batches(0), make(True).batches(0)
    assert sorted(i for b in plain for i in b) == sorted(i for b in grouped for i in b)  # same records

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(grouped) < 0.5 * padding(plain)
    for b in grouped:  # the domain mix of every batch survives the regrouping
        assert sorted(Counter(domains[i] for i in b).values()) == sorted(Counter(domains[i] for i in plain[0]).values())
    # grouping works on whole optimizer steps: batch 4 x 1 and batch 2 x 2 see the same records per step
    one = te.TrainingSampler(n, 4, seed=1, lengths=lengths).batches(0)
    two = te.TrainingSampler(n, 2, seed=1, lengths=lengths, accumulation=2).batches(0)
    assert [sorted(b) for b in one] == [sorted(two[2 * k] + two[2 * k + 1]) for k in range(len(one))]


def test_length_grouping_keeps_batches_on_unit_boundaries_when_records_do_not_fill_the_last_one():
    """23 records of lengths 0..22 at batch 4, one chunk: the grouped batches must be runs of consecutive
    lengths ({0..3}, {4..7}, ...; the 3 longest last). A short unit shuffled into the middle used to shift
    every later batch by its shortfall, so each straddled two groups (padding 2.7% -> 8.2% on the sample data)."""
    perm = np.random.default_rng(3).permutation(23).tolist()
    for seed in range(5):
        batches = te.TrainingSampler(23, 4, seed=seed, lengths=perm, group_chunk=100).batches(0)
        groups = sorted(sorted(perm[i] for i in b) for b in batches)
        assert groups == [list(range(k, min(k + 4, 23))) for k in range(0, 23, 4)], seed
        assert sorted(perm[i] for i in batches[-1]) == [20, 21, 22]  # the short unit stays last
