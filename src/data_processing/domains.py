"""Which domain a record belongs to: its own field, then a user mapping or the file/folder name, then a classifier
that says ``general_conversation`` when no technical domain is clearly ahead.

    from src.data_processing.domains import DomainResolver, DomainClassifier
    DomainClassifier().classify("Why do pandas eat bamboo?", "Giant pandas live on bamboo.")   # general
    DomainResolver(domain_map={"*alpaca*": "general"}).resolve(record, "alpaca_zh/part1.json")

Precedence (documentation/DATA_PROCESSING.md, "Domains"):
1. the record's own ``domain`` field (aliases resolved);
2. ``--domain_map`` (a JSON object of file-name patterns -> domain, matched against the path under the datasets
   folder with ``fnmatch``; first matching pattern wins), else a file or folder name that names a known domain
   or an alias of one (``networking.jsonl``, ``security/part1.json``);
3. the classifier, which marks the record ``domain_inferred`` and writes its ``domain_confidence``.

Why a scored classifier and not "the first keyword": one word decides nothing ("model" in a chat about cars,
"attack" in a history question, pandas the animal). Each domain collects points from terms of three strengths,
two-word phrases weigh most, the question counts once more than the answer, code blocks speak for programming,
and cue words of everyday topics (food, history, animals, travel...) weaken technical readings. A domain wins only
with enough points, at least one specific term and a clear lead over the next one.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections import Counter
from pathlib import PurePosixPath

GENERAL = "general_conversation"
KNOWN_DOMAINS = ("cybersecurity", "programming", "networking", "data_science", "cloud_computing", GENERAL)
DOMAIN_ALIASES = {
    "security": "cybersecurity", "cyber_security": "cybersecurity", "infosec": "cybersecurity",
    "information_security": "cybersecurity", "netsec": "cybersecurity", "cyber": "cybersecurity",
    "coding": "programming", "software": "programming", "code": "programming", "software_engineering": "programming",
    "development": "programming", "dev": "programming",
    "network": "networking", "networks": "networking", "network_engineering": "networking",
    "datascience": "data_science", "ml": "data_science", "machine_learning": "data_science",
    "ai": "data_science", "analytics": "data_science", "statistics": "data_science",
    "cloud": "cloud_computing", "cloudcomputing": "cloud_computing", "devops": "cloud_computing",
    "general": GENERAL, "chat": GENERAL, "conversation": GENERAL, "smalltalk": GENERAL, "small_talk": GENERAL,
}

# Terms by strength: 3 = specific to the domain, 2 = telling, 1 = weak (counts only next to a specific term).
# Multi-word entries are matched as phrases on the lower-cased word sequence.
LEXICON: dict[str, dict[int, str]] = {
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
# File names that look like aliases but usually mean something else ("dev" split, "code" folder, "data" files).
NOT_A_DOMAIN_NAME = {"dev", "code", "data", "ai", "general", "chat", "conversation"}


def normalise_domain(domain: object) -> str | None:
    """Lower case, spaces and dashes to ``_``, aliases resolved; None when there is no usable name."""
    if not isinstance(domain, str) or not domain.strip():
        return None
    key = re.sub(r"[\s\-/]+", "_", domain.strip().lower())
    return sys.intern(DOMAIN_ALIASES.get(key, key))  # one string object per domain, not one per record


def _compile_lexicon() -> tuple[dict[str, dict[str, int]], dict[str, dict[tuple[str, ...], int]]]:
    words: dict[str, dict[str, int]] = {}
    phrases: dict[str, dict[tuple[str, ...], int]] = {}
    for domain, levels in LEXICON.items():
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
    """A missing domain from several signals, with a confidence; ``general_conversation`` unless a technical
    domain is clearly ahead.

    Signals: lexicon terms (3/2/1 points, phrases count double), the question counted twice, a fenced code block
    (+3 programming), everyday cue words (-2 per cue to every technical domain, and they cancel ambiguous terms),
    and, when the knowledge step wrote them, per-domain term vectors (cosine, scaled to points).
    Decision: the best domain needs >= ``min_points``, a specific term (strength 3, or strength 2 with 1.5 x
    ``min_points``), and ``margin`` x the runner-up.
    Cost: one regex pass and a few dict look-ups per word (~10 us for a 60-word record).
    """

    def __init__(self, vectors: dict[str, dict[str, float]] | None = None, min_points: float = 4.0,
                 margin: float = 1.5) -> None:
        self.vectors = vectors or {}
        self.min_points = min_points
        self.margin = margin

    def scores(self, question: str, answer: str) -> tuple[dict[str, float], dict[str, int]]:
        """Points per technical domain and the strongest term strength seen per domain."""
        points: Counter = Counter()
        strongest: Counter = Counter()
        q_words = TECH_TERM.findall(question.lower())
        a_words = TECH_TERM.findall(answer.lower())
        all_words = q_words + a_words
        cues = sum(1 for w in all_words if w in GENERAL_CUES)
        for words, factor in ((q_words, 2.0), (a_words, 1.0)):
            for k, w in enumerate(words):
                hit = _WORDS.get(w)
                if hit:
                    for domain, weight in hit.items():
                        if cues and w in AMBIGUOUS:
                            continue
                        if weight == 1:
                            points[domain] += 0.5 * factor
                        else:
                            points[domain] += weight * factor
                            strongest[domain] = max(strongest[domain], weight)
                if w in _PHRASE_HEADS:
                    for domain, phrases in _PHRASES.items():
                        for phrase, weight in phrases.items():
                            if tuple(words[k:k + len(phrase)]) == phrase:
                                points[domain] += 2 * weight * factor
                                strongest[domain] = max(strongest[domain], weight)
        text = f"{question}\n{answer}"
        if not text.isascii():
            for term_text, factor in ((question, 2.0), (answer, 1.0)):
                for term, (domain, weight) in CJK_TERMS.items():
                    if term in term_text:
                        points[domain] += weight * factor
                        strongest[domain] = max(strongest[domain], weight)
        if "```" in answer or "```" in question:
            points["programming"] += 3
            strongest["programming"] = max(strongest["programming"], 2)
        if self.vectors:
            counts = Counter(all_words)
            for domain, vec in self.vectors.items():
                if domain == GENERAL:
                    continue
                cos = sum(w * counts[t] for t, w in vec.items() if t in counts)
                points[domain] += 10 * cos
                if cos > 0.05:
                    strongest[domain] = max(strongest[domain], 2)
        for domain in list(points):
            points[domain] -= 2 * cues
        return {d: round(p, 3) for d, p in points.items()}, dict(strongest)

    def classify(self, question: str, answer: str) -> tuple[str, float]:
        """``(domain, confidence in [0, 1])``; the general domain's confidence is how far the best technical
        reading is from winning."""
        points, strongest = self.scores(question, answer)
        ranked = sorted(points.items(), key=lambda kv: (-kv[1], kv[0]))
        best, best_pts = ranked[0] if ranked else (GENERAL, 0.0)
        second_pts = max(ranked[1][1], 0.0) if len(ranked) > 1 else 0.0
        specific = strongest.get(best, 0) >= 3 or (strongest.get(best, 0) >= 2 and best_pts >= 1.5 * self.min_points)
        if best_pts >= self.min_points and specific and best_pts >= self.margin * second_pts:
            lead = (best_pts - second_pts) / best_pts
            return best, round(min(1.0, lead * min(1.0, best_pts / (2 * self.min_points))), 3)
        return GENERAL, round(1.0 - max(0.0, min(1.0, best_pts / self.min_points)) * 0.5, 3)

    def __call__(self, question: str, answer: str) -> str:
        return self.classify(question, answer)[0]


def domain_from_name(rel_path: str) -> str | None:
    """A known domain (or an alias of one) named by the file stem or one of its folders, innermost first."""
    path = PurePosixPath(rel_path)
    names = [path.name.split(".")[0]] + [p for p in reversed(path.parent.parts)]
    for name in names:
        if name.lower() in NOT_A_DOMAIN_NAME:
            continue
        domain = normalise_domain(name)
        if domain in KNOWN_DOMAINS:
            return domain
    return None


def load_domain_map(path) -> dict[str, str]:
    """``--domain_map``: a JSON object of file-name patterns (fnmatch, against the path under the datasets folder
    and against the bare file name) to domains. Raises ValueError with the reason for a bad file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                             for k, v in data.items()):
        raise ValueError("it must hold a JSON object of file-name pattern -> domain name")
    return {k: normalise_domain(v) for k, v in data.items()}


class DomainResolver:
    """Applies the precedence above to one record; remembers the per-file decision (one look-up per file)."""

    def __init__(self, domain_map: dict[str, str] | None = None, classifier: DomainClassifier | None = None) -> None:
        self.domain_map = {k: normalise_domain(v) or v for k, v in (domain_map or {}).items()}
        self.classifier = classifier or DomainClassifier()
        self._by_file: dict[str, tuple[str | None, str]] = {}

    def file_domain(self, rel_path: str) -> tuple[str | None, str]:
        """``(domain or None, how)`` for a file: ``domain_map`` / ``file_name`` / ``none``."""
        cached = self._by_file.get(rel_path)
        if cached is not None:
            return cached
        result: tuple[str | None, str] = (None, "none")
        name = PurePosixPath(rel_path).name
        for pattern, domain in self.domain_map.items():
            if fnmatch.fnmatch(rel_path, pattern) or fnmatch.fnmatch(name, pattern):
                result = (domain, "domain_map")
                break
        else:
            named = domain_from_name(rel_path)
            if named is not None:
                result = (named, "file_name")
        self._by_file[rel_path] = result
        return result

    def resolve(self, own: object, rel_path: str, question: str, answer: str) -> tuple[str, str, float | None]:
        """``(domain, how, confidence)``: how is ``record``, ``domain_map``, ``file_name`` or ``classifier``."""
        domain = normalise_domain(own)
        if domain is not None:
            return domain, "record", None
        domain, how = self.file_domain(rel_path)
        if domain is not None:
            return domain, how, None
        domain, confidence = self.classifier.classify(question, answer)
        return domain, "classifier", confidence
