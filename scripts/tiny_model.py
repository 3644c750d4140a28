"""Build, offline and deterministically, the tiny Llama test model that lorakit's tests and quickstart use.

Owns: the BPE tokenizer (trained on `scripts.make_examples.all_texts()`), its special tokens and ChatML
chat template, and the randomly initialised 4-layer Llama (GQA: 4 query heads, 2 key/value heads),
saved in float32 safetensors so plain `AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)` work.

Tokenizer facts tests may rely on:
  * `<|begin_of_text|>` is bos; `<|im_end|>` is eos, end of turn AND pad (pad == eos on purpose).
  * `tokenizer(text)` prepends bos (TemplateProcessing post-processor); with add_special_tokens=False
    it does not. The chat template writes `{{ bos_token }}` itself, so tokenize rendered chat text with
    add_special_tokens=False (apply_chat_template(tokenize=True) already does).
  * Fast tokenizer: offset mappings work. No `{% generation %}` markers in the template.

    python scripts/tiny_model.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.make_examples import all_texts

BOS, IM_START, EOS = "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# initializer_range 0.1 (not Llama's 0.02): lm_head is frozen under LoRA, and with std 0.02 its rows are
# too short for any hidden state to give a confident next token, so a random model could not learn.
# vocab_size is the trainer's target; it stops at 429 once every word of the corpus is one token.
PARAMS = {
    "version": 1,
    "vocab_size": 448,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
}
MARKER = "tiny_model_build.json"  # written last: its presence means the build is complete


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=PARAMS["vocab_size"],
        special_tokens=[BOS, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(all_texts(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START],
        model_max_length=PARAMS["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def _build(out: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    p = {k: v for k, v in PARAMS.items() if k not in ("version", "vocab_size")}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        torch_dtype="float32",
        **p,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny model + tokenizer into out_dir (cached: a complete build with the same
    parameters returns at once; otherwise built in a temp dir and renamed into place)."""
    out = Path(out_dir).resolve()
    want = {**PARAMS, "seed": seed}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{out} exists and is not a tiny-model build; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _build(tmp, seed)
        (tmp / MARKER).write_text(json.dumps(want, sort_keys=True) + "\n")
        if out.exists():  # empty dir, or a stale build of ours
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError:
        # another process may have finished the same build first
        if not (marker.is_file() and json.loads(marker.read_text()) == want):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_model.py OUT_DIR")
    print(build_tiny_model(sys.argv[1]))
