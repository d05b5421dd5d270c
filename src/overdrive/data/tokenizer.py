"""Tokenizers: load one that exists, or train a byte-level BPE on the training text for from-scratch runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from overdrive.errors import UsageError
from overdrive.hub import quiet_logs, require_hub

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")


def load_tokenizer(
    name_or_path: str,
    trust_remote_code: bool = False,
    flag: str = "--tokenizer",
    cache_dir: str | None = None,
) -> PreTrainedTokenizerBase:
    """A saved tokenizer directory or a hub id (`flag` names the option it came from, for messages)."""
    require_hub(name_or_path, flag, cached_files=TOKENIZER_FILES)
    try:
        with quiet_logs():
            tok = AutoTokenizer.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"could not load tokenizer {name_or_path!r}: {first}; check --tokenizer/--model"
        ) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained in about a second on a few MB of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batched(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None
    )


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
