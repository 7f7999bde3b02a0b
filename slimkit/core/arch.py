"""What kind of model this is: a causal LM, an encoder or a sequence classifier.

Detected from the config's architectures, never from module names, and mapped to the
transformers auto class that builds it.
"""

from __future__ import annotations

from slimkit.core.errors import SlimkitError

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
CLASSIFIER = "classifier"
KINDS = (CAUSAL_LM, ENCODER, CLASSIFIER)


def detect_kind(config, architectures: list[str] | None = None) -> str:
    """causal-lm, encoder or classifier, from the config's architectures (or the class names given)."""
    archs = list(architectures or getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return CAUSAL_LM
        if arch.endswith("ForSequenceClassification"):
            return CLASSIFIER
        if arch.endswith(("Model", "ForMaskedLM", "ForPreTraining")) and _is_encoder(config):
            return ENCODER
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if _is_encoder(config):
            return ENCODER
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return CAUSAL_LM
    raise SlimkitError(
        f"unsupported model: architecture {archs or [config.model_type]} is not a causal LM, "
        "encoder or sequence classifier; slimkit supports *ForCausalLM, encoder (BERT-like) "
        "and *ForSequenceClassification models"
    )


def _is_encoder(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "is_encoder_decoder", False)
    )


def auto_class(kind: str):
    import transformers

    return {
        CAUSAL_LM: transformers.AutoModelForCausalLM,
        ENCODER: transformers.AutoModel,
        CLASSIFIER: transformers.AutoModelForSequenceClassification,
    }[kind]
