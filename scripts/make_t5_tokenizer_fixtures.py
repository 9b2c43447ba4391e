#!/usr/bin/env python3
"""A tiny T5-style SentencePiece tokenizer and transformers' ids, for
crates/models/tests/t5_tokenizer.rs.

Trains a ~300-piece unigram SentencePiece model with T5's settings (nmt_nfkc normalisation,
pad 0, </s> 1, <unk> 2, no <s>), writes it as the tokenizer.json layout of T5's fast tokenizers
(as FLUX's tokenizer_2 ships it: Precompiled charsmap normaliser, Metaspace, "$A </s>") with 4
extra ids, and saves it to fixtures/flux/tokenizer_2/ (and the SentencePiece model alone to
fixtures/flux/tokenizer_2_spm/); transformers' T5TokenizerFast loads it (transformers 5
rebuilds the normaliser and pre-tokenizer itself: Precompiled only, WhitespaceSplit +
Metaspace). fixtures/flux/reference/t5-tokenizer.json holds the ids
of tricky prompts as FluxPipeline asks for them (padding="max_length", truncation=True).
Deterministic.
"""
import io
import json
import random
import shutil
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import T5TokenizerFast

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"

WORDS = ("a photo of the cat dog sitting on red blue green chair table garden sky tree house "
         "painting portrait landscape mountain river city night light bright dark beautiful "
         "detailed realistic oil water color style by artist with and in at under over").split()

PROMPTS = [
    "a photo of a cat",
    "A Photo OF a Cat, sitting on the red chair!",
    "  leading and trailing spaces   ",
    "many     spaces\tand\ttabs\nand newlines",
    "ﬁne ligatures, ＦＵＬＬＷＩＤＴＨ text and ① circled",
    "café naïve résumé über",
    "emoji 🐱 and unknown ☃ symbols",
    "special tokens </s> and <extra_id_1> in text",
    "",
    "watercolor mountainriver citylight",
    " ".join(WORDS),
]


def main():
    rng = random.Random(0)
    syllables = ["ka", "ri", "mo", "tes", "lan", "qu", "zor", "ph", "ing", "er", "st", "vy"]
    made = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    vocab = WORDS + made
    corpus = "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12)))
                       for _ in range(4000)) + "\ncafé naïve résumé über 1 2 3 , . !"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.split("\n")), model_writer=model, vocab_size=300,
        model_type="unigram", hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, character_coverage=1.0, num_threads=1, seed_sentencepiece_size=10000,
        shuffle_input_sentence=False,
    )
    out = ROOT / "tokenizer_2"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # tokenizer.json in the layout T5's published fast tokenizers (FLUX's tokenizer_2) have:
    # Unigram with the SentencePiece scores, the model's precompiled nmt_nfkc charsmap, runs
    # of spaces collapsed, Metaspace, "$A </s>", and <extra_id_N> added tokens.
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(3, -1, -1)]
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(t, 0.0) for t in extra]
    tk = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ["<pad>", "</s>", "<unk>"] + extra])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "pad_token": "<pad>",
        "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 4,
        "additional_special_tokens": extra}, indent=1) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
        "additional_special_tokens": extra}, indent=1) + "\n")
    # The same tokenizer as a folder with only the SentencePiece model (also a published
    # layout); transformers builds the same tokenizer from it (checked below).
    spm_dir = ROOT / "tokenizer_2_spm"
    if spm_dir.exists():
        shutil.rmtree(spm_dir)
    spm_dir.mkdir(parents=True)
    (spm_dir / "spiece.model").write_bytes(model.getvalue())
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 4}, indent=1) + "\n")
    spm_tok = T5TokenizerFast.from_pretrained(spm_dir)
    tok = T5TokenizerFast.from_pretrained(out)
    cases = []
    for max_length in (16, 64):
        for p in PROMPTS:
            enc = tok(p, padding="max_length", max_length=max_length, truncation=True)
            enc2 = spm_tok(p, padding="max_length", max_length=max_length, truncation=True)
            assert enc["input_ids"] == enc2["input_ids"], p
            cases.append({"prompt": p, "max_length": max_length, "ids": enc["input_ids"]})
    (ROOT / "reference").mkdir(parents=True, exist_ok=True)
    (ROOT / "reference" / "t5-tokenizer.json").write_text(
        json.dumps({"cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"vocab {len(tok)}, {len(cases)} cases; example {cases[1]['ids'][:12]}")


if __name__ == "__main__":
    main()
