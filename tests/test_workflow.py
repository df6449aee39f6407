"""`turbokernels optimize` and `turbokernels eval` (workflow.py) end to end on a tiny Llama with a word-level
tokenizer, saved as a Hugging Face folder: a model in, an optimized checkpoint out, loaded back and evaluated."""
import os

import pytest
import torch

import turbokernels as tk
from turbokernels import cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the river town boats carried grain timber wool down to coast and mills along its banks turned day night "
         "when railway arrived in middle of century slowly disappeared most were closed or into warehouses").split()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hf")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def _text_file(tmp_path, n=160):
    g = torch.Generator().manual_seed(1)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g)]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words))
    return str(path)


def test_optimize_then_eval(hf_folder, tmp_path, capsys):
    text = _text_file(tmp_path)
    out = str(tmp_path / "out")
    assert cli.main(["optimize", hf_folder, "--int4", "--gptq", "--group-size", "32", "--calibration", text,
                     "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "14 x Int4Linear (g32, GPTQ)" in printed and "1 x kept: excluded" in printed
    assert {"model.safetensors", "turbokernels.json", "tokenizer.json"} <= set(os.listdir(out))
    model = tk.from_pretrained(out)
    assert sum(isinstance(m, tk.nn.Int4Linear) for m in model.modules()) == 14
    assert model.config._attn_implementation == "turbokernels"
    assert cli.main(["eval", hf_folder, out, "--text", text, "--decode", "4", "--rounds", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if "warning" not in ln]
    assert len(lines) == 3 and "perplexity" in lines[0] and "turbokernels checkpoint" in lines[1]
    assert "median of 2 interleaved rounds" in lines[0]
    assert lines[2].startswith(f"{out} (turbokernels checkpoint) vs {hf_folder} (Hugging Face): perplexity x")


def test_evaluate_perplexity_is_the_model_loss(hf_folder, tmp_path):
    from turbokernels import workflow
    _, tok, model, _ = workflow.load_model(hf_folder)
    text = open(_text_file(tmp_path)).read()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    r = workflow.evaluate(model, tok, text, decode_tokens=2, rounds=1)
    assert r["tokens"] == ids.shape[1] - 1 and r["ppl"] == pytest.approx(float(torch.tensor(loss).exp()), rel=1e-5)
    r2 = workflow.evaluate(model, tok, text, decode_tokens=2, rounds=1, window=50)  # windows: each scored alone
    assert r2["tokens"] == ids.shape[1] - 1 and r2["ppl"] > 1


@pytest.mark.parametrize("argv,message", [
    (["optimize", "/nonexistent/model", "--int4", "--out", "x"], "no such file or folder"),
    (["optimize", "HF", "--gptq", "--out", "x"], r"--gptq / --act-order quantize to int4: add --int4"),
    (["optimize", "HF", "--wanda", "--out", "x"], r"--wanda prunes to 2:4: add --sparse24"),
    (["optimize", "HF", "--no-attention", "--out", "x"], "nothing to do"),
    (["optimize", "HF", "--int4", "--group-size", "0", "--out", "x"], r"optimize\(group_size\)"),
    (["optimize", "HF", "--int4", "--gptq", "--calibration", "/nonexistent.txt", "--out", "x"],
     r"optimize\(calibration\): no such file"),
    (["eval", "HF", "--decode", "0"], r"eval\(decode\)"),
    (["eval", "HF", "--rounds", "0"], r"eval\(rounds\)"),
    (["eval", "HF", "--text", "/nonexistent.txt"], r"eval\(text\): no such file"),
])
def test_usage_errors(hf_folder, tmp_path, capsys, argv, message):
    import re
    argv = [hf_folder if a == "HF" else (str(tmp_path / a) if a == "x" else a) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "x")
