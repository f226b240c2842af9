"""Tiny random-initialised models for smoke tests and examples, built offline.

`python -m kubetune_trainer.tiny OUTPUT_DIR [--kind causal|translation]` writes a
Llama-style causal LM (hidden 64, 2 layers) or a BART-style translation model,
each with a ~1k-token byte-level BPE tokenizer trained on built-in text and a
chat template. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [
    "the",
    "a",
    "an",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "sheep",
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "orange",
    "question",
    "answer",
    "what",
    "is",
    "who",
    "where",
    "when",
    "why",
    "how",
    "many",
    "much",
    "color",
    "animal",
    "fruit",
    "number",
    "capital",
    "city",
    "river",
    "mountain",
    "sea",
    "sun",
    "moon",
    "star",
    "day",
    "night",
    "good",
    "bad",
    "big",
    "small",
    "hot",
    "cold",
    "yes",
    "no",
    "please",
    "thanks",
    "hello",
    "world",
    "model",
    "train",
    "data",
    "learn",
    "token",
    "text",
    "user",
    "assistant",
    "system",
    "says",
    "likes",
    "eats",
    "sees",
    "has",
    "runs",
    "jumps",
    "and",
    "or",
    "not",
    "but",
    "with",
    "from",
    "to",
    "of",
    "in",
    "on",
    "at",
    "paris",
    "london",
    "rome",
    "berlin",
    "madrid",
    "tokyo",
    "france",
    "england",
    "italy",
    "germany",
    "spain",
    "japan",
]


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        text.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
        text.append(f"Q: {rng.choice(WORDS)} {rng.randint(0, 999)}\nA: {rng.choice(WORDS)}")
    return text


def build_tokenizer(vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",  # pad == EOS, as in many real models
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_causal(output: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output


def build_translation(output: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=None,
    )
    model = BartForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--kind", choices=["causal", "translation"], default="causal")
    args = parser.parse_args()
    builder = build_causal if args.kind == "causal" else build_translation
    print(builder(args.output))


if __name__ == "__main__":
    main()
