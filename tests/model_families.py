"""Tiny random models of every supported family, built offline while the tests run (as theta-tiny is built).

Each is a config of the family at a toy size plus a byte-level BPE tokenizer trained here on a few hundred
lines, dressed the way that family's real checkpoints are: special tokens, whether the tokenizer adds BOS, the
chat template, the EOS (or list of EOS ids) in the generation config, a tied or untied head. The templates are
written for these tests in each family's layout; they are not copies of the published ones.

    from tests.model_families import build_family
    folder = build_family("llama", tmp_path / "llama")        # save_pretrained folder: AutoModelForCausalLM loads it

    python tests/model_families.py /tmp/families              # build them all (to look at them)

| family  | head   | tokenizer                          | chat template        | EOS for generation          | pad        |
|---------|--------|------------------------------------|----------------------|-----------------------------|------------|
| gpt2    | tied   | no BOS                             | none                 | <|endoftext|>               | none       |
| llama   | untied | adds <|begin_of_text|>             | header / <|eot_id|>  | [<|end_of_text|>, <|eot_id|>] | none (spare reserved tokens) |
| qwen2   | tied   | no BOS                             | ChatML <|im_end|>    | <|im_end|>                  | <|endoftext|> |
| qwen3   | untied | no BOS                             | ChatML <|im_end|>    | <|im_end|>                  | <|endoftext|> |
| mistral | untied | adds <s>                           | [INST] ... [/INST]   | </s>                        | none       |
| phi3    | untied | no BOS                             | <|user|> ... <|end|> | [<|endoftext|>, <|end|>]    | = EOS (a spare placeholder exists) |
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

FAMILY_SEED = 4321
FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3")

# A few hundred short lines in several languages: enough for a tokenizer of ~500 pieces.
_LINES = [
    "What is a firewall? A firewall filters network traffic by rules.",
    "How do I reset my password? Open the account page and choose reset.",
    "SELECT name FROM users WHERE id = 1;",
    "def add(a, b):\n    return a + b",
    "Qu'est-ce qu'un pare-feu ? Un pare-feu filtre le trafic réseau.",
    "Wie setze ich mein Passwort zurück? Öffnen Sie die Kontoseite.",
    "¿Qué es una base de datos? Guarda datos de forma ordenada.",
    "The helpdesk answers tickets within one working day.",
    "Our office opens at nine and closes at five.",
    "An index makes lookups on a column faster.",
]

# Each family's chat template, in Jinja as transformers renders it. They share one shape: every message in
# order, then the assistant's opening when add_generation_prompt is set.
_TEMPLATES = {
    "llama": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}{{ m['content'] }}{{ eos_token }}"
                "{% endif %}{% endfor %}"),
    "phi3": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}
_TEMPLATES["qwen3"] = _TEMPLATES["qwen2"]

# Special tokens of each family: (bos, eos, pad, unk, extra special tokens), and the generation EOS ids' tokens.
_SPECIALS = {
    "llama": dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, unk=None,
                  extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>"],
                  gen_eos=["<|end_of_text|>", "<|eot_id|>"], add_bos=True),
    "qwen2": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, extra=["<|im_start|>"],
                  gen_eos=["<|im_end|>"], add_bos=False),
    "mistral": dict(bos="<s>", eos="</s>", pad=None, unk="<unk>", extra=["[INST]", "[/INST]"],
                    gen_eos=["</s>"], add_bos=True),
    "phi3": dict(bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>",
                 extra=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|placeholder1|>"],
                 gen_eos=["<|endoftext|>", "<|end|>"], add_bos=False),
}
_SPECIALS["qwen3"] = _SPECIALS["qwen2"]

# Toy sizes: two decoder layers, grouped-query attention where the family has it.
_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def _tokenizer(family: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer with the family's special tokens, BOS handling and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _SPECIALS[family]
    specials = [t for t in (spec["bos"], spec["eos"], spec["pad"], spec["unk"]) if t] + spec["extra"]
    specials = list(dict.fromkeys(specials))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_LINES * 3, trainer=trainer)
    if spec["add_bos"]:  # the post-processor puts BOS before every separately tokenised text
        bos = spec["bos"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token=spec["pad"], unk_token=spec["unk"],
                                  extra_special_tokens=spec["extra"])
    tok.chat_template = _TEMPLATES[family]
    return tok


def _config(family: str, tok):
    from transformers import AutoConfig

    spec = _SPECIALS[family]
    ids = lambda t: tok.convert_tokens_to_ids(t) if t else None  # noqa: E731
    kwargs = dict(_SIZE, vocab_size=len(tok), bos_token_id=ids(spec["bos"]), eos_token_id=ids(spec["eos"]),
                  pad_token_id=ids(spec["pad"]), tie_word_embeddings=family == "qwen2")
    if family == "qwen3":
        kwargs["head_dim"] = 16  # Qwen3's default is 128 whatever the width
    if family == "mistral":
        kwargs["sliding_window"] = 256  # shorter than the context: packing must refuse it or handle it
    if family == "phi3":
        kwargs.update(original_max_position_embeddings=512, resid_pdrop=0.0, embd_pdrop=0.0)
    return AutoConfig.for_model(family, **kwargs)


def build_family(family: str, out_dir: Path, seed: int = FAMILY_SEED) -> Path:
    """Build the tiny ``family`` model into ``out_dir`` (a ``save_pretrained`` folder) and return it.

    ``gpt2`` gets a GPT-2 of the same toy size with a plain byte-level tokenizer (no template, as GPT-2 ships).
    The random init uses a local generator: the global RNG is untouched.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel, \
        PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "gpt2":
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            bpe = Tokenizer(models.BPE())
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            bpe.decoder = decoders.ByteLevel()
            bpe.train_from_iterator(_LINES * 3, trainer=trainers.BpeTrainer(
                vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
            tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                          eos_token="<|endoftext|>", unk_token="<|endoftext|>")
            eos = tok.eos_token_id
            model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512, vocab_size=len(tok),
                                               bos_token_id=eos, eos_token_id=eos))
            gen_eos = eos
        else:
            tok = _tokenizer(family)
            model = AutoModelForCausalLM.from_config(_config(family, tok))
            gen_eos = [tok.convert_tokens_to_ids(t) for t in _SPECIALS[family]["gen_eos"]]
            gen_eos = gen_eos[0] if len(gen_eos) == 1 else gen_eos
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=gen_eos,
                                               pad_token_id=model.config.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "family.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n", encoding="utf-8")
    return out_dir


def build_unsupported(kind: str, out_dir: Path) -> Path:
    """A folder of a model Theta must refuse at start-up: ``gemma2`` (logit soft-capping), ``gpt_neox`` (a type
    outside the supported list). Config plus a tokenizer is enough: the refusal comes before any weights load."""
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer("llama")
    cfg = AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512) \
        if kind == "gemma2" else AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=64,
                                                       intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, max_position_embeddings=512)
    cfg.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/theta_families")
    for name in FAMILIES:
        print(build_family(name, root / name))
