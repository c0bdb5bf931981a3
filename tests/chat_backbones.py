"""Tiny Llama- and Qwen2-shaped causal LMs built from a config (no download) whose tokenizers look
like the real ones: pad == eos, no bos, and a ChatML chat template.

* ``smollm2``: Llama shape, eos = pad = ``<|im_end|>`` (SmolLM2-Instruct): the end-of-turn IS eos;
* ``qwen2.5``: Qwen2 shape, eos = pad = ``<|endoftext|>`` (Qwen2.5 base): the template's end-of-turn
  ``<|im_end|>`` is another token;
* ``nopad``: Llama shape, eos ``<|endoftext|>`` and no pad token at all (as Llama 3 ships):
  `load_tokenizer` adds ``<pad>`` and the model needs one more embedding row.
"""
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STYLES = {"smollm2": ("llama", "<|im_end|>", "same"), "qwen2.5": ("qwen2", "<|endoftext|>", "same"),
          "nopad": ("llama", "<|endoftext|>", None)}
CORPUS = [f"{who}: a {size} {drink} with {milk} milk please, thanks" for who in ("User", "Human", "Customer", "Agent")
          for size in ("small", "large", "medium") for drink in ("latte", "mocha", "flat white")
          for milk in ("oat", "soy")] + ["Sure, one iced coffee coming up. Hot or iced? I want a coffee. Iced, please.",
                                         'CALL get_menu_items {"query": "latte"} API: -> {"items": []}', "user assistant system"]


def build_tokenizer(out_dir: Path, eos: str, pad: str | None = "same", extra_specials: tuple = ()):
    """A byte-level BPE with ChatML specials; `pad="same"` sets pad = eos, None leaves it unset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + list(extra_specials)
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    kwargs = {"pad_token": eos} if pad == "same" else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos,
                                   additional_special_tokens=[s for s in specials if s != eos], **kwargs)
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def build_chat_backbone(out_dir: Path, style: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    arch, eos, pad = STYLES[style]
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir, eos, pad)
    shape = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                 tie_word_embeddings=True)
    config = LlamaConfig(**shape) if arch == "llama" else Qwen2Config(**shape)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return str(out_dir)
