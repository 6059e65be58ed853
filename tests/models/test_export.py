"""The exported student carries the trained weights at full precision, from any ZeRO stage and precision."""

from __future__ import annotations

import pytest
import torch

from helpers import make_bert, make_tokenizer


@pytest.mark.parametrize("ds_config", ["ds_configs/student_zero2.json", "ds_configs/student_zero3.json"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_export_writes_the_fp32_master_weights(tmp_path, ds_config, bf16):
    """Under bf16 the module holds bf16 copies; the export must carry DeepSpeed's fp32 masters instead, or every
    exported weight (and a stage 2 started from it) is rounded to 8 bits of mantissa."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import AutoModel

    from arc_dist.engine.distributed import init_distributed, load_ds_config
    from arc_dist.models.export import export_hf_model

    env = init_distributed()
    tok = make_tokenizer(tmp_path / "tok")
    model = make_bert(None, vocab_size=len(tok), layers=2, hidden=32, heads=4, intermediate=64, seed=1)
    model.pooler.requires_grad_(False)  # a frozen part has no master weights: written as the module holds it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ds = load_ds_config(ds_config, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                    "gradient_clipping": 1.0, "bf16.enabled": bf16})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        engine.backward(engine(input_ids=ids).last_hidden_state.float().pow(2).mean())
        engine.step()

    expected = {}
    for name, p in model.named_parameters():
        master = safe_get_full_fp32_param(p)
        expected[name] = None if master is None else master.detach().clone()
    export_hf_model(engine, model, tok, tmp_path / "export", env.rank)
    exported = dict(AutoModel.from_pretrained(tmp_path / "export").named_parameters())

    assert exported.keys() == expected.keys()
    trained = [n for n, m in expected.items() if m is not None]
    assert trained and all(not n.startswith("pooler.") for n in trained)
    for name in trained:
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], expected[name].reshape(exported[name].shape)), name
    word = exported["embeddings.word_embeddings.weight"]
    rounded = torch.equal(word, word.to(torch.bfloat16).float())
    assert rounded is False, "the exported weights are bf16-rounded: the fp32 masters were not used"
    assert torch.equal(exported["pooler.dense.weight"], make_bert(
        None, vocab_size=len(tok), layers=2, hidden=32, heads=4, intermediate=64, seed=1).pooler.dense.weight.to(
        torch.bfloat16 if bf16 else torch.float32).float())


def test_export_writes_tied_weights_from_the_shared_master(tmp_path):
    """A tied pair (a masked-LM decoder sharing the word embeddings) is one parameter with one fp32 master, but two
    state-dict names: both names must be written from that master, not the second one from the bf16 working copy."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file
    from transformers import AutoConfig, BertForMaskedLM

    from arc_dist.engine.distributed import init_distributed, load_ds_config
    from arc_dist.models.export import export_hf_model

    env = init_distributed()
    tok = make_tokenizer(tmp_path / "tok")
    torch.manual_seed(2)
    model = BertForMaskedLM(AutoConfig.for_model("bert", vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64))
    word = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is word, "the test needs a tied model"
    ds = load_ds_config("ds_configs/student_zero2.json", {"train_micro_batch_size_per_gpu": 2,
                                                          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                                                          "bf16.enabled": True})
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=ds)
    ids = torch.randint(5, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    master = safe_get_full_fp32_param(word).detach().clone()
    export_hf_model(engine, model, tok, tmp_path / "export", env.rank)
    written = load_file(tmp_path / "export" / "model.safetensors")
    tied_names = [n for n in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")
                  if n in written]
    assert "bert.embeddings.word_embeddings.weight" in tied_names
    for name in tied_names:
        assert torch.equal(written[name], master), f"{name} was not written from the fp32 master"
