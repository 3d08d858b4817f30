"""`python -m fwray.export`: a saved model (no training) exported for transformers and loaded back offline: logits,
greedy tokens and the tokenizer against fwray's own; the safetensors format for any recipe; the folder written
whole or not at all; one-line errors."""
import pytest
import torch

from fwray import config, export, sample
from fwray.core import checkpoint, tokens
from fwray.core.model import GPT, encode_prompt
from pipeline import sqlite_store

transformers = pytest.importorskip("transformers")  # the dev (and export) extra

GPT2 = config.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
MODERN = config.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, recipe="modern")


def trained_ish(cfg: config.ModelConfig) -> GPT:
    """Random weights large enough to matter (at init, biases are 0 and norms 1): every mapped tensor is exercised."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1).add_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A gpt2-recipe model's folder as fwray.run leaves it, and its hf export."""
    base = tmp_path_factory.mktemp("export")
    model = trained_ish(GPT2)
    checkpoint.save_model(base / "model", config.Experiment(model=GPT2), model.state_dict(), step=5, val_loss=None)
    assert export.main(["--checkpoint", str(base / "model"), str(base / "hf")]) == 0
    return model, base


def test_transformers_loads_the_export_offline_with_fwrays_logits(exported, monkeypatch):
    model, base = exported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == tokens.VOCAB_SIZE
    assert next(hf.parameters()).dtype == torch.float32
    idx = torch.randint(0, tokens.VOCAB_SIZE, (2, GPT2.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.logits(model.hidden(idx))[..., :tokens.VOCAB_SIZE]  # the 50257 ids; fwray pads to 50304
        got = hf(idx).logits
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4


def test_greedy_generation_matches_fwray_sample(exported, capsys):
    model, base = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(base / "hf")
    prompt, n = "The meaning of", 24
    ids = [tok.bos_token_id, *tok(prompt).input_ids]  # a document's start, as fwray reads it
    assert ids == encode_prompt(tokens.get_tokenizer(), prompt)
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    cut = ours.index(tokens.EOT) + 1 if tokens.EOT in ours else n  # transformers stops at EOT (eos)
    assert theirs == ours[:cut] and len(set(ours)) > 3  # not one token repeated
    assert sample.main(["--checkpoint", str(base / "model"), "--prompt", prompt, "--max-new-tokens", str(n),
                        "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + tok.decode(theirs[:cut], skip_special_tokens=True)


def test_the_tokenizer_encodes_as_tiktoken(exported):
    _, base = exported
    tok = transformers.AutoTokenizer.from_pretrained(base / "hf")
    enc = tokens.get_tokenizer()
    text = "Héllo  wörld!\n\n\tTabs, 日本語, émojis 🎉, numbers 1234567 and 'contractions' don't  end "
    assert tok(text).input_ids == enc.encode_ordinary(text)
    assert tok.decode(enc.encode_ordinary(text)) == text
    assert (len(tok), tok.eos_token_id, tok.bos_token_id) == (tokens.VOCAB_SIZE, tokens.EOT, tokens.EOT)


def test_safetensors_format_for_any_recipe_loads_back_in_fwray(tmp_path):
    model = trained_ish(MODERN)
    checkpoint.save_model(tmp_path / "model", config.Experiment(model=MODERN), model.state_dict(), 3, 4.5)
    assert export.main(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "st"), "--format", "safetensors"]) == 0
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["model.safetensors", "model_config.json"]
    again, meta = checkpoint.load_model(tmp_path / "st")
    assert meta["recipe"] == "modern" and meta["step"] == 3
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def fwray_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fwray:")]


def test_modern_recipe_as_hf_is_one_line_naming_the_format_that_works(tmp_path, capsys):
    checkpoint.save_model(tmp_path / "model", config.Experiment(model=MODERN), GPT(MODERN).state_dict(), 1, None)
    rc = export.main(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(fwray_lines(err)) == 1 and "model.positions = 'rotary'" in err
    assert "--format safetensors" in err and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_a_folder_that_is_not_empty_is_refused_unless_force(tmp_path, capsys):
    checkpoint.save_model(tmp_path / "model", config.Experiment(model=MODERN), GPT(MODERN).state_dict(), 1, None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--checkpoint", str(tmp_path / "model"), str(out), "--format", "safetensors"]
    rc = export.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and len(fwray_lines(err)) == 1 and "exists and is not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert export.main([*args, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    rc = export.main(["--checkpoint", str(tmp_path / "model"), str(tmp_path), "--force"])  # holds the model
    assert rc == 2 and "holds the model being exported" in capsys.readouterr().err


def test_a_failed_write_leaves_no_export(tmp_path, monkeypatch):
    checkpoint.save_model(tmp_path / "model", config.Experiment(model=GPT2), GPT(GPT2).state_dict(), 1, None)

    def crash(folder, state, meta):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full (test)")

    monkeypatch.setattr(export, "write_hf", crash)
    with pytest.raises(OSError):
        export.main(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "out")])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_run_id_is_one_line_exit_2(tmp_path, capsys):
    uri = sqlite_store(tmp_path / "mlflow.db")
    rc = export.main(["--run-id", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri, str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(fwray_lines(err)) == 1 and "no MLflow run" in err
