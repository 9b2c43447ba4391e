#!/usr/bin/env python3
"""CLIP BPE tokenizer folders and reference token ids for the Rust `ClipTokenizer` tests.

The Stable Diffusion tokenizers are the OpenAI CLIP BPE (49408 tokens). Its merges are
published as `bpe_simple_vocab_16e6.txt.gz` (shipped, for example, in the `open_clip_torch`
wheel). From that file this script lays out an SD `tokenizer/` folder the way the published
repositories do:

- `merges.txt`: "#version: 0.2" then the first 49152 - 256 - 2 = 48894 merges;
- `vocab.json`: the 256 byte characters of GPT-2's byte-to-unicode table (in table order), the
  same 256 with "</w>" appended, one token per merge (the two halves joined), then
  `<|startoftext|>` (49406) and `<|endoftext|>` (49407);
- `tokenizer_config.json` / `special_tokens_map.json` in the legacy layout of the SD 1.x / 2.x
  repositories (special tokens as AddedToken dicts with normalized=true; the pad token as a
  plain string, "<|endoftext|>" in the config and the wanted one in the special-tokens map,
  which is what SD 2.x ships with pad "!").

Importable helpers (used by scripts/make_fixtures.py):
    write_full_clip_tokenizer(out_dir, pad_token)
    write_tiny_clip_tokenizer(out_dir, pad_token, n_tokens=1000)

Run as a script to (re)write crates/models/tests/fixtures/clip-tokenizer/ with the expected
ids produced by transformers' CLIPTokenizer:

    /work/venv/bin/python scripts/make_tokenizer_fixtures.py [--bpe path/to/bpe_simple_vocab_16e6.txt.gz]

Without --bpe the merges are read from the committed asset (crates/models/assets/clip-merges.txt.gz) or, failing that,
from an installed `open_clip` package.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import tempfile
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO / "crates" / "models" / "tests" / "fixtures" / "clip-tokenizer"
ASSETS = REPO / "crates" / "models" / "assets"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's simple tokenizer
MODEL_MAX_LENGTH = 77

_MERGES_CACHE: list[tuple[str, str]] | None = None
_BPE_PATH: Path | None = None


# --------------------------------------------------------------------------------------------
# Vocabulary construction
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table. Its insertion order (the printable
    bytes, which map to themselves, then the others, mapped to U+0100 upwards by byte value)
    is the order of the byte tokens in CLIP's vocabulary."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_bpe_gz(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a header ("#version: 0.2" in merges.txt, a file name + version in the
    # open_clip file); the merges follow.
    merges = []
    for line in lines[1 : N_MERGES + 1]:
        a, b = line.split()
        merges.append((a, b))
    if len(merges) != N_MERGES:
        raise SystemExit(f"{path}: expected {N_MERGES} merges, found {len(merges)}")
    return merges


def _find_bpe_source() -> Path:
    if _BPE_PATH is not None:
        return _BPE_PATH
    committed = ASSETS / "clip-merges.txt.gz"
    if committed.exists():
        return committed
    try:
        import open_clip  # type: ignore

        p = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        if p.exists():
            return p
    except ImportError:
        pass
    raise SystemExit(
        "no CLIP BPE source: pass --bpe path/to/bpe_simple_vocab_16e6.txt.gz "
        "(from the open_clip_torch wheel)"
    )


def clip_merges() -> list[tuple[str, str]]:
    """The 48894 CLIP merges, in rank order."""
    global _MERGES_CACHE
    if _MERGES_CACHE is None:
        _MERGES_CACHE = _read_bpe_gz(_find_bpe_source())
    return _MERGES_CACHE


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens in the constructed vocabulary")
    return vocab


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def _write_folder(out_dir, merges: list[tuple[str, str]], pad_token: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    if pad_token not in vocab:
        raise SystemExit(f"pad token {pad_token!r} is not in the vocabulary")
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    config = {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS),
        "do_lower_case": True,
        "eos_token": _added_token(EOS),
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS),
    }
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    special = {}
    for key, content in [("bos_token", BOS), ("eos_token", EOS), ("pad_token", pad_token),
                         ("unk_token", EOS)]:
        if key == "pad_token":
            special[key] = content
        else:
            tok = dict(_added_token(content))
            del tok["__type"]
            special[key] = tok
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
        f.write("\n")
    return out


def write_full_clip_tokenizer(out_dir, pad_token: str = EOS) -> Path:
    """Writes the real 49408-token CLIP tokenizer as an SD `tokenizer/` folder."""
    return _write_folder(out_dir, clip_merges(), pad_token)


def write_tiny_clip_tokenizer(out_dir, pad_token: str = EOS, n_tokens: int = 1000) -> Path:
    """Writes a small CLIP tokenizer (same layout) for tiny test models: the 512 byte tokens,
    the first `n_tokens - 514` merges and the two special tokens (ids n_tokens-2, n_tokens-1)."""
    n_merges = n_tokens - 512 - 2
    if n_merges < 0 or n_merges > N_MERGES:
        raise ValueError(f"n_tokens must lie in 514..={N_MERGES + 514}")
    return _write_folder(out_dir, clip_merges()[:n_merges], pad_token)


# --------------------------------------------------------------------------------------------
# Reference data
# --------------------------------------------------------------------------------------------

LONG = (
    "masterpiece, best quality, ultra-detailed, a majestic lion standing on a rocky cliff at "
    "sunset, golden hour lighting, dramatic clouds, volumetric light, 8k uhd, dslr, soft "
    "lighting, high quality, film grain, Fujifilm XT3, by Greg Rutkowski and Alphonse Mucha, "
    "trending on artstation, intricate details, sharp focus, cinematic composition, vivid "
    "colors, hyperrealistic, octane render, unreal engine 5, ray tracing, depth of field, bokeh"
)

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation",
    # punctuation
    "hello, world!!! (masterpiece:1.2) [bad hands] {x|y} <lora:foo:0.8>",
    "a/b\\c ... --- !? ?! a.b.c e-mail 100% $5 #hashtag @user a_b_c ~tilde~ `code` ^caret^",
    "((((best quality)))), [[[worse]]], (red:1.3), \"quoted\" 'single' <angle> &amp; ;:",
    "wow! !!! ! a ! b x!y !a! \uff01fullwidth\uff01",
    # unicode
    "caf\u00e9 cafe\u0301 CAF\u00c9 CAFE\u0301",
    "na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u212bngstr\u00f6m A\u030angstro\u0308m",
    "\u6771\u4eac\u30bf\u30ef\u30fc \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4 "
    "\u1100\u1161\u11a8",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3 "
    "\u03a3\u038a\u03a3\u03a5\u03a6\u039f\u03a3 stra\u00dfe STRASSE",
    "\u0130stanbul I\u0307 \u01c5 \ufb01ne \u1e9e \u2126 \u212a \u00b5",
    "\U0001f431 cat \U0001f436 \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "\u2764\ufe0f \u2728\u2728",
    "q\u0303 x\u0308\u0301 a\u0301\u0316 e\u0316\u0301 \u0301lonely combining",
    "\u00bd \u00b2 \u00b3 \u0661\u0662\u0663 \u0e51\u0e52 \u2460 \u216b \u210c \u2163",
    "soft\u00adhyphen zero\u200bwidth \ufeffbom ctrl\x00\x07\x1b end\u0085line",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea "
    "\u0939\u093f\u0928\u094d\u0926\u0940 \u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22",
    "\U0001d400\U0001d401 \U00020000 \U0010fffd \ue000 \u00ff\u0100",
    # whitespace
    "  leading and trailing  ",
    "tab\tseparated\t\twords",
    "new\nline\r\nwindows\rmac",
    "non\u00a0breaking\u2003em\u2009thin\u3000ideographic\u2028line\u2029para\u202fnarrow",
    "\u200a\u205f\u1680\u180e\u200b\u2060",
    "   ",
    "\t\n\x0b\x0c\r",
    # apostrophes
    "it's don't you're we've I'm we'll he'd",
    "IT'S DON'T YOU'RE WE'VE I'M WE'LL HE'D It'S",
    "'s ''s 'S rock'n'roll o'clock dogs' bowls 'twas it's' it'sss '' '",
    "it\u2019s don\u2019t \u2018quoted\u2019 \u201cdouble\u201d",
    "'ll've'd're'm't's",
    # digits
    "1234567890 3.14159 1,000,000 2024-01-01 x2 4k uhd v1.5 sd2.1 1st 2nd 3rd",
    "\uff11\uff12\uff13 fullwidth digits",
    # special-token strings typed in the prompt
    "<|startoftext|>",
    "<|endoftext|>",
    "a<|endoftext|>b <|startoftext|>c",
    "<|ENDOFTEXT|> <|StartOfText|> <|Endoftext|>",
    "<|endoftext|><|startoftext|><|endoftext|>",
    "<|endoftext <|endoftext|>> <<|startoftext|>",
    "<|endoftext|>!",
    # casing
    "HELLO World hElLo MiXeD CaSe",
    # words outside the tiny vocabulary
    "supercalifragilisticexpialidocious",
    "xylophone zebra quixotic juxtaposition",
    # long prompts (truncation)
    LONG,
    LONG + ", " + LONG,
    "a " * 74,
    "a " * 75,
    "a " * 76,
    "a " * 77,
    "a " * 200,
    "! " * 80,
]

# Prompts for the configuration-variant checks (which special tokens match where).
VARIANT_PROMPTS = [
    "a photo of a cat",
    "<|STARTOFTEXT|>",
    "<|ENDOFTEXT|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "x! y!! <|endoftext|>!",
    "A<|StartOfText|>B<|Endoftext|>c",
    "a <|endoftext|> b",
    " <|endoftext|> ",
    "word<|endoftext|>",
    "<|endoftext|>word",
    "word<|startoftext|> <|startoftext|>word <|startoftext|> x",
    "a  \t<|endoftext|>\n  b<|endoftext|>  <|endoftext|>",
    "a <cat-toy> photo, <CAT-TOY>! x<cat-toy>y <cat-toy",
]


def _dec(content: str, normalized: bool, **extra) -> dict:
    d = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
         "single_word": False, "special": True}
    d.update(extra)
    return d


def _st(content: str, normalized: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


def _at(content: str, normalized: bool = True) -> dict:
    return {"__type": "AddedToken", **_st(content, normalized)}


# name -> (tokenizer_config.json or None, special_tokens_map.json or None)
VARIANTS = {
    # the SD 1.x / 2.x repositories (legacy layout, special_tokens_map.json overrides)
    "legacy-sd1": (
        {"bos_token": _at(BOS), "eos_token": _at(EOS), "pad_token": EOS, "unk_token": _at(EOS),
         "model_max_length": 77},
        {"bos_token": _st(BOS), "eos_token": _st(EOS), "pad_token": EOS, "unk_token": _st(EOS)},
    ),
    "legacy-sd2": (
        {"bos_token": _at(BOS), "eos_token": _at(EOS), "pad_token": EOS, "unk_token": _at(EOS),
         "model_max_length": 77},
        {"bos_token": _st(BOS), "eos_token": _st(EOS), "pad_token": "!", "unk_token": _st(EOS)},
    ),
    "legacy-no-map": (
        {"bos_token": _at(BOS), "eos_token": _at(EOS), "pad_token": "!", "unk_token": _at(EOS),
         "model_max_length": 77},
        None,
    ),
    "legacy-pad-dict": (
        {"bos_token": _at(BOS), "eos_token": EOS, "pad_token": _at(EOS), "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "legacy-eos-str-unk-dict": (
        {"bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": _at(EOS),
         "model_max_length": 77},
        None,
    ),
    "legacy-eos-dict-pad-dict-unnormalized": (
        {"bos_token": BOS, "eos_token": _at(EOS), "pad_token": _at(EOS, False),
         "unk_token": _at(EOS), "model_max_length": 77},
        None,
    ),
    "legacy-pad-bang-dict": (
        {"bos_token": BOS, "eos_token": EOS, "pad_token": _at("!"), "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "legacy-map-dicts": (
        {"model_max_length": 64},
        {"bos_token": _st(BOS, False), "eos_token": EOS, "pad_token": _st("!"), "unk_token": EOS},
    ),
    "legacy-map-no-normalized-key": (
        {"model_max_length": 77},
        {"bos_token": {"content": BOS}, "eos_token": {"content": EOS}, "pad_token": EOS,
         "unk_token": EOS},
    ),
    "all-strings": (
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, None,
    ),
    "no-config": (None, None),
    # tokenizer_config.json saved by transformers >= 4.34 (special_tokens_map.json is ignored)
    "modern-sd1": (
        {"added_tokens_decoder": {"49406": _dec(BOS, True), "49407": _dec(EOS, True)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
         "model_max_length": 77},
        {"bos_token": _st(BOS), "eos_token": _st(EOS), "pad_token": "!", "unk_token": _st(EOS)},
    ),
    "modern-sdxl-2": (
        {"added_tokens_decoder": {"0": _dec("!", False), "49406": _dec(BOS, True),
                                  "49407": _dec(EOS, False)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "modern-pad-missing": (
        {"added_tokens_decoder": {"49406": _dec(BOS, True), "49407": _dec(EOS, True)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "modern-bang-normalized": (
        {"added_tokens_decoder": {"0": _dec("!", True), "49406": _dec(BOS, False),
                                  "49407": _dec(EOS, False)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "modern-strip-single-word": (
        {"added_tokens_decoder": {"49406": _dec(BOS, True, single_word=True),
                                  "49407": _dec(EOS, False, lstrip=True, rstrip=True)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "modern-extra-added-token": (
        {"added_tokens_decoder": {"49406": _dec(BOS, True), "49407": _dec(EOS, False),
                                  "49408": _dec("<cat-toy>", True, special=False)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
    "modern-pad-dict": (
        {"added_tokens_decoder": {"49406": _dec(BOS, True), "49407": _dec(EOS, True)},
         "bos_token": BOS, "eos_token": EOS, "pad_token": _at(EOS, False), "unk_token": EOS,
         "model_max_length": 77},
        None,
    ),
}


def _load(path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def _describe(tok, prompts, padded: bool) -> dict:
    cases = []
    for p in prompts:
        full = tok(p).input_ids
        case = {"prompt": p, "ids": full}
        if padded:
            case["padded"] = tok(p, padding="max_length", max_length=tok.model_max_length,
                                 truncation=True).input_ids
        cases.append(case)
    max_len = tok.model_max_length if tok.model_max_length < 10**9 else None
    return {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
            "max_length": max_len, "vocab_size": len(tok), "cases": cases}


def _unicode_tables(tok) -> dict:
    """Per-code-point reference for the normalizer and the pre-tokenizer's character classes."""
    from tokenizers import Regex, pre_tokenizers

    normalizer = tok.backend_tokenizer.normalizer
    changed = []
    classes = []  # runs [first, last, class]
    split = pre_tokenizers.Split(
        Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
        behavior="removed", invert=True)
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        out = normalizer.normalize_str(ch)
        if out != ch:
            changed.append([cp, out])
        pieces = [p for p, _ in split.pre_tokenize_str("a" + ch + ch + "a")]
        if pieces == ["a" + ch + ch + "a"]:
            cls = "L"
        elif pieces == ["a", ch, ch, "a"]:
            cls = "N"
        elif pieces == ["a", "a"]:
            cls = "S"
        elif pieces == ["a", ch + ch, "a"]:
            cls = "O"
        else:
            raise SystemExit(f"unexpected pre-tokenization of U+{cp:04X}: {pieces}")
        if classes and classes[-1][2] == cls and classes[-1][1] == cp - 1:
            classes[-1][1] = cp
        else:
            classes.append([cp, cp, cls])
    # Canonical ordering / composition of combining sequences.
    rng = random.Random(1234)
    marks = [cp for cp in range(0x110000)
             if not 0xD800 <= cp <= 0xDFFF and unicodedata.combining(chr(cp))]
    bases = [ord(c) for c in "aeiouAEIOUnNcCsSzZ"] + [0x0391, 0x03B1, 0x0415, 0x1100, 0x0B47,
                                                    0x0DD9, 0x1025, 0x11131]
    sequences = []
    for _ in range(3000):
        s = chr(rng.choice(bases)) + "".join(chr(rng.choice(marks))
                                            for _ in range(rng.randint(1, 4)))
        sequences.append([s, normalizer.normalize_str(s)])
    for s in ["\u1100\u1161\u11a8", "\u1100\u1161", "\uac00\u11a8", "\u0b47\u0b3e",
              "\u0dd9\u0dcf\u0dca", "\u1025\u102e", "\U00011131\U00011127", "e\u0301\u0327",
              "e\u0327\u0301", "\u0041\u030a\u0301", "\u0fb2\u0f80", "\u0f71\u0f72\u0f74"]:
        sequences.append([s, normalizer.normalize_str(s)])
    return {"changed": changed, "classes": classes, "sequences": sequences}


def _random_prompts(vocab: dict[str, int], n: int, seed: int) -> list[str]:
    """Random strings that exercise the character classes and many merges."""
    rng = random.Random(seed)
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    pieces = []
    for token in list(vocab)[512:-2]:
        word = token[:-4] if token.endswith("</w>") else token
        try:
            pieces.append((bytes(byte_decoder[c] for c in word).decode("utf-8"),
                           token.endswith("</w>")))
        except UnicodeDecodeError:
            pass
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                "     ,.;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`"
                "\u00e9\u00e8\u00fc\u00f1\u00df\u0301\u0308\u00a0\t\n"
                "\u65e5\u672c\u4e2d\u6587\ud55c\u0416\u03a9\u0644"
                "\U0001f600\U0001f431\u2764\ufe0f\u200d\u2019\uff01\u00bd\u0663")
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
        else:
            words = []
            for _ in range(rng.randint(1, 6)):
                w = "".join(rng.choice(pieces)[0] for _ in range(rng.randint(1, 4)))
                words.append(w)
            out.append(rng.choice([" ", "", "-", " "]).join(words))
    return out


def _write_variant(name: str, cfg, smap, full: Path, base: Path) -> Path:
    """A tokenizer folder with the vocabulary of `full` and the given config files."""
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    for f in ["vocab.json", "merges.txt"]:
        os.symlink(full / f, d / f)
    if cfg is not None:
        with open(d / "tokenizer_config.json", "w") as f:
            json.dump(cfg, f, indent=1)
    if smap is not None:
        with open(d / "special_tokens_map.json", "w") as f:
            json.dump(smap, f, indent=1)
    return d


def main() -> None:
    global _BPE_PATH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (or a merges.txt.gz)")
    ap.add_argument("--out", type=Path, default=FIXTURE_DIR)
    ap.add_argument("--skip-unicode", action="store_true", help="do not rewrite unicode.json.gz")
    args = ap.parse_args()
    if args.bpe is not None:
        _BPE_PATH = args.bpe

    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    out: Path = args.out
    tmp = Path(tempfile.mkdtemp(prefix="clip-tok-"))
    try:
        full = write_full_clip_tokenizer(tmp / "full", EOS)
        expected = {"transformers": transformers.__version__, "tokenizers": {}, "variants": {}}

        out.mkdir(parents=True, exist_ok=True)
        if (out / "expected.json").exists():
            (out / "expected.json").unlink()
        # The merges and the SD 1.x / 2.x configs are built into the binary (assets/).
        ASSETS.mkdir(parents=True, exist_ok=True)
        for f, dest in [("vocab.json", out / "vocab.json.gz"),
                        ("merges.txt", ASSETS / "clip-merges.txt.gz")]:
            with open(full / f, "rb") as src, gzip.GzipFile(dest, "wb", 9, mtime=0) as dst:
                shutil.copyfileobj(src, dst)

        for name, pad in [("sd1", EOS), ("sd2", "!")]:
            d = write_full_clip_tokenizer(tmp / name, pad)
            tok = _load(d)
            print(name, type(tok).__name__, "pad", tok.pad_token, tok.pad_token_id)
            (ASSETS / f"clip-{name}").mkdir(parents=True, exist_ok=True)
            for f in ["tokenizer_config.json", "special_tokens_map.json"]:
                shutil.copy(d / f, ASSETS / f"clip-{name}" / f)
            expected["tokenizers"][name] = _describe(tok, PROMPTS, True)
            if name == "sd1":
                expected["random"] = _describe(
                    tok, _random_prompts(build_vocab(clip_merges()), 1500, 7), False)
            if name == "sd1" and not args.skip_unicode:
                tables = _unicode_tables(tok)
                with gzip.GzipFile(out / "unicode.json.gz", "wb", 9, mtime=0) as f:
                    f.write(json.dumps(tables, ensure_ascii=True).encode())
                print("unicode tables:", len(tables["changed"]), "changed,",
                      len(tables["classes"]), "class runs")

        for name, pad in [("tiny-sd1", EOS), ("tiny-sd2", "!")]:
            if (out / name).exists():
                shutil.rmtree(out / name)
            d = write_tiny_clip_tokenizer(out / name, pad)
            tok = _load(d)
            expected["tokenizers"][name] = _describe(tok, PROMPTS, True)

        vdir = out / "variants"
        if vdir.exists():
            shutil.rmtree(vdir)
        for name, (cfg, smap) in VARIANTS.items():
            d = _write_variant(name, cfg, smap, full, tmp / "variants")
            tok = _load(d)
            has_max = tok.model_max_length < 10**9
            expected["variants"][name] = _describe(tok, VARIANT_PROMPTS, has_max)
            (vdir / name).mkdir(parents=True, exist_ok=True)
            if cfg is not None:
                shutil.copy(d / "tokenizer_config.json", vdir / name / "tokenizer_config.json")
            if smap is not None:
                shutil.copy(d / "special_tokens_map.json", vdir / name / "special_tokens_map.json")
            if cfg is None and smap is None:
                (vdir / name / ".keep").write_text("")

        with gzip.GzipFile(out / "expected.json.gz", "wb", 9, mtime=0) as f:
            f.write(json.dumps(expected, ensure_ascii=True, indent=0).encode())
    finally:
        shutil.rmtree(tmp)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
