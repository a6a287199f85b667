"""A tiny random CSM checkpoint in the exact hub layout of ``sesame/csm-1b``.

``python -m companion.testing.tiny_checkpoint DIR [--codebooks N] [--seed S]`` writes config.json,
generation_config.json, model.safetensors, tokenizer files (a byte-level BPE trained here), the
processor files (preprocessor_config.json and the chat template) to DIR. The result loads with
``CsmForConditionalGeneration.from_pretrained(DIR)`` and ``CsmProcessor.from_pretrained(DIR)``, the
same calls that load the real model. The Mimi codec keeps the real strides (24 kHz, 1920 samples per
frame) so the processor's audio-token counts are right; everything else is shrunk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The CSM special tokens, in the order the real Llama-3 tokenizer numbers them (128000..128003).
BOS, EOS, AUDIO, AUDIO_EOS = "<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS = [BOS, EOS, AUDIO, AUDIO_EOS]
AUDIO_VOCAB = 2048  # csm-1b has 2051 (Mimi needs a power of 2 and must decode every code CSM can emit)
BPE_VOCAB = 400  # byte-level BPE: 256 bytes + merges

# The processor chat template of csm-1b: every turn is "<bos>[speaker]text<eos>", context turns add
# "<|AUDIO|><|audio_eos|>" (the processor expands <|AUDIO|> to one token per Mimi frame).
CHAT_TEMPLATE = """
{%- for message in messages %}
    {%- if not message['role'] is string or not message['role'].isdigit() %}
        {{- raise_exception("The role must be an integer or a stringified integer (e.g. '0') designating the speaker id") }}
    {%- endif %}
    {%- set content = message['content'] %}
    {%- if content is not iterable or content is string %}
        {{- raise_exception("The content must be a list") }}
    {%- endif %}
    {%- set content_types = content | map(attribute='type') | list %}
    {%- if loop.last %}
        {%- if 'text' not in content_types %}
            {{- raise_exception("The last message must include one item of type 'text'") }}
        {%- elif (content_types | select('equalto', 'text') | list | length > 1) or (content_types | select('equalto', 'audio') | list | length > 1) %}
            {{- raise_exception("At most two items are allowed in the last message: one 'text' and one 'audio'") }}
        {%- endif %}
    {%- else %}
        {%- if content_types | select('equalto', 'text') | list | length != 1
              or content_types | select('equalto', 'audio') | list | length != 1 %}
            {{- raise_exception("Each message (except the last) must contain exactly one 'text' and one 'audio' item") }}
        {%- elif content_types | reject('in', ['text', 'audio']) | list | length > 0 %}
            {{- raise_exception("Only 'text' and 'audio' types are allowed in content") }}
        {%- endif %}
    {%- endif %}
{%- endfor %}

{%- for message in messages %}
    {{- bos_token }}
    {{- '[' + message['role'] + ']' }}
    {{- message['content'][0]['text'] }}
    {{- eos_token }}
    {%- if message['content']|length > 1 %}
        {{- '<|AUDIO|><|audio_eos|>' }}
    {%- endif %}
{%- endfor %}
"""

# Text the tokenizer is trained on: enough English, digits and punctuation for test prompts.
_CORPUS = [
    "Hello from Sesame. How are you today? I am fine, thank you very much!",
    "The quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9.",
    "It's a quarter past ten, and the weather is warm (about 21 degrees).",
    "[0]Good morning, everyone. [1]Good morning to you, too.",
    "We met at the station, talked for an hour, and then walked home together.",
    "Numbers like 3.14, 42 and 1,000 are read aloud; so are dates such as 2024-05-01.",
]

_ROPE = {  # csm-1b uses llama3 RoPE scaling in both transformers
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained in-process, with the CSM special tokens appended after the BPE ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Step 1: train a small byte-level BPE on the corpus (deterministic: one thread, fixed data).
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Step 2: the special tokens get the ids after the BPE vocabulary.
    tok.add_special_tokens(SPECIAL_TOKENS)
    # Step 3: like csm-1b's (Llama 3's) tokenizer, encoding with special tokens starts with <bos>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=131072
    )


def build_config(tokenizer, codebooks: int):  # -> CsmConfig
    """A shrunk CsmConfig whose ids match ``tokenizer`` and whose Mimi keeps the real strides."""
    from transformers import CsmConfig, CsmDepthDecoderConfig, MimiConfig

    codec = MimiConfig(
        hidden_size=32, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
        codebook_size=AUDIO_VOCAB, codebook_dim=16, vector_quantization_hidden_dimension=16,
        num_quantizers=codebooks, num_semantic_quantizers=1, upsample_groups=32,
        num_hidden_layers=2, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        sliding_window=250, use_cache=False,
    )  # fmt: skip
    depth = CsmDepthDecoderConfig(
        num_codebooks=codebooks, backbone_hidden_size=64, vocab_size=AUDIO_VOCAB, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=codebooks + 1, rope_parameters=dict(_ROPE),
    )  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    return CsmConfig(
        num_codebooks=codebooks, vocab_size=AUDIO_VOCAB, text_vocab_size=len(tokenizer),
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_parameters=dict(_ROPE),
        bos_token_id=ids(BOS), pad_token_id=ids(AUDIO), audio_token_id=ids(AUDIO),
        audio_eos_token_id=ids(AUDIO_EOS), codebook_pad_token_id=AUDIO_VOCAB - 1, codebook_eos_token_id=0,
        tie_codebooks_embeddings=True, depth_decoder_config=depth.to_dict(), codec_config=codec.to_dict(),
    )  # fmt: skip


def write_tiny_checkpoint(out_dir: str | Path, *, codebooks: int = 32, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (created if needed) and return its path."""
    import torch
    from transformers import CsmForConditionalGeneration, CsmProcessor, EncodecFeatureExtractor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Step 1: tokenizer and config (ids of the special tokens come from the tokenizer).
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, codebooks)
    # Step 2: random weights from a fixed seed, the way transformers initialises them.
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(config).eval()
    # Step 2b: transformers starts Mimi's codebooks at zero, which would decode every code to the same
    # sound; random centroids make encode and decode depend on the audio and the codes, as in the real model.
    with torch.no_grad():
        for module in model.codec_model.modules():
            if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
                module.embed_sum.normal_(std=0.1)
                module._embed = None  # the cached embed table is derived from embed_sum
        _scale_codec_output(model.codec_model, target_std=0.15)
    # Step 3: the sampling defaults of csm-1b (the depth decoder's are saved with a depth_decoder_ prefix).
    for gen in (model.generation_config, model.depth_decoder.generation_config):
        gen.do_sample, gen.temperature, gen.top_k = True, 0.9, 50
    model.generation_config.max_new_tokens = 125
    model.save_pretrained(out)
    # Step 4: processor = tokenizer + Mimi feature extractor + chat template.
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0)
    CsmProcessor(
        feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    ).save_pretrained(out)
    _rewrite_in_hub_layout(out, extractor)
    return out


def _scale_codec_output(codec, target_std: float) -> None:
    """Scale Mimi's last convolution so random codes decode to speech-like levels (std ``target_std``)
    instead of a random decoder's clipped noise (std ~3), leaving room for gain, watermark and mixing."""
    import torch

    last = codec.decoder.decoder_seanet.layers[-1].conv  # Conv1d(C, 1): the waveform projection
    codes = torch.randint(0, codec.config.codebook_size, (1, codec.config.num_quantizers, 25))
    std = float(codec.decode(codes).audio_values.std())
    last.weight.mul_(target_std / std)
    if last.bias is not None:
        last.bias.mul_(target_std / std)


def _rewrite_in_hub_layout(out: Path, extractor) -> None:
    """Lay the processor files out as the csm-1b repo does: preprocessor_config.json for the feature
    extractor, tokenizer_config.json naming PreTrainedTokenizerFast, and special_tokens_map.json."""
    (out / "processor_config.json").unlink(missing_ok=True)
    extractor.save_pretrained(out)  # preprocessor_config.json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m companion.testing.tiny_checkpoint",
        description="Write a tiny random CSM checkpoint in the hub layout of sesame/csm-1b.",
    )
    parser.add_argument("dir", type=Path, help="output directory")
    parser.add_argument("--codebooks", type=int, default=32, help="number of Mimi codebooks (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    args = parser.parse_args(argv)
    if args.codebooks < 2:
        parser.error("--codebooks must be at least 2")
    out = write_tiny_checkpoint(args.dir, codebooks=args.codebooks, seed=args.seed)
    print(f"wrote a tiny CSM checkpoint ({args.codebooks} codebooks, seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
