"""Instruction data: prompt/completion pairs or chat conversations -> token ids whose labels cover only what the
model should learn to write (the completion; the assistant turns of a chat).

`prompt-completion` rows are tokenised as `prompt + completion` (verbatim, no separator added), `chat` rows as
the tokenizer's own chat template renders `messages` (overdrive's DEFAULT_CHAT_TEMPLATE when it has none). A
token is a target when its characters overlap the completion / an assistant turn, so a token that the
tokenizer merges across the boundary is still learned. Every example ends with EOS, is cut to the row length
(`--block-size`, alias `--max-seq-length`; a cut example loses its end, EOS included) and is then laid into
rows by overdrive.data.packing.pack_examples: one example per row (`--packing concat`) or several without
attention between them (`--packing documents`). Examples with no target token left are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from overdrive.data.loader import IGNORE_INDEX
from overdrive.data.packing import MAP_BATCH, pack_examples
from overdrive.data.sources import describe_feature, is_text
from overdrive.errors import UsageError

ROLES = ("system", "user", "assistant", "tool")
TRAINED_ROLE = "assistant"
COLUMNS = {"prompt-completion": ("prompt", "completion"), "chat": ("messages",)}

# Used when a tokenizer has no template (e.g. the BPE a from-scratch run trains): a role marker line, the
# content, EOS ending every turn (so a model learns to stop where generation stops); BOS first when the
# tokenizer has its own. Set on the tokenizer, so the run's saved and exported tokenizers carry it.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class SplitStats:
    """What tokenising one split did: examples read, cut to the row length, dropped (no target), rows made."""

    examples: int
    truncated: int
    dropped: int
    rows: int
    fill: float  # real tokens / row tokens


# -- checks ------------------------------------------------------------------------------------------------


def check_columns(split: Dataset, data_format: str, source: str) -> str:
    """The columns the format reads exist and hold the right types; returns the first of them."""
    names = split.column_names
    needed = COLUMNS[data_format]
    missing = [c for c in needed if c not in names]
    if missing:
        raise UsageError(
            f"{source} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(names)}); {_format_hint(data_format, names)}"
        )
    if data_format == "prompt-completion":
        for column in needed:
            if not is_text(split.features[column]):
                raise UsageError(
                    f"column '{column}' of {source} holds {describe_feature(split.features[column])}, not text; "
                    "--data-format prompt-completion needs text in 'prompt' and 'completion' "
                    "(conversations: --data-format chat with a 'messages' column)"
                )
    else:
        _check_messages_feature(split.features["messages"], source)
    check_rows(split, data_format, source)
    return needed[0]


def _format_hint(data_format: str, names: Sequence[str]) -> str:
    if data_format == "prompt-completion" and "messages" in names:
        return "for a 'messages' column pass --data-format chat"
    if data_format == "chat" and {"prompt", "completion"} <= set(names):
        return "for 'prompt' and 'completion' columns pass --data-format prompt-completion"
    if data_format == "chat":
        return "--data-format chat needs a 'messages' column: a list of {role, content}"
    return "--data-format prompt-completion needs 'prompt' and 'completion' text columns"


def _check_messages_feature(feature: Any, source: str) -> None:
    inner = getattr(feature, "feature", None)
    fix = 'each row\'s \'messages\' must be a list of {"role": ..., "content": "text"}'
    if not isinstance(inner, dict):
        raise UsageError(f"column 'messages' of {source} holds {describe_feature(feature)}; {fix}")
    for key in ("role", "content"):
        if key not in inner:
            raise UsageError(f"the messages of {source} have no '{key}' field; {fix}")
        if not is_text(inner[key]):
            raise UsageError(
                f"the '{key}' of the messages of {source} holds {describe_feature(inner[key])}, not text; {fix}"
            )


def check_rows(split: Dataset, data_format: str, source: str) -> None:
    """Every row's values (nulls, roles, content), numbered from 1 as in the file, before any tokenising."""
    columns = COLUMNS[data_format]
    row = 0
    for batch in split.select_columns(list(columns)).iter(batch_size=MAP_BATCH):
        for values in zip(*(batch[c] for c in columns), strict=True):
            row += 1
            if data_format == "prompt-completion":
                if not all(isinstance(v, str) for v in values):
                    raise UsageError(
                        f"row {row} of {source} has a null prompt or completion; give every row both as text"
                    )
            else:
                _check_conversation(values[0], row, source)


def _check_conversation(messages: Any, row: int, source: str) -> None:
    if not messages:
        raise UsageError(f"row {row} of {source} has no messages; give every row at least one")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UsageError(
                f'row {row} of {source} has a message without text content; give every message a "content" string'
            )
        if message.get("role") not in ROLES:
            raise UsageError(
                f"row {row} of {source} has a message with role {message.get('role')!r}; "
                f"roles are {', '.join(ROLES)}"
            )
    if messages[0]["role"] == TRAINED_ROLE:
        raise UsageError(
            f"row {row} of {source} starts with an assistant message; start each conversation with a "
            "system or user message"
        )


def _quote(messages: list[dict[str, Any]]) -> str:
    """A conversation named by its start (row numbers change once validation rows are held out)."""
    text = " ".join(messages[0]["content"].split())
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


# -- rendering and masking ---------------------------------------------------------------------------------


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a chat template overdrive's documented default."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def render_chat(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, spans: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the tokenizer's template renders it, and the character spans of assistant turns.

    A turn's span runs from the end of the conversation before it rendered with the generation prompt to the
    end of the conversation through it, so the assistant header is context and the end-of-turn is a target.
    """
    full = _render(tokenizer, messages, False)
    found: list[tuple[int, int]] = []
    for i, message in enumerate(messages if spans else ()):
        if message["role"] != TRAINED_ROLE:
            continue
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise UsageError(
                f"the tokenizer's chat template renders the conversation {_quote(messages)} differently turn by "
                "turn, so its assistant turns cannot be located; pass --train-on-prompt or another tokenizer"
            )
        found.append((len(before), len(through)))
    return full, found


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except TemplateError as exc:
        raise UsageError(
            f"the tokenizer's chat template refuses the conversation {_quote(messages)} ({exc}); fix it"
        ) from None


def encode(
    texts: list[str], spans: list[list[tuple[int, int]]], tokenizer: PreTrainedTokenizerBase, special: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids ended by EOS, which tokens are targets) per text; a target overlaps one of its spans."""
    if not texts:
        return
    encoded = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    for ids, offsets, text_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans, strict=True):
        ids, chars = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in text_spans:
            mask |= (chars[:, 0] < end) & (chars[:, 1] > start)
        if eos is not None and (not len(ids) or ids[-1] != eos):
            ids = np.append(ids, eos)
            mask = np.append(mask, len(mask) > 0 and mask[-1])  # EOS ends the completion: learned when it is
        yield ids, mask


def labels_for(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Targets keep their id; the first token never is one (nothing in its example precedes it)."""
    labels = np.where(mask, ids, IGNORE_INDEX)
    labels[:1] = IGNORE_INDEX
    return labels


# -- datasets ----------------------------------------------------------------------------------------------


def example_rows(
    batch: dict[str, list[Any]],
    data_format: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    train_on_prompt: bool,
) -> dict[str, list[Any]]:
    """One row per example: ids and labels cut to `block_size`, its length, whether it was cut, its targets."""
    texts, spans, special = _texts_and_spans(batch, data_format, tokenizer, train_on_prompt)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "targets": []}
    for ids, mask in encode(texts, spans, tokenizer, special):
        labels = labels_for(ids[:block_size], mask[:block_size])
        out["input_ids"].append(ids[:block_size].tolist())
        out["labels"].append(labels.tolist())
        out["length"].append(len(labels))
        out["truncated"].append(len(ids) > block_size)
        out["targets"].append(int(np.sum(labels != IGNORE_INDEX)))
    return out


def _texts_and_spans(
    batch: dict[str, list[Any]], data_format: str, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool
) -> tuple[list[str], list[list[tuple[int, int]]], bool]:
    """The text of each example (rows checked by check_rows), its target character spans, whether the
    tokenizer adds its special tokens (BOS) as for plain text."""
    texts, spans = [], []
    if data_format == "prompt-completion":
        for prompt, completion in zip(batch["prompt"], batch["completion"], strict=True):
            texts.append(prompt + completion)
            spans.append([(0 if train_on_prompt else len(prompt), len(texts[-1]))])
        return texts, spans, True
    for messages in batch["messages"]:
        clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text, found = render_chat(clean, tokenizer, not train_on_prompt)
        texts.append(text)
        spans.append([(0, len(text))] if train_on_prompt else found)
    return texts, spans, False  # the template writes its own special tokens, as apply_chat_template tokenises


def tokenizer_texts(split: Dataset, data_format: str) -> Iterator[str]:
    """Text to train a BPE on when the run has no tokenizer (role markers as the default template writes them)."""
    if data_format == "prompt-completion":
        for prompt, completion in zip(split["prompt"], split["completion"], strict=True):
            yield (prompt or "") + (completion or "")
        return
    for messages in split["messages"]:
        yield "".join(f"<|{m.get('role')}|>\n{m.get('content') or ''}" for m in messages or ())


def build_instruction_datasets(
    raw: DatasetDict,
    data_format: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    packing: str,
    train_on_prompt: bool,
) -> tuple[DatasetDict, dict[str, SplitStats]]:
    """Raw instruction splits -> rows of `block_size` tokens and, per split, what tokenising did."""
    if not tokenizer.is_fast:
        raise UsageError("instruction data needs a fast (Rust) tokenizer to locate completions; pass one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    rows, stats = {}, {}
    for name, split in raw.items():
        examples = split.map(
            example_rows,
            batched=True,
            batch_size=MAP_BATCH,
            remove_columns=split.column_names,
            fn_kwargs={
                "data_format": data_format,
                "tokenizer": tokenizer,
                "block_size": block_size,
                "train_on_prompt": train_on_prompt,
            },
            desc=f"tokenize {data_format} {name}",
        )
        rows[name] = examples.map(
            _pack_batch,
            batched=True,
            batch_size=MAP_BATCH,
            remove_columns=examples.column_names,
            fn_kwargs={"block_size": block_size, "pad_id": pad, "packing": packing},
            desc=f"pack ({packing}) {name}",
        )
        stats[name] = split_stats(examples, rows[name], block_size)
        if len(rows[name]) == 0:
            raise UsageError(
                f"no example of the {name} data has a completion token within {block_size} tokens (prompts "
                "fill the rows, or completions are empty); raise --block-size or check the data"
            )
    return DatasetDict(rows), stats


def _pack_batch(
    batch: dict[str, list[Any]], block_size: int, pad_id: int, packing: str
) -> dict[str, list[list[int]]]:
    keep = [i for i, n in enumerate(batch["targets"]) if n > 0]
    ids = [batch["input_ids"][i] for i in keep]
    labels = [batch["labels"][i] for i in keep]
    return pack_examples(ids, labels, block_size, pad_id, packing)


def split_stats(examples: Dataset, rows: Dataset, block_size: int) -> SplitStats:
    """Counts from the per-example columns (read as arrays, not as Python lists of token ids)."""
    columns = examples.select_columns(["length", "truncated", "targets"]).with_format("numpy")[:]
    length, truncated, targets = columns["length"], columns["truncated"], columns["targets"]
    return SplitStats(
        examples=len(examples),
        truncated=int(np.sum(truncated)),
        dropped=int(np.sum(targets == 0)),
        rows=len(rows),
        fill=float(np.sum(length[targets > 0])) / (len(rows) * block_size) if len(rows) else 0.0,
    )


def describe(stats: dict[str, SplitStats], data_format: str, block_size: int, train_on_prompt: bool) -> str:
    """One log line: examples, rows, how full they are, and how many were cut or dropped."""
    loss = "prompt and completion" if train_on_prompt else "completions only"
    parts = [
        f"{name} {s.examples} examples -> {s.rows} rows ({s.fill:.0%} filled), {s.truncated} truncated to "
        f"{block_size} tokens, {s.dropped} dropped (no completion token within {block_size})"
        for name, s in stats.items()
    ]
    return f"{data_format} data, loss on {loss}: " + "; ".join(parts)
