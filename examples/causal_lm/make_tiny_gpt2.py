"""Write a tiny GPT-2 and its tokenizer into a directory, offline, for the causal-LM example.

    python examples/causal_lm/make_tiny_gpt2.py              # -> examples/causal_lm/tiny-gpt2/
    python examples/causal_lm/make_tiny_gpt2.py OTHER_DIR

The tokenizer is a byte-level BPE trained on Debian's fortunes in about a second; the model
(2 blocks, width 64, 128 positions) starts from random weights, so the example exercises the
pipeline, not a pretrained model's LR. For a real one, point the job's ``task.model`` at any local
decoder directory (``save_pretrained`` output) or, online, a hub id such as ``gpt2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

EOS = "<|endoftext|>"


def build(directory: str | Path, *, vocab_size: int = 512, n_positions: int = 128, seed: int = 0) -> Path:
    """Train the tokenizer, build the model and ``save_pretrained`` both into ``directory``.

    Args:
        directory: where to write (created if missing).
        vocab_size: BPE vocabulary size, end-of-text included.
        n_positions: the longest sequence the model and tokenizer accept.
        seed: initialises the model's weights.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`, loadable with ``AutoModelForCausalLM`` and
        ``AutoTokenizer``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from lrsearch.tasks.text import load_texts

    texts, _ = load_texts("fortunes", None, "text")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    # GPT-2 has no pad token: pad with end-of-text (the attention mask tells them apart)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        pad_token=EOS, model_max_length=n_positions)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_layer=2, n_head=2, n_embd=64,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-gpt2"
    print(f"wrote {build(target)}")
