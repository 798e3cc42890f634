"""Which domain a record belongs to, in the user's own words: its own field, then a user mapping or the file/folder
name, then a classifier whose labels are the domains this data has (plus ``general``).

    from src.data_processing.domains import DomainResolver, DomainClassifier, assign_missing_domains
    DomainResolver().resolve(None, "helpdesk.jsonl")                 # ("helpdesk", "file_name")
    DomainResolver({"vendor/*": "sql"}).resolve(None, "vendor/a.json")  # ("sql", "domain_map")
    classifier = DomainClassifier.from_records(labelled_records)       # labels: their domains + general
    classifier.classify("How do I reset my password?", "Use the self-service page.")

Precedence (documentation/DATA_PROCESSING.md, "Domains"):
1. the record's own ``domain`` field, as written (lower case, spaces and dashes to ``_``; no aliases: a user's
   ``security`` stays ``security``);
2. ``--domain_map`` (a JSON object of file-name patterns -> domain, matched against the path under the datasets
   folder with ``fnmatch``; first matching pattern wins), else the name of the file's folder or of the file itself:
   ``sql/joins.json`` is ``sql``, ``helpdesk.jsonl`` is ``helpdesk``. Folders go first, outermost first (a folder
   groups files; the file name is often a topic inside it). Names that say how a file was made rather than what it
   is about are passed over: a name with a format in it (``alpaca``, ``sharegpt``, ``openai``...)
   names nothing; splits (``train``, ``dev``...), numbers and single letters are left out, and so are qualifying
   words at the start (``my_``, ``new_``...) or the end (``_export``, ``_data``, ``_chats``...):
   ``helpdesk_export_2024.json`` is ``helpdesk``, ``data_science.json`` is ``data_science``, ``alpaca_en.json``
   and ``my_data.json`` name nothing;
3. the classifier, which marks the record ``domain_inferred`` and writes its ``domain_confidence``.

The classifier learns from this data: its labels are the domains the records of steps 1-2 have, plus ``general``
when none is clearly ahead. Two signals: a term vector per domain computed from that domain's records (TF-IDF
across the domains, as the knowledge step's "technical embeddings"), and, only for those of the shipped sample's
technical domains that this data also has (``networking``, ``programming``...), the sample's scored lexicon. A user
whose domains are ``helpdesk`` and ``sql`` never gets a sample domain.

Why a scored lexicon and not "the first keyword": one word decides nothing ("model" in a chat about cars,
"attack" in a history question, pandas the animal). Each domain collects points from terms of three strengths,
two-word phrases weigh most, the question counts once more than the answer, code blocks speak for programming,
and cue words of everyday topics (food, history, animals, travel...) weaken technical readings. A domain wins only
with enough points, at least one specific term and a clear lead over the next one.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import PurePosixPath
from typing import Iterable

from src.data_processing.text_quality import CJK_STOP, NO_SPACE, STOPWORDS

GENERAL = "general"

# Terms by strength: 3 = specific to the domain, 2 = telling, 1 = weak (counts only next to a specific term).
# Multi-word entries are matched as phrases on the lower-cased word sequence.
SAMPLE_LEXICON: dict[str, dict[int, str]] = {
    "cybersecurity": {
        3: "malware phishing ransomware firewall firewalls vulnerability vulnerabilities exploit exploits xss csrf "
           "sql_injection mfa 2fa two_factor ciphertext cve pentest penetration_testing siem antivirus trojan botnet "
           "ddos brute_force zero_day keylogger spyware least_privilege password_manager infosec threat_model "
           "owasp cybersecurity intrusion_detection security_patch encrypted encryption decrypt tls_certificate "
           "social_engineering man_in_the_middle privilege_escalation cross_site_scripting",
        2: "malicious authentication authorization encrypt hashed hashing tls ssl certificate passwords password "
           "breach "
           "hacker hackers attacker attackers credentials vpn patching",
        1: "attack attacks threat threats security secure hack key keys token tokens access",
    },
    "programming": {
        3: "javascript typescript golang recursion compiler debugger stack_trace git github pull_request refactor "
           "regex regular_expression list_comprehension npm pip unit_test syntax iterator decorator async await "
           "null_pointer segfault source_code programmer programming python_function python_script dict tuple "
           "boolean integer variable variables exception_handling try_except for_loop while_loop linked_list "
           "regular_expressions "
           "hash_map big_o data_structure code_review merge_conflict",
        2: "python java rust function functions compile debug exception exceptions api json loop loops array arrays "
           "string strings bug bugs code coding lambda method methods class classes library framework repository",
        1: "list object test commit generator thread error script",
    },
    "networking": {
        3: "tcp udp dns dhcp subnet subnets subnetting ethernet vlan vlans bgp ospf ip_address ipv4 ipv6 icmp "
           "traceroute osi mtu arp cidr mac_address network_layer routing_table default_gateway packet_loss nat "
           "three_way_handshake wifi wi_fi",
        2: "ip router routers routing packet packets latency bandwidth gateway lan wan ping http https protocol "
           "protocols switch switches throughput",
        1: "network networks port ports traffic connection hub address",
    },
    "data_science": {
        3: "regression machine_learning deep_learning neural_network neural_networks feature_engineering overfitting "
           "underfitting cross_validation gradient_descent random_forest decision_tree clustering k_means kmeans pca "
           "principal_component decision_trees numpy scikit sklearn dataframe dataframes data_frame tensorflow pytorch "
           "confusion_matrix f1_score standard_deviation p_value hyperparameter hyperparameters data_science "
           "data_scientist data_analysis jupyter matplotlib training_data validation_set loss_function "
           "mean_squared_error import_pandas pandas_dataframe read_csv",
        2: "classification classifier dataset datasets statistics statistical correlation variance epoch epochs "
           "embedding embeddings outlier outliers histogram precision recall",
        1: "model models training data accuracy mean median feature features predict prediction analysis pandas "
           "sample",
    },
    "cloud_computing": {
        3: "aws azure gcp google_cloud kubernetes k8s serverless ec2 s3 cloud_computing iaas paas saas terraform "
           "auto_scaling autoscaling load_balancer virtual_machine object_storage cloudformation helm "
           "availability_zone microservices ci_cd infrastructure_as_code cloud_provider public_cloud "
           "private_cloud hybrid_cloud multi_cloud docker_container docker",
        2: "container containers vm vms pods devops iam deployment kubectl cloud",
        1: "storage deploy scaling instance instances server servers region pod",
    },
}
# Everyday topics: each cue costs every technical domain 2 points, and some cancel one ambiguous term.
GENERAL_CUES = set(
    "recipe recipes cook cooking bake baking soup dinner breakfast lunch vegetables fruit travel trip vacation "
    "holiday poem poetry story novel history historical century war wars battle army empire king queen soldiers "
    "troops castle medieval ancient animal animals zoo bamboo bear bears wildlife species forest garden flower "
    "flowers plant plants birthday wedding family friend friends movie film song music sport football soccer "
    "weather rain painting art museum dog dog's cat pet pets car cars fashion clothes exercise sleep coffee tea "
    "heart doctor health diet snake snakes island light lights breaker ship ships shipping cargo school teacher "
    "teachers eat eats rodents".split())
# Terms of scripts without spaces, found as substrings (only in non-ASCII text): term -> (domain, strength).
CJK_TERMS = {
    "网络钓鱼": ("cybersecurity", 3), "恶意软件": ("cybersecurity", 3), "勒索软件": ("cybersecurity", 3),
    "防火墙": ("cybersecurity", 3), "漏洞": ("cybersecurity", 2), "加密": ("cybersecurity", 2),
    "编程": ("programming", 3), "代码": ("programming", 2), "函数": ("programming", 3), "变量": ("programming", 3),
    "递归": ("programming", 3), "编译": ("programming", 3), "路由器": ("networking", 3), "子网": ("networking", 3),
    "网络协议": ("networking", 3), "域名": ("networking", 3), "机器学习": ("data_science", 3),
    "过拟合": ("data_science", 3), "深度学习": ("data_science", 3), "神经网络": ("data_science", 3),
    "数据集": ("data_science", 3), "云计算": ("cloud_computing", 3), "容器": ("cloud_computing", 2),
    "虚拟机": ("cloud_computing", 3), "集群": ("cloud_computing", 2),
}
# Words an everyday cue next to them turns back into plain English.
AMBIGUOUS = {"attack", "attacks", "model", "models", "pandas", "training", "python", "java", "key", "cloud",
             "threat", "bug", "bugs", "network", "port", "switch", "virus", "container", "containers", "class"}
TECH_TERM = re.compile(r"[a-z0-9][a-z0-9+#]*")
SAMPLE_DOMAINS = tuple(SAMPLE_LEXICON)  # the sample's technical domains (its sixth, general_conversation, has none)

# Words of a file or folder name that say how the file was made, not what it is about.
FORMAT_WORDS = frozenset("alpaca dolly sharegpt openai oasst oasst1 oasst2 chatml ultrachat vicuna gpt gpt4 llama "
                         "jsonl json csv tsv parquet kto dpo sft rlhf preference preferences hf huggingface".split())
SPLIT_WORDS = frozenset("train training test testing dev val valid validation eval evaluation holdout".split())
# Words that qualify a name rather than give it: taken off its start (``my_``, ``new_``) or its end (``_export``,
# ``_data``), so ``data_science`` keeps its ``data`` while ``helpdesk_data`` is ``helpdesk``.
LEADING_WORDS = frozenset("my our new old all raw clean cleaned processed final latest extra more misc other others "
                          "various mixed combined merged qa".split())
TRAILING_WORDS = frozenset("data dataset datasets record records export exports exported dump dumps part parts "
                           "shard chunk split file files backup copy sample samples set qa items questions answers "
                           "combined merged final latest extra more raw clean cleaned processed input inputs output "
                           "outputs chat chats messages dialog dialogs logs".split())
VERSION = re.compile(r"^v?\d+[a-z]?$")
NAME_PART = re.compile(r"[\W_]+")
# Terms for the per-domain vectors: words of 3+ letters of any script, and character pairs of scripts without
# spaces (a pair holding a question word or particle says nothing about the topic).
TERM_WORD = re.compile(r"[^\W\d_][^\W_]{2,}")
CJK_RUN = re.compile(f"[{NO_SPACE}]{{2,}}")
TERM_STOPWORDS = STOPWORDS | frozenset("the and for are but not you can its has was all any our out one may use how "
                                       "why who each other only own same too off per via is it".split())
VECTOR_TERMS = 60  # terms kept per domain vector
VECTOR_RECORDS = 5000  # records per domain that build its vector: enough to find its terms, bounded cost


def normalise_domain(domain: object) -> str | None:
    """Lower case, runs of spaces, dashes and slashes to one ``_``; None when there is no usable name. No aliases:
    the user's names are the user's."""
    if not isinstance(domain, str) or not domain.strip():
        return None
    key = re.sub(r"[\s\-/_]+", "_", domain.strip().lower()).strip("_")
    return sys.intern(key) if key else None  # one string object per domain, not one per record


def name_as_domain(name: str) -> str | None:
    """The domain a file or folder name gives (see the module docstring), or None when it names none."""
    parts = [p for p in NAME_PART.split(name.lower()) if p]
    if any(p in FORMAT_WORDS for p in parts):
        return None
    kept = [p for p in parts if len(p) > 1 and not VERSION.match(p) and p not in SPLIT_WORDS]
    while kept and kept[0] in LEADING_WORDS:
        kept.pop(0)
    while kept and kept[-1] in TRAILING_WORDS:
        kept.pop()
    return normalise_domain("_".join(kept)) if kept else None


def domain_from_name(rel_path: str) -> str | None:
    """The domain named by the folders of ``rel_path`` (outermost first; the sample's own folder aside) or by the
    file itself (its name up to the first dot)."""
    path = PurePosixPath(rel_path)
    for name in list(path.parent.parts) + [path.name.split(".")[0]]:
        domain = name_as_domain(name)
        if domain is not None:
            return domain
    return None


def load_domain_map(path) -> dict[str, str]:
    """``--domain_map``: a JSON object of file-name patterns (fnmatch, against the path under the datasets folder
    and against the bare file name) to domains. Raises ValueError with the reason for a bad file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and normalise_domain(v)
                                             for k, v in data.items()):
        raise ValueError("it must hold a JSON object of file-name pattern -> domain name")
    return {k: normalise_domain(v) for k, v in data.items()}


class DomainResolver:
    """Steps 1 and 2 of the precedence for one record; remembers the per-file decision (one look-up per file).
    Records it leaves without a domain go to the classifier (``assign_missing_domains``) once the domains of the
    whole data are known."""

    def __init__(self, domain_map: dict[str, str] | None = None) -> None:
        self.domain_map = {k: normalise_domain(v) or v for k, v in (domain_map or {}).items()}
        self._by_file: dict[str, tuple[str | None, str | None]] = {}

    def file_domain(self, rel_path: str) -> tuple[str | None, str | None]:
        """``(domain or None, how)`` for a file: ``domain_map`` / ``file_name`` / None."""
        cached = self._by_file.get(rel_path)
        if cached is not None:
            return cached
        result: tuple[str | None, str | None] = (None, None)
        name = PurePosixPath(rel_path).name
        for pattern, domain in self.domain_map.items():
            if fnmatch.fnmatch(rel_path, pattern) or fnmatch.fnmatch(name, pattern):
                result = (domain, "domain_map")
                break
        else:
            inner = rel_path.split("/", 1)[1] if rel_path.startswith("sample/") else rel_path
            named = domain_from_name(inner)
            if named is not None:
                result = (named, "file_name")
        self._by_file[rel_path] = result
        return result

    def resolve(self, own: object, rel_path: str) -> tuple[str | None, str | None]:
        """``(domain, how)``: how is ``record``, ``domain_map`` or ``file_name``; ``(None, None)`` leaves the record
        to the classifier."""
        domain = normalise_domain(own)
        if domain is not None:
            return domain, "record"
        return self.file_domain(rel_path)


# ---------------------------------------------------------------------------------------------------------------
# Per-domain term vectors
# ---------------------------------------------------------------------------------------------------------------

def domain_terms(text: str) -> list[str]:
    """Topic terms of a text for the domain vectors: lower-cased words of 3+ letters of any script (not
    stopwords), and character pairs of scripts without spaces."""
    lowered = text.lower()
    terms = [w for w in TERM_WORD.findall(lowered) if w not in TERM_STOPWORDS and not CJK_RUN.fullmatch(w)]
    for run in CJK_RUN.findall(lowered):
        terms.extend(run[i:i + 2] for i in range(len(run) - 1) if not (set(run[i:i + 2]) & CJK_STOP))
    return terms


def domain_vectors(records: Iterable[dict], top_n: int = VECTOR_TERMS,
                   per_domain: int = VECTOR_RECORDS) -> dict[str, dict]:
    """Per domain: TF-IDF of its terms with each domain's records as one document, so a term scores high when it
    is frequent in that domain and rare in the others (the first ``per_domain`` records of each domain count).
    Keeps the ``top_n`` terms seen at least twice, L2-normalised, with the record count and the top 15 terms."""
    by_domain: dict[str, Counter] = defaultdict(Counter)
    counts: Counter = Counter()
    for rec in records:
        domain = rec.get("domain")
        if not domain:
            continue
        counts[domain] += 1
        if counts[domain] <= per_domain:
            by_domain[domain].update(domain_terms(f"{rec['question']} {rec['answer']}"))
    n = len(by_domain)
    df = Counter(t for terms in by_domain.values() for t in terms)
    out = {}
    for domain, terms in sorted(by_domain.items()):
        weights = {t: (1 + math.log(c)) * (math.log((1 + n) / (1 + df[t])) + 1) for t, c in terms.items() if c >= 2}
        top = sorted(weights.items(), key=lambda tw: (-tw[1], tw[0]))[:top_n]
        norm = math.sqrt(sum(w * w for _, w in top)) or 1.0
        out[domain] = {"records": counts[domain], "top_terms": [t for t, _ in top[:15]],
                       "vector": {t: round(w / norm, 5) for t, w in top}}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------------

def _compile_lexicon() -> tuple[dict[str, dict[str, int]], dict[str, dict[tuple[str, ...], int]]]:
    words: dict[str, dict[str, int]] = {}
    phrases: dict[str, dict[tuple[str, ...], int]] = {}
    for domain, levels in SAMPLE_LEXICON.items():
        for weight, terms in levels.items():
            for term in terms.split():
                parts = tuple(term.split("_"))
                if len(parts) == 1:
                    words.setdefault(term, {})[domain] = max(weight, words.get(term, {}).get(domain, 0))
                else:
                    phrases.setdefault(domain, {})[parts] = weight
    return words, phrases


_WORDS, _PHRASES = _compile_lexicon()
_PHRASE_HEADS = {p[0] for d in _PHRASES.values() for p in d}


class DomainClassifier:
    """A missing domain among ``labels`` (the domains of this data), with a confidence; ``general`` unless one of
    them is clearly ahead.

    Signals, in order:
    - the sample's lexicon, for the labels that are sample domains only: terms (3/2/1 points, phrases count
      double), the question counted twice, a fenced code block (+3 programming), everyday cue words (-2 per cue to
      every such domain, and they cancel ambiguous terms). The best one needs >= ``min_points``, a specific term
      (strength 3, or strength 2 with 1.5 x ``min_points``) and ``margin`` x the runner-up;
    - the per-domain term vectors (``domain_vectors`` of this data's labelled records): the cosine of the record's
      terms (1 + ln tf, L2-normalised) with each vector; the best needs >= ``min_similarity`` and ``margin`` x the
      runner-up.
    Cost: one regex pass and a few dict look-ups per word (~10-20 us for a 60-word record).
    """

    def __init__(self, labels: Iterable[str] = (), vectors: dict[str, dict[str, float]] | None = None,
                 min_points: float = 4.0, margin: float = 1.5, min_similarity: float = 0.12) -> None:
        self.labels = frozenset(labels) - {GENERAL}
        self.lexicon_labels = self.labels & set(SAMPLE_LEXICON)
        self.vectors = {d: v for d, v in (vectors or {}).items() if d in self.labels and v}
        self.min_points, self.margin, self.min_similarity = min_points, margin, min_similarity

    @classmethod
    def from_records(cls, records: Iterable[dict], **kwargs) -> "DomainClassifier":
        """A classifier whose labels and vectors come from the records that have a domain."""
        labelled = [r for r in records if r.get("domain")]
        vectors = domain_vectors(labelled)
        return cls({r["domain"] for r in labelled}, {d: v["vector"] for d, v in vectors.items()}, **kwargs)

    def scores(self, question: str, answer: str) -> tuple[dict[str, float], dict[str, int]]:
        """Lexicon points per label that is a sample domain, and the strongest term strength seen per label."""
        points: Counter = Counter()
        strongest: Counter = Counter()
        if not self.lexicon_labels:
            return {}, {}
        allowed = self.lexicon_labels
        q_words = TECH_TERM.findall(question.lower())
        a_words = TECH_TERM.findall(answer.lower())
        cues = sum(1 for w in q_words + a_words if w in GENERAL_CUES)
        for words, factor in ((q_words, 2.0), (a_words, 1.0)):
            for k, w in enumerate(words):
                hit = _WORDS.get(w)
                if hit:
                    for domain, weight in hit.items():
                        if domain not in allowed or (cues and w in AMBIGUOUS):
                            continue
                        if weight == 1:
                            points[domain] += 0.5 * factor
                        else:
                            points[domain] += weight * factor
                            strongest[domain] = max(strongest[domain], weight)
                if w in _PHRASE_HEADS:
                    for domain, phrases in _PHRASES.items():
                        if domain not in allowed:
                            continue
                        for phrase, weight in phrases.items():
                            if tuple(words[k:k + len(phrase)]) == phrase:
                                points[domain] += 2 * weight * factor
                                strongest[domain] = max(strongest[domain], weight)
        if not f"{question}\n{answer}".isascii():
            for term_text, factor in ((question, 2.0), (answer, 1.0)):
                for term, (domain, weight) in CJK_TERMS.items():
                    if domain in allowed and term in term_text:
                        points[domain] += weight * factor
                        strongest[domain] = max(strongest[domain], weight)
        if "programming" in allowed and ("```" in answer or "```" in question):
            points["programming"] += 3
            strongest["programming"] = max(strongest["programming"], 2)
        for domain in list(points):
            points[domain] -= 2 * cues
        return {d: round(p, 3) for d, p in points.items()}, dict(strongest)

    def similarities(self, question: str, answer: str) -> dict[str, float]:
        """Cosine of the record's terms with each domain vector (the question's terms counted twice)."""
        if not self.vectors:
            return {}
        counts = Counter(domain_terms(question) * 2 + domain_terms(answer))
        weights = {t: 1 + math.log(c) for t, c in counts.items()}
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        return {d: round(sum(w * vec.get(t, 0.0) for t, w in weights.items()) / norm, 4)
                for d, vec in self.vectors.items()}

    def classify(self, question: str, answer: str) -> tuple[str, float]:
        """``(domain, confidence in [0, 1])``; the general domain's confidence is how far the best reading is from
        winning."""
        points, strongest = self.scores(question, answer)
        ranked = sorted(points.items(), key=lambda kv: (-kv[1], kv[0]))
        best, best_pts = ranked[0] if ranked else (GENERAL, 0.0)
        second_pts = max(ranked[1][1], 0.0) if len(ranked) > 1 else 0.0
        specific = strongest.get(best, 0) >= 3 or (strongest.get(best, 0) >= 2 and best_pts >= 1.5 * self.min_points)
        if best_pts >= self.min_points and specific and best_pts >= self.margin * second_pts:
            lead = (best_pts - second_pts) / best_pts
            return best, round(min(1.0, lead * min(1.0, best_pts / (2 * self.min_points))), 3)
        sims = sorted(self.similarities(question, answer).items(), key=lambda kv: (-kv[1], kv[0]))
        best_sim = sims[0][1] if sims else 0.0
        second_sim = sims[1][1] if len(sims) > 1 else 0.0
        if best_sim >= self.min_similarity and best_sim >= self.margin * second_sim:
            lead = (best_sim - second_sim) / best_sim
            return sims[0][0], round(min(1.0, lead * min(1.0, best_sim / (2 * self.min_similarity))), 3)
        closest = max(max(0.0, best_pts) / self.min_points, best_sim / self.min_similarity)
        return GENERAL, round(1.0 - min(1.0, closest) * 0.5, 3)

    def __call__(self, question: str, answer: str) -> str:
        return self.classify(question, answer)[0]


def assign_missing_domains(records: list[dict], classifier: DomainClassifier) -> int:
    """Give every record without a domain the classifier's label (marked ``domain_inferred``, with its
    ``domain_source`` and ``domain_confidence``); returns how many it labelled."""
    n = 0
    for rec in records:
        if rec.get("domain"):
            continue
        domain, confidence = classifier.classify(rec["question"], rec["answer"])
        rec["domain"] = sys.intern(domain)
        rec["domain_source"] = "classifier"
        rec["domain_inferred"] = True
        rec["domain_confidence"] = confidence
        n += 1
    return n
