"""Instruction data: completion-only labels, chat templates, packing without cross-attention, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from overdrive.cli import main
from overdrive.data.instruction import (
    DEFAULT_CHAT_TEMPLATE,
    build_instruction_datasets,
    describe,
    ensure_chat_template,
)
from overdrive.data.loader import IGNORE_INDEX, collate
from overdrive.data.packing import best_fit_decreasing, pack_examples
from overdrive.data.sources import embedded_texts
from overdrive.data.tokenizer import train_bpe
from overdrive.errors import UsageError
from tests.conftest import MICRO_LLAMA, cli_error, micro_args

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]
# a ChatML-style template with its own control tokens, as instruct tokenizers ship them
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return train_bpe(embedded_texts()[:60], vocab_size=600)


@pytest.fixture(scope="module")
def chatml(bpe: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """A fresh copy of the BPE with ChatML control tokens and template (the fixture `bpe` stays template-free)."""
    path = tmp_path_factory.mktemp("chatml")
    bpe.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def targets(row: dict, tok: PreTrainedTokenizerFast) -> str:
    """The text of the tokens that carry a label."""
    return tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


def build(tok, data_format: str, columns: dict, block_size: int = 128, packing: str = "concat", **kw):
    raw = DatasetDict({"train": Dataset.from_dict(columns)})
    return build_instruction_datasets(
        raw, data_format, tok, block_size, packing, kw.get("train_on_prompt", False)
    )


# -- labels --------------------------------------------------------------------------------------------------


def test_only_completion_tokens_carry_labels(bpe) -> None:
    prompt, completion = "Question: what is two plus two?\nAnswer:", " four, said the model."
    lm, _ = build(bpe, "prompt-completion", {"prompt": [prompt], "completion": [completion]})
    row = lm["train"][0]
    ids = bpe(prompt + completion)["input_ids"] + [bpe.eos_token_id]
    n_prompt = len(bpe(prompt)["input_ids"])
    assert row["input_ids"][: len(ids)] == ids
    assert set(row["labels"][:n_prompt]) == {IGNORE_INDEX}
    assert row["labels"][n_prompt : len(ids)] == ids[n_prompt:]  # the completion and the closing EOS
    assert set(row["labels"][len(ids) :]) == {IGNORE_INDEX}  # padding
    assert targets(row, bpe) == completion + bpe.eos_token

    lm, _ = build(
        bpe, "prompt-completion", {"prompt": [prompt], "completion": [completion]}, train_on_prompt=True
    )
    assert lm["train"][0]["labels"][: len(ids)] == [IGNORE_INDEX, *ids[1:]]


def test_token_merged_across_the_boundary_is_a_target(bpe) -> None:
    """A prompt ending in a space: the BPE merges it into the completion's first word, which is still learned."""
    lm, _ = build(bpe, "prompt-completion", {"prompt": ["Answer: "], "completion": ["yes"]})
    assert targets(lm["train"][0], bpe) == " yes" + bpe.eos_token


def test_chat_labels_only_assistant_turns(bpe, chatml) -> None:
    ensure_chat_template(bpe_copy := train_bpe(["Answer in one word."] * 10, vocab_size=300))
    for tok, expected in (
        (bpe_copy, f"Four.{bpe_copy.eos_token}Six.{bpe_copy.eos_token}"),
        (chatml, "Four.<|im_end|>\nSix.<|im_end|>\n<|endoftext|>"),
    ):
        lm, _ = build(tok, "chat", {"messages": [CONVERSATION]})
        assert targets(lm["train"][0], tok) == expected
        lm, _ = build(tok, "chat", {"messages": [CONVERSATION]}, train_on_prompt=True)
        row = lm["train"][0]
        n = sum(t != tok.pad_token_id for t in row["input_ids"])
        assert all(label != IGNORE_INDEX for label in row["labels"][1:n])


def test_chat_renders_as_the_tokenizers_own_template(bpe, chatml) -> None:
    """Token ids equal apply_chat_template's (then EOS): ChatML with control tokens, and the default template."""
    default = train_bpe(embedded_texts()[:20], vocab_size=400)
    ensure_chat_template(default)
    assert default.chat_template == DEFAULT_CHAT_TEMPLATE
    for tok in (chatml, default):
        lm, _ = build(tok, "chat", {"messages": [CONVERSATION]}, block_size=256)
        reference = tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
        if reference[-1] != tok.eos_token_id:
            reference = [*reference, tok.eos_token_id]
        assert lm["train"][0]["input_ids"][: len(reference)] == reference
    ensure_chat_template(chatml)  # a tokenizer's own template is kept
    assert chatml.chat_template == CHATML


def test_default_template_travels_with_the_saved_tokenizer(tmp_path) -> None:
    tok = train_bpe(embedded_texts()[:10], vocab_size=300)
    assert not tok.chat_template
    ensure_chat_template(tok)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_truncation_and_dropped_examples_are_counted(bpe) -> None:
    short = ("Say hi:", " hi")
    long_completion = ("Tell a story:", " once upon a time" * 40)
    long_prompt = ("Read this: " + "words and more words " * 40, " ok")
    pairs = [short, long_completion, long_prompt, short]
    columns = {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
    lm, stats = build(bpe, "prompt-completion", columns, block_size=32)
    s = stats["train"]
    assert (s.examples, s.truncated, s.dropped, s.rows) == (
        4,
        2,
        1,
        3,
    )  # the long prompt leaves no completion
    assert all(len(r) == 32 for r in lm["train"]["input_ids"])
    line = describe(stats, "prompt-completion", 32, False)
    assert "4 examples" in line and "2 truncated to 32 tokens" in line and "1 dropped" in line
    assert "\n" not in line


# -- packing -------------------------------------------------------------------------------------------------


def test_best_fit_decreasing_fills_bins_without_overflow() -> None:
    lengths = [7, 3, 9, 2, 5, 5, 1, 8, 4, 6, 10, 2]
    bins = best_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == -(-sum(lengths) // 10)  # these lengths pack perfectly


def test_pack_examples_restarts_positions_and_masks_padding() -> None:
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5], [IGNORE_INDEX, IGNORE_INDEX, 8, 9]]
    out = pack_examples(ids, labels, block_size=6, pad_id=0, packing="documents")
    assert out["input_ids"] == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert out["position_ids"] == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert out["labels"][1] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    single = pack_examples(ids, labels, block_size=6, pad_id=0, packing="concat")
    assert single["input_ids"] == [[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [6, 7, 8, 9, 0, 0]]
    assert "position_ids" not in single


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(bpe, attn: str) -> None:
    """Logits of example B alone equal B's logits packed after A (fp32, within 1e-5)."""
    torch.manual_seed(0)
    # as overdrive builds models: no KV cache (HF reads packed sequences from position_ids only without one)
    config = LlamaConfig(**{**MICRO_LLAMA, "vocab_size": len(bpe)}, attn_implementation=attn, use_cache=False)
    model = LlamaForCausalLM(config)
    model.eval()
    pairs = {"prompt": ["Question: what is the capital of France?\nAnswer:", "Q: 2+2?\nA:"]}
    pairs["completion"] = [" Paris, the largest city of the country.", " 4"]
    lm, _ = build(bpe, "prompt-completion", pairs, block_size=96, packing="documents")
    assert len(lm["train"]) == 1  # both examples in one row
    row = lm["train"][0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    a_len, b_len = starts[1], starts[2] - starts[1]  # A, then B, then the padding
    batch = collate(lm["train"][:1])
    b = batch["input_ids"][:, a_len : a_len + b_len]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=b).logits
        leaky = model(input_ids=batch["input_ids"]).logits  # no restart: B sees A
    torch.testing.assert_close(packed[:, a_len : a_len + b_len], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        packed[:, :a_len], model(input_ids=batch["input_ids"][:, :a_len]).logits, rtol=0, atol=1e-5
    )
    assert (leaky[:, a_len : a_len + b_len] - alone).abs().max() > 1e-3  # the check can fail


# -- end to end ----------------------------------------------------------------------------------------------


def instruction_rows(n: int) -> list[tuple[str, str]]:
    """Prompt/completion pairs from real English: a topic's first sentence -> the sentence after it."""
    pairs = []
    for doc in embedded_texts():
        sentences = [s.strip() for s in doc.replace("\n", " ").split(". ") if len(s.strip()) > 20]
        pairs += [
            (f"Continue: {a}.\nNext:", f" {b}.") for a, b in zip(sentences, sentences[1:], strict=False)
        ]
        if len(pairs) >= n:
            return pairs[:n]
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_prompt_completion_run_end_to_end(micro_config, tmp_path, capsys) -> None:
    data = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in instruction_rows(300)]
    )
    out = tmp_path / "run"
    argv = micro_args(micro_config, data, out, "--data-format", "prompt-completion", "--packing", "documents")
    argv = [a for a in argv if a != "--quiet"]  # keep the data report line
    argv += [
        "--max-steps",
        "8",
        "--logging-steps",
        "1",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
    ]
    argv += ["--learning-rate", "1e-2"]
    assert main(argv) == 0
    losses = read_losses(out)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    err = capsys.readouterr().err
    report = [
        line for line in err.splitlines() if line.startswith("prompt-completion data, loss on completions")
    ]
    assert len(report) == 1 and "truncated to 64 tokens" in report[0]


def test_chat_run_exports_the_default_template(micro_config, tmp_path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
        for p, c in instruction_rows(200)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    argv = micro_args(micro_config, data, out, "--data-format", "chat", "--max-steps", "3")
    argv += ["--global-batch-size", "4", "--micro-batch-size", "4", "--max-seq-length", "96"]
    assert main(argv) == 0
    config = (out / "config.yaml").read_text()
    assert "data_format: chat" in config and "block_size: 96" in config  # --max-seq-length is the row length
    for saved in (out / "tokenizer", out / "final"):
        assert AutoTokenizer.from_pretrained(saved).chat_template == DEFAULT_CHAT_TEMPLATE
    assert all(torch.isfinite(torch.tensor(read_losses(out))))


# -- bad input -----------------------------------------------------------------------------------------------

BAD_ROWS = {
    "missing-completion": ("prompt-completion", [{"prompt": "a", "answer": "b"}], "no 'completion' column"),
    "messages-for-pc": (
        "prompt-completion",
        [{"messages": [{"role": "user", "content": "a"}]}],
        "--data-format chat",
    ),
    "pc-for-chat": ("chat", [{"prompt": "a", "completion": "b"}], "--data-format prompt-completion"),
    "number-prompt": (
        "prompt-completion",
        [{"prompt": 1, "completion": "b"}] * 2,
        "holds int64 numbers, not text",
    ),
    "list-prompt": ("prompt-completion", [{"prompt": ["a"], "completion": "b"}] * 2, "holds lists, not text"),
    "null-completion": (
        "prompt-completion",
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}],
        "null prompt or completion",
    ),
    "text-messages": ("chat", [{"messages": "hello"}] * 2, "must be a list of"),
    "unknown-role": (
        "chat",
        [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "bot", "content": "hi"}]}],
        "row 2 of *has a message with role 'bot'; roles are system, user, assistant, tool",
    ),
    "list-content": ("chat", [{"messages": [{"role": "user", "content": ["x"]}]}] * 2, "not text"),
    "no-content": ("chat", [{"messages": [{"role": "user", "text": "x"}]}] * 2, "no 'content' field"),
    "assistant-first": (
        "chat",
        [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}] * 2,
        "starts with an assistant message",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_instruction_rows_fail_with_one_line(case, micro_config, tmp_path, capsys) -> None:
    data_format, rows, expected = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    argv = micro_args(
        micro_config, data, out, "--data-format", data_format, "--validation-split-percentage", "0"
    )
    err = cli_error(argv, capsys)
    assert all(part in err for part in expected.split("*")), err
    assert not out.exists()


def test_bad_flag_combinations_fail_with_one_line(micro_config, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    data = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "completion": "b"}])
    cases = [
        (micro_args(micro_config, text_file, out, "--data-format", "chat"), "is plain text"),
        (["train", "--data-format", "prompt-completion", "--output-dir", str(out)], "needs --train-file"),
        (micro_args(micro_config, text_file, out, "--train-on-prompt"), "applies to instruction data"),
        (
            micro_args(
                micro_config, data, out, "--data-format", "prompt-completion", "--text-column", "prompt"
            ),
            "--text-column does not apply",
        ),
    ]
    for argv, expected in cases:
        assert expected in cli_error(argv, capsys)
    assert not out.exists()


def test_template_that_rewrites_earlier_turns_is_refused(bpe, tmp_path) -> None:
    """Assistant turns cannot be located when earlier turns render differently later (thinking-stripping style)."""
    bpe.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    )
    with pytest.raises(UsageError, match="differently turn by turn.*--train-on-prompt"):
        build(tok, "chat", {"messages": [CONVERSATION]})
    lm, _ = build(tok, "chat", {"messages": [CONVERSATION]}, train_on_prompt=True)
    assert len(lm["train"]) == 1
