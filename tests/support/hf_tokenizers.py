"""Tiny Hugging Face tokenizers built locally, one per kind open_clip uses (no hub needed).

Each is trained on a small corpus with the ``tokenizers`` package, wrapped in the transformers class
the real one loads as, and saved with ``save_pretrained``: a folder open_clip's ``HFTokenizer`` (and
``clipdeploy export --tokenizer-dir``) loads exactly as it would load the hub's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
import transformers

HARD_TEXTS = (
    "a photo of a cat",
    "café au lait &amp; crème brûlée",
    "A Red Motorcycle, parked_by the road!!",
    "二つの猫 Привет مرحبا 🐱",
    "",
)

# Texts added to the training corpus so the hard corpus tokenizes into real pieces, not only UNK.
EXTRA_TRAIN: list[str] = []
TRAIN = [
    "a photo of a cat on a red sofa",
    "a dog running on the grass in the park",
    "the quick brown fox jumps over the lazy dog",
    "café au lait, crème brûlée and naïve façades",
    "二つの猫と一匹の犬 日本語のテキスト",
    "Привет мир, это тест",
    "مرحبا بالعالم",
    "emoji 🐱🐶🚀 and symbols $ % & @ # !",
    "numbers 0123456789 3.14 1,000",
] * 20


@dataclass(frozen=True)
class Kind:
    """One tokenizer kind open_clip uses, with the settings its model configs give."""

    name: str  # what the test ids say
    model: str  # "wordpiece", "bpe-bytelevel", "unigram", "bpe-gemma"
    cls: str  # the transformers class the real tokenizer loads as
    specials: tuple[str, ...]  # special tokens, in id order
    kwargs: dict = field(default_factory=dict)  # special-token roles for the transformers class
    context_length: int = 77
    clean: str = "whitespace"  # open_clip's tokenizer_kwargs clean mode
    strip_sep_token: bool = False
    used_by: str = ""


KINDS = [
    Kind("clipa-bert", "wordpiece", "BertTokenizer", ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
         dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"),
         context_length=32, strip_sep_token=True, used_by="ViT-*-CLIPA (bert-base-uncased)"),
    Kind("roberta", "bpe-bytelevel", "RobertaTokenizer", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
         dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
              pad_token="<pad>", mask_token="<mask>"), used_by="roberta-ViT-B-32, coca_roberta"),
    Kind("xlm-roberta", "unigram", "XLMRobertaTokenizer", ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
         dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
              pad_token="<pad>", mask_token="<mask>"), used_by="xlm-roberta-*, worldwide ViT-H-14 (xlm-v-base)"),
    Kind("mt5", "unigram", "T5Tokenizer", ("<pad>", "</s>", "<unk>"),
         dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>"), clean="canonicalize",
         used_by="mt5-*, worldwide ViT-L-14 (google/mt5-base, clean canonicalize)"),
    Kind("siglip-t5", "unigram", "T5Tokenizer", ("<pad>", "</s>", "<unk>"),
         dict(eos_token="</s>", pad_token="</s>", unk_token="<unk>"), context_length=64, clean="canonicalize",
         used_by="SigLIP (pad and eos share an id)"),
    Kind("siglip2-gemma", "bpe-gemma", "GemmaTokenizer", ("<pad>", "<eos>", "<bos>", "<unk>"),
         dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", add_bos_token=False,
              add_eos_token=True, padding_side="right"), context_length=64, clean="canonicalize",
         used_by="SigLIP2 (Gemma)"),
    Kind("nllb", "unigram", "NllbTokenizer", ("<s>", "<pad>", "</s>", "<unk>", "eng_Latn", "fra_Latn"),
         dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", src_lang="eng_Latn"),
         used_by="nllb-clip-*"),
]


def train(kind: Kind) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    if kind.model == "wordpiece":
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(kind.specials))
    elif kind.model == "bpe-bytelevel":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=list(kind.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind.model == "bpe-gemma":
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=list(kind.specials))
    else:
        tok = tokenizers.Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=list(kind.specials), unk_token="<unk>")
    tok.train_from_iterator(TRAIN + [t for t in EXTRA_TRAIN if t.isprintable()], trainer)
    return tok


def hf_folder(kind: Kind, root: Path) -> Path:
    """A tokenizer folder as the hub would serve it: tokenizer.json + tokenizer_config.json."""
    folder = root / kind.name
    hf = getattr(transformers, kind.cls)(tokenizer_object=train(kind), **kind.kwargs)
    hf.save_pretrained(folder)
    return folder




def by_name(name: str) -> Kind:
    return next(k for k in KINDS if k.name == name)
