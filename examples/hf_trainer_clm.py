"""The minimal change that makes an HF ``Trainer`` causal-LM script use overdrive.

Runs offline on CPU in seconds: the model is a tiny Llama built from a config and the data are
synthetic "documents" (noisy arithmetic progressions over a 512-token vocabulary), so no hub access
is needed. The overdrive-specific lines are marked ``# <- overdrive``; everything else is a plain
``run_clm.py``-style script::

    PYTHONPATH=src python examples/hf_trainer_clm.py --max-steps 20
    PYTHONPATH=src python examples/hf_trainer_clm.py --max-steps 20 --no-overdrive   # compare
    PYTHONPATH=src python examples/hf_trainer_clm.py --packing --compile regional --bf16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    LlamaConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

import overdrive  # <- overdrive
from overdrive.hf import OverdriveCallback  # <- overdrive (only needed for compile/checkpointing)

VOCAB = 512


class SyntheticDocs(Dataset):
    """Variable-length token documents: ``start + step * i (mod VOCAB)`` with 5% random tokens."""

    def __init__(self, n_docs: int, min_len: int, max_len: int, fixed_len: bool, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.docs = []
        for _ in range(n_docs):
            length = max_len if fixed_len else int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            start, step = torch.randint(0, VOCAB, (2,), generator=g).tolist()
            doc = (start + (step % 7 + 1) * torch.arange(length)) % VOCAB
            noise = torch.rand(length, generator=g) < 0.05
            doc[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
            self.docs.append(doc)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.docs[i].tolist()
        return {"input_ids": ids, "labels": list(ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--no-overdrive", action="store_true", help="plain HF, for comparison")
    p.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    p.add_argument(
        "--packing", action="store_true", help="flatten variable-length docs (position_ids restart)"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args()

    if not args.no_overdrive:
        overdrive.patch_transformers()  # <- overdrive: every supported model built from now on is patched

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = AutoModelForCausalLM.from_config(config)  # from_pretrained(...) works the same way

    data = SyntheticDocs(n_docs=512, min_len=16, max_len=128, fixed_len=not args.packing)
    collator = DataCollatorWithFlattening() if args.packing else default_data_collator
    callbacks = []
    if not args.no_overdrive and args.compile != "none":
        callbacks.append(OverdriveCallback(compile=args.compile))  # <- overdrive: regional/full compile

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="overdrive-example-")
    training_args = TrainingArguments(
        output_dir=out_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=2,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data, data_collator=collator, callbacks=callbacks
    )
    start = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - start
    patched = type(model.model.norm).__module__.startswith("overdrive")
    print(
        f"overdrive={'on' if patched else 'off'} compile={args.compile} packing={args.packing} bf16={args.bf16}: "
        f"final train loss {result.training_loss:.4f} over {args.max_steps} steps in {elapsed:.1f}s"
    )


if __name__ == "__main__":
    main()
