"""--neftune-noise-alpha: uniform noise of bound alpha/sqrt(L·d) on the training embeddings, none in eval or
generation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.cli import main
from overdrive.metrics import read_metrics
from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference
from overdrive.train.neftune import apply_neftune, neftune_scale
from tests.conftest import MICRO_LLAMA, cli_error, micro_args

ALPHA = 5.0
BATCH, SEQ, HIDDEN = 4, 64, MICRO_LLAMA["hidden_size"]


def micro_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MICRO_LLAMA))


def input_ids() -> torch.Tensor:
    return torch.randint(
        0, MICRO_LLAMA["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3)
    )


def embedding_noise(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """What the decoder receives minus the clean embedding lookup (a hook registered after NEFTune's)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0] - model.get_input_embeddings().weight.detach()[ids]


def test_training_embeddings_get_uniform_noise_of_the_stated_bound() -> None:
    model = micro_model().train()
    apply_neftune(model, ALPHA)
    noise = embedding_noise(model, input_ids())
    bound = ALPHA / math.sqrt(SEQ * HIDDEN)
    assert neftune_scale(ALPHA, SEQ, HIDDEN) == pytest.approx(bound)
    # fp32 adds: the noise read back through (emb + noise) - emb is exact to a few ulps of the embedding
    assert noise.abs().max() <= bound * (1 + 1e-5) + 1e-6
    # uniform on [-b, b]: 16k samples reach 0.99 b, spread b/sqrt(3), mean ~0
    assert noise.abs().max() >= 0.99 * bound
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert abs(noise.mean().item()) < 0.02 * bound
    # fresh noise every forward
    assert not torch.equal(noise, embedding_noise(model, input_ids()))


def test_noise_scales_with_sequence_length() -> None:
    model = micro_model().train()
    apply_neftune(model, ALPHA)
    short = input_ids()[:, :16]
    noise = embedding_noise(model, short)
    assert noise.abs().max() <= ALPHA / math.sqrt(16 * HIDDEN) * (1 + 1e-5) + 1e-6
    assert noise.abs().max() >= 0.98 * ALPHA / math.sqrt(16 * HIDDEN)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_off_adds_nothing(alpha) -> None:
    model = micro_model().train()
    assert apply_neftune(model, alpha) is None
    assert torch.equal(embedding_noise(model, input_ids()), torch.zeros(BATCH, SEQ, HIDDEN))


def test_eval_and_no_grad_logits_are_bit_identical_to_no_neftune() -> None:
    plain, noisy = micro_model(), micro_model()
    apply_neftune(noisy, ALPHA)
    ids = input_ids()
    plain.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.equal(noisy(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert torch.equal(noisy(input_ids=ids).logits, plain(input_ids=ids).logits)  # eval with grad on
    plain.train(), noisy.train()
    with torch.no_grad():  # a training-mode model under no_grad (generation from the loop) is clean too
        assert torch.equal(noisy(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert not torch.equal(noisy(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_generate_is_bit_identical_to_no_neftune(mode) -> None:
    plain, noisy = micro_model(), micro_model()
    apply_neftune(noisy, ALPHA)
    getattr(plain, mode)(), getattr(noisy, mode)()
    ids = input_ids()[:2, :8]
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    a, b = plain.generate(ids, **kwargs), noisy.generate(ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits, strict=True):
        assert torch.equal(la, lb)


def test_hook_survives_a_meta_model_filled_later() -> None:
    """overdrive builds on the meta device and fills the shards afterwards: the hook stays on the module."""
    model = build_meta_model(LlamaConfig(**MICRO_LLAMA), "sdpa", "float32")
    reference = meta_reference(model)
    apply_neftune(model, ALPHA)
    materialize(model, reference, seed=0, device="cpu")
    model.train()
    noise = embedding_noise(model, input_ids())
    bound = ALPHA / math.sqrt(SEQ * HIDDEN)
    assert 0.99 * bound <= noise.abs().max() <= bound * (1 + 1e-5) + 1e-6


def test_run_perturbs_training_only(micro_config, text_file, tmp_path) -> None:
    """Through `overdrive train`: the evaluation before step 1 equals the run without NEFTune bit for bit,
    the first training loss (same weights, same batch) does not."""
    common = ["--max-steps", "2", "--logging-steps", "1", "--max-eval-batches", "2"]
    runs = {}
    for name, extra in {"plain": [], "neftune": ["--neftune-noise-alpha", "5"]}.items():
        out = tmp_path / name
        assert main(micro_args(micro_config, text_file, out, *common, *extra)) == 0
        records = read_metrics(out / "metrics.jsonl")
        runs[name] = (
            [r["eval_loss"] for r in records if "eval_loss" in r and r["step"] == 0],
            [r["loss"] for r in records if "loss" in r],
        )
        assert json.loads((out / "summary.json").read_text())["config"]["neftune_noise_alpha"] == (
            5.0 if extra else None
        )
    assert runs["plain"][0] == runs["neftune"][0]  # eval at step 0: bit-identical
    assert runs["plain"][1][0] != runs["neftune"][1][0]  # training forward: perturbed


def test_negative_alpha_exits_2(micro_config, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, "--neftune-noise-alpha", "-1"), capsys)
    assert "--neftune-noise-alpha must not be negative" in err
    assert not out.exists()


@pytest.mark.distributed
def test_tensor_parallel_run_adds_noise_after_the_embedding_reduction(
    micro_config, text_file, tmp_path
) -> None:
    """2-rank tp (vocab-parallel embedding, sequence parallel): the hook sees the summed, sequence-sharded
    embedding. Its eval before step 1 is the single-process one (1e-5, fp32), its first training loss is not."""
    from tests.train.test_strategies_e2e import torchrun

    common = ["--max-steps", "1", "--logging-steps", "1", "--max-eval-batches", "2", "--deterministic"]
    plain = tmp_path / "plain"
    assert main(micro_args(micro_config, text_file, plain, *common)) == 0
    out = tmp_path / "tp"
    argv = micro_args(micro_config, text_file, out, *common, "--strategy", "tp", "--neftune-noise-alpha", "5")
    proc = torchrun(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (eval_a, loss_a), (eval_b, loss_b) = (
        (
            next(r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if r["step"] == 0),
            next(r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r),
        )
        for run in (plain, out)
    )
    assert abs(eval_a - eval_b) <= 1e-5 * eval_a
    assert abs(loss_a - loss_b) > 1e-4
