"""Domain balance as per-record sampling weights (the default), or materialised on disk behind explicit flags.

    from src.data_processing.balancing import balance_domains
    records, report = balance_domains(records, max_fraction=0.3, min_count=100)   # sets sample_weight

What: the wanted mix comes from three rules, applied to the training records' real counts n_d (N in all):
1. ``target`` (domain -> weight): the listed domains share their combined size in those proportions;
2. floor ``min_count``: a smaller domain is raised towards that many draws per epoch, at most ``max_repeats`` x n_d;
3. cap ``max_fraction``: no domain above that share; the surplus goes to the others in proportion (water-filling).
   With D domains a cap under 1/D is impossible; 1/D is used and the report says so.
By weights (default): every training record of domain d gets ``sample_weight = share_d * N / n_d``, clipped to
``max_repeats``; the trainer draws records in proportion to it, so no real record is deleted or copied and the
mean weight is 1. Validation records keep weight 1.0: validation measures the data as it is.
Materialised (``materialise=True``): the cap is computed once from the real totals (``floor(cap * N)``, never
below what D allows) and surplus records are dropped (``domain_cap``, real before synthetic, best quality first);
small domains get synthetic examples then marked repeats, each record repeated at most ``max_repeats`` times, and
synthetic plus repeated records never exceed ``synthetic_ratio`` of the output.
Sharp edge: weights change how often a record is drawn, not what an epoch is; a weight of 3 means drawn about
three times as often as an unweighted record.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict

logger = logging.getLogger(__name__)
EPS = 1e-12


def effective_cap(max_fraction: float, n_domains: int) -> tuple[float, str | None]:
    """The cap that can hold with ``n_domains`` domains, and a note when the asked one cannot (one domain: no
    cap and no note, there is nothing to balance)."""
    if max_fraction >= 1 or n_domains <= 1:
        return 1.0, None
    floor = 1.0 / n_domains
    if max_fraction < floor - EPS:
        return floor, (f"--max_domain_fraction {max_fraction} is impossible with {n_domains} domains (each would "
                       f"have to be under 1/{n_domains}); used {floor:.4f}, which makes them equal")
    return max_fraction, None


def water_fill(amounts: dict[str, float], cap: float) -> dict[str, float]:
    """Shares proportional to ``amounts`` with none above ``cap``: capped domains sit at the cap and the rest
    share what is left in proportion (exact, at most D rounds)."""
    shares: dict[str, float] = {}
    free = {d: a for d, a in amounts.items() if a > 0}
    room = 1.0
    while free:
        total = sum(free.values())
        over = {d for d, a in free.items() if a / total * room > cap + EPS}
        if not over:
            shares.update({d: a / total * room for d, a in free.items()})
            break
        for d in over:
            shares[d] = cap
            room -= cap
            del free[d]
    return {d: shares.get(d, 0.0) for d in amounts}


def wanted_mix(counts: dict[str, int], max_fraction: float, min_count: int, target: dict[str, float] | None,
               max_repeats: float) -> tuple[dict[str, float], list[str]]:
    """Target share per domain (they sum to 1) and notes on what could not be done exactly."""
    notes: list[str] = []
    wanted = {d: float(n) for d, n in counts.items()}
    if target:
        listed = {d: w for d, w in target.items() if w > 0 and d in counts}
        missing = sorted(d for d, w in target.items() if w > 0 and d not in counts)
        if missing:
            notes.append(f"--target_distribution names domains without training records: {', '.join(missing)}")
        total_listed = sum(counts[d] for d in listed)
        weight_sum = sum(listed.values())
        for d, w in listed.items():
            wanted[d] = w / weight_sum * total_listed
    if min_count > 0:
        for d, n in counts.items():
            if wanted[d] < min_count:
                bounded = min(min_count, max_repeats * n)
                if bounded < min_count:
                    notes.append(f"{d}: floor {min_count} bounded to {bounded:g} draws ({n} records x "
                                 f"--max_repeats {max_repeats:g})")
                wanted[d] = max(wanted[d], bounded)
    cap, note = effective_cap(max_fraction, len(counts))
    if note:
        notes.append(note)
    return water_fill(wanted, cap), notes


def _rank_for_keeping(rec: dict) -> tuple:
    """Records a cap keeps first: real before synthetic, higher quality, then id (deterministic)."""
    return (bool(rec.get("synthetic")), -rec.get("quality_score", 0.0), rec["id"])


def _repeats(pool: list[dict], n: int, max_repeats: int, counter: Counter) -> list[dict]:
    """Up to ``n`` marked copies of ``pool`` records, best first, cycling, each at most ``max_repeats`` times."""
    pool = sorted(pool, key=_rank_for_keeping)
    n = min(n, len(pool) * max_repeats)
    out = []
    for k in range(n):
        origin = pool[k % len(pool)]
        counter[origin["id"]] += 1
        copy = {**origin, "id": f"{origin['id']}~rep{counter[origin['id']]}", "synthetic": True,
                "origin": origin["id"], "augmentation": "repeat", "sample_weight": 1.0}
        copy.pop("origins", None)
        out.append(copy)
    return out


def _shares(counter: Counter) -> dict[str, float]:
    total = sum(counter.values()) or 1
    return {d: round(n / total, 4) for d, n in sorted(counter.items())}


def apply_weights(records: list[dict], shares: dict[str, float], counts: dict[str, int],
                  max_repeats: float) -> tuple[dict[str, float], list[str]]:
    """Set ``sample_weight`` on every record; returns the weight per domain and clipping notes."""
    total = sum(counts.values())
    weights, notes = {}, []
    for d, n in counts.items():
        w = shares[d] * total / n if n else 1.0
        if w > max_repeats:
            notes.append(f"{d}: weight {w:.3f} clipped to --max_repeats {max_repeats:g}")
            w = max_repeats
        weights[d] = round(w, 6)
    for rec in records:
        rec["sample_weight"] = weights.get(rec["domain"], 1.0) if rec.get("split", "train") == "train" else 1.0
    return weights, notes


def balance_domains(records: list[dict], max_fraction: float = 1.0, min_count: int = 0,
                    target: dict[str, float] | None = None, seed: int = 42, allow_synthetic: bool = True,
                    drops=None, augmenter=None, materialise: bool = False, max_repeats: float = 3.0,
                    synthetic_ratio: float = 0.1) -> tuple[list[dict], dict]:
    """Balance the domains of ``records`` (see the module docstring); returns the records and a report with the
    mix before and after, the per-domain weights or additions/removals, and notes."""
    train = [r for r in records if r.get("split", "train") == "train"]
    train_counts = Counter(r["domain"] for r in train)
    shares, notes = wanted_mix(dict(train_counts), max_fraction, min_count, target, max_repeats)
    report = {"method": "materialised" if materialise else "weights",
              "before": dict(sorted(Counter(r["domain"] for r in records).items())),
              "train_before": dict(sorted(train_counts.items())), "share_before": _shares(train_counts),
              "share_wanted": {d: round(s, 4) for d, s in sorted(shares.items())},
              "settings": {"max_domain_fraction": max_fraction, "min_domain_count": min_count, "target": target,
                           "max_repeats": max_repeats, "materialise": materialise}}
    if not train_counts:  # nothing to balance (every record is in validation)
        for rec in records:
            rec["sample_weight"] = 1.0
        report.update(after=report["before"], share_after={}, weights={}, capped={}, synthetic_added={},
                      repeated_added={}, notes=notes)
        return records, report
    if not materialise:
        weights, clip_notes = apply_weights(records, shares, dict(train_counts), max_repeats)
        drawn = {d: weights[d] * n for d, n in train_counts.items()}
        total = sum(drawn.values())
        report.update(after=report["before"], weights=dict(sorted(weights.items())),
                      share_after={d: round(v / total, 4) for d, v in sorted(drawn.items())},
                      capped={}, synthetic_added={}, repeated_added={}, notes=notes + clip_notes)
        return records, report
    out, extra = _materialise(records, train_counts, shares, max_fraction, min_count, target, seed,
                              allow_synthetic, drops, augmenter, max_repeats, synthetic_ratio)
    for rec in out:
        rec["sample_weight"] = 1.0
    after_train = Counter(r["domain"] for r in out if r.get("split", "train") == "train")
    report.update(after=dict(sorted(Counter(r["domain"] for r in out).items())), share_after=_shares(after_train),
                  weights={}, notes=notes + extra.pop("notes"), **extra)
    return out, report


def _materialise(records, train_counts, shares, max_fraction, min_count, target, seed, allow_synthetic, drops,
                 augmenter, max_repeats, synthetic_ratio):
    """Drop surplus and add synthetic examples / repeats so that the file itself has the mix (on request)."""
    from src.data_processing.augmentation import Augmenter
    from src.utils.data_contract import question_key

    notes: list[str] = []
    total_real = sum(train_counts.values())
    cap_frac, _ = effective_cap(max_fraction, len(train_counts))
    if target:
        caps = {d: max(1, math.floor(shares[d] * total_real + 1e-9)) for d in train_counts}
    else:
        cap_count = max(1, math.floor(cap_frac * total_real + 1e-9))  # once, from the real totals
        caps = {d: cap_count for d in train_counts}
    by_domain: dict[str, list[dict]] = defaultdict(list)
    kept: list[dict] = []
    for rec in records:
        if rec.get("split", "train") == "train":
            by_domain[rec["domain"]].append(rec)
        else:
            kept.append(rec)  # validation stays whole and real
    capped = Counter()
    for domain, recs in sorted(by_domain.items()):
        if len(recs) > caps[domain]:
            recs = sorted(recs, key=_rank_for_keeping)
            for rec in recs[caps[domain]:]:
                if drops is not None:
                    drops.drop("domain_cap", rec["source"], rec.get("source_index"), rec["id"])
            capped[domain] = len(recs) - caps[domain]
            recs = recs[:caps[domain]]
        kept.extend(recs)
    counts = Counter(r["domain"] for r in kept if r.get("split", "train") == "train")
    goals = {d: max(min_count, caps[d] if target else 0) for d in counts}
    need = {d: goals[d] - counts[d] for d in sorted(counts) if goals[d] > counts[d]}
    already = sum(1 for r in kept if r.get("synthetic"))
    budget = max(0, math.floor((synthetic_ratio * len(kept) - already) / (1 - synthetic_ratio) + 1e-9)) \
        if synthetic_ratio < 1 else sum(need.values())
    if sum(need.values()) > budget:
        notes.append(f"floor needs {sum(need.values())} added records; --synthetic_ratio {synthetic_ratio} allows "
                     f"{budget}")
        need = _scale_need(need, budget)
    added_syn, added_rep = Counter(), Counter()
    if need:
        pool_train = [r for r in kept if r.get("split", "train") == "train" and not r.get("synthetic")]
        if allow_synthetic:
            augmenter = augmenter or Augmenter(pool_train, seed, {question_key(r["question"]) for r in kept})
            for rec in augmenter.generate(need):
                kept.append(rec)
                added_syn[rec["domain"]] += 1
        pools: dict[str, list[dict]] = defaultdict(list)
        for rec in pool_train:
            pools[rec["domain"]].append(rec)
        rep_counter: Counter = Counter()
        for domain, n in need.items():
            missing = n - added_syn[domain]
            if missing > 0 and pools.get(domain):
                copies = _repeats(pools[domain], missing, int(max_repeats), rep_counter)
                kept.extend(copies)
                added_rep[domain] = len(copies)
                if len(copies) < missing:
                    notes.append(f"{domain}: {missing - len(copies)} short of the floor (each record repeated at "
                                 f"most --max_repeats {int(max_repeats)} times)")
    return kept, {"capped": dict(sorted(capped.items())), "synthetic_added": dict(sorted(added_syn.items())),
                  "repeated_added": dict(sorted(added_rep.items())), "caps": dict(sorted(caps.items())),
                  "notes": notes}


def _scale_need(need: dict[str, int], budget: int) -> dict[str, int]:
    """Share ``budget`` additions over the domains in proportion to what each lacks (largest remainder)."""
    total = sum(need.values())
    raw = {d: n * budget / total for d, n in need.items()}
    out = {d: math.floor(v) for d, v in raw.items()}
    for d in sorted(raw, key=lambda d: (-(raw[d] - out[d]), d))[:budget - sum(out.values())]:
        out[d] += 1
    return {d: n for d, n in out.items() if n > 0}
