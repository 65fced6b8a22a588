"""Architecture configs of the Hugging Face text towers open_clip uses, so they build without the hub.

open_clip builds an HF text tower with ``AutoConfig.from_pretrained(hf_model_name)``, which needs
the hub even for random weights or a local checkpoint. These are the published ``config.json``
values that decide the architecture; weights always come from the open_clip checkpoint (or are
random), and a strict state-dict load checks every shape against them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from clipdeploy.artifact.manifest import atomic_write_text

_ROBERTA = {
    "architectures": ["RobertaForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 514,
    "model_type": "roberta",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "type_vocab_size": 1,
    "vocab_size": 50265,
}
_XLM_ROBERTA_BASE = {
    **_ROBERTA,
    "architectures": ["XLMRobertaForMaskedLM"],
    "model_type": "xlm-roberta",
    "position_embedding_type": "absolute",
    "vocab_size": 250002,
}
_XLM_ROBERTA_LARGE = {
    **_XLM_ROBERTA_BASE,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
}
_MT5_BASE = {
    "architectures": ["MT5ForConditionalGeneration"],
    "d_ff": 2048,
    "d_kv": 64,
    "d_model": 768,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "mt5",
    "num_decoder_layers": 12,
    "num_heads": 12,
    "num_layers": 12,
    "pad_token_id": 0,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "tokenizer_class": "T5Tokenizer",
    "vocab_size": 250112,
}
_MT5_XL = {**_MT5_BASE, "d_ff": 5120, "d_model": 2048, "num_heads": 32, "num_layers": 24, "num_decoder_layers": 24}
_NLLB_600M = {
    "architectures": ["M2M100ForConditionalGeneration"],
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "attention_dropout": 0.1,
    "bos_token_id": 0,
    "d_model": 1024,
    "decoder_attention_heads": 16,
    "decoder_ffn_dim": 4096,
    "decoder_layerdrop": 0,
    "decoder_layers": 12,
    "decoder_start_token_id": 2,
    "dropout": 0.1,
    "encoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "encoder_layerdrop": 0,
    "encoder_layers": 12,
    "eos_token_id": 2,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "max_length": 200,
    "max_position_embeddings": 1024,
    "model_type": "m2m_100",
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "scale_embedding": True,
    "tokenizer_class": "NllbTokenizer",
    "vocab_size": 256206,
}
_NLLB_13B = {**_NLLB_600M, "decoder_ffn_dim": 8192, "encoder_ffn_dim": 8192, "decoder_layers": 24,
             "encoder_layers": 24, "num_hidden_layers": 24}

CONFIGS: dict[str, dict[str, Any]] = {
    "roberta-base": _ROBERTA,
    "xlm-roberta-base": _XLM_ROBERTA_BASE,
    "xlm-roberta-large": _XLM_ROBERTA_LARGE,
    "google/mt5-base": _MT5_BASE,
    "google/mt5-xl": _MT5_XL,
    "facebook/nllb-200-distilled-600M": _NLLB_600M,
    "facebook/nllb-200-distilled-1.3B": _NLLB_13B,
}


def bundled_config_dir(hf_model_name: str) -> Path | None:
    """A local folder holding ``config.json`` for ``hf_model_name``, or None when none is bundled."""
    cfg = CONFIGS.get(hf_model_name)
    if cfg is None:
        return None
    root = Path(tempfile.gettempdir()) / "clipdeploy-hf-configs" / hf_model_name.replace("/", "--")
    path = root / "config.json"
    text = json.dumps(cfg, indent=2, sort_keys=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return root
