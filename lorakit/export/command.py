"""`lorakit export` as one call: which merged model to export (a merge directory, or a run: its verified merge,
merged first when it has none), the GGUF file and Ollama Modelfile written into a staging directory, the
file read back through transformers' GGUF reader and compared with the merged model on the run's own
examples, and only then moved into place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError, ModelError, RunFailed
from lorakit.rundir.directory import (
    MANIFEST,
    RECIPE,
    check_adapter,
    check_files,
    read_record,
)
from lorakit.rundir.lock import hold_for_reading
from lorakit.staging import remove_staging, staging_for, staging_path, swap_into_place

REPORT = "export_report.json"
MERGE_REPORT = "merge_report.json"
# Largest |GGUF - merged| logit difference accepted, relative to the largest merged logit (at least 1), and
# the least top-1 agreement: f16 and bf16 round every weight once (11 and 8 significant bits); q8_0 keeps
# blocks of 32 weights as 8-bit integers with one f16 scale each.
TOLERANCE = {"f16": (2e-2, 0.97), "bf16": (1e-1, 0.9), "q8_0": (1e-1, 0.9)}
K_QUANT_TOLERANCE = (3e-1, 0.8)  # 2 to 6 bits per weight: llama-quantize's own error, checked loosely
FALLBACK = [[{"role": "user", "content": text}] for text in ("Say hello.", "What is two plus two?", "Name a colour.")]
GREEDY_PROMPTS, GREEDY_TOKENS = len(FALLBACK), 16  # greedy replies compared, informative: a near-tie may flip one token


@dataclass
class Source:
    merged: Path
    run_dir: Path | None  # the run it came from, when still there (recipe, data, end-of-turn token)
    merge_report: dict | None  # the merge made by this call, if any


@dataclass
class Exported:
    report: dict
    output: Path
    merged_now: dict | None


def export(
    source: Path,
    *,
    fmt: str,
    outtype: str,
    output: Path | None,
    overwrite: bool,
    verify: bool,
    console,
    accept_changed_adapter: bool = False,
):
    from lorakit.merge import fold

    if fmt != "gguf":
        raise LorakitError(f"--format: expected gguf, got {fmt!r}")
    from lorakit.console import quiet_libraries

    quiet_libraries()
    found = _source(Path(source).expanduser().resolve(), console, accept_changed_adapter)
    from lorakit.export import writer

    config = json.loads((found.merged / "config.json").read_text())
    tokenizer_json = (
        json.loads((found.merged / "tokenizer.json").read_text()) if (found.merged / "tokenizer.json").is_file() else {}
    )
    reason = writer.refusal(config, tokenizer_json, outtype)
    if reason:
        raise ModelError(f"lorakit export: {reason}")
    out = output.expanduser().resolve() if output else _default_output(found)
    fold.check_output(out, overwrite, report=REPORT, what="export")
    name = (found.run_dir or found.merged).name
    report = _write_and_check(found, out, outtype, name, verify, console)
    return Exported(report, out, found.merge_report)


def _source(path: Path, console, accept_changed: bool) -> Source:
    """A merge directory, or a run (its verified merge, made now when it has none). A merged model whose
    files no longer match the hashes its merge report recorded is refused (or used, with `accept_changed`)."""
    if (path / MERGE_REPORT).is_file() and (path / "config.json").is_file():
        report = _merged(path, console, accept_changed)
        run = Path(report.get("run", ""))
        return Source(path, run if (run / MANIFEST).is_file() else None, None)
    hold_for_reading(path)
    if (path / RECIPE).is_file() and (path / "adapter_config.json").is_file():
        merged = path / "merged"
        if (merged / MERGE_REPORT).is_file():
            check_adapter(path, read_record(path / MANIFEST), accept_changed)
            if _merged(merged, console, accept_changed).get("verification", {}).get("passed"):
                return Source(merged, path, None)
        from lorakit.merge import fold

        console.print(f"{path.name} has no verified merge: merging it first (lorakit merge {path})", highlight=False)
        job = fold.plan(path, overwrite=merged.exists(), accept_changed_adapter=accept_changed)
        made = fold.run(job, check=True, console=console)
        return Source(job.output, path, made)
    raise LorakitError(f"{path} is neither a lorakit run nor a merged model (no {RECIPE} or {MERGE_REPORT})")


def _merged(path: Path, console, accept_changed: bool) -> dict:
    report = read_record(path / MERGE_REPORT)
    meaning = "the merged model that was verified"
    notice = check_files(path, report.get("files_sha256") or {}, MERGE_REPORT, meaning, accept_changed)
    if notice:
        console.print(notice, highlight=False)
    return report


def _default_output(found: Source) -> Path:
    if found.run_dir and found.merged.parent == found.run_dir:
        return found.run_dir / "gguf"
    return found.merged.with_name(f"{found.merged.name}-gguf")


def _write_and_check(found: Source, out: Path, outtype: str, name: str, verify: bool, console) -> dict:
    from transformers import AutoTokenizer

    from lorakit.export import ollama, writer

    tokenizer = AutoTokenizer.from_pretrained(found.merged)
    manifest = read_record(found.run_dir / MANIFEST) if found.run_dir else {}
    end_of_turn = _end_of_turn(found, manifest, tokenizer)
    recipe = _recipe(found)
    conversations = _conversations(recipe)
    layout, no_modelfile = None, "the run has no chat template"
    if tokenizer.chat_template:
        try:
            layout, no_modelfile = ollama.layout(tokenizer, conversations), None
        except LorakitError as exc:  # the GGUF (which embeds the Jinja template) is still right
            no_modelfile = str(exc)
    config = json.loads((found.merged / "config.json").read_text())
    pre = (manifest.get("base_gguf") or {}).get("tokenizer_pre")
    vocab = writer.vocabulary(tokenizer, config["vocab_size"], pre)
    file_name = f"{name}-{outtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    try:
        staging_for(out)
        console.print(f"writing {file_name} ({outtype}) from {found.merged}", highlight=False)
        if outtype in writer.K_QUANTS:
            counts = writer.write(found.merged, staging / f"{name}-f16.gguf", "f16", vocab, end_of_turn, name)
            writer.k_quantize(staging / f"{name}-f16.gguf", staging / file_name, outtype)
            counts = {f"{writer.QUANTIZE} {outtype.upper()} from": counts}
        else:
            counts = writer.write(found.merged, staging / file_name, outtype, vocab, end_of_turn, name)
        stops = sorted({tokenizer.convert_ids_to_tokens(end_of_turn), tokenizer.eos_token} - {None})
        if layout is not None:
            (staging / "Modelfile").write_text(ollama.modelfile(file_name, layout, stops))
        report = {
            "merged": str(found.merged),
            "run": str(found.run_dir) if found.run_dir else None,
            "file": file_name,
            "outtype": outtype,
            "bytes": (staging / file_name).stat().st_size,
            "tensor_types": counts,
            "tokenizer_pre": vocab.pre,
            "end_of_turn_token": tokenizer.convert_ids_to_tokens(end_of_turn),
            "stop": stops,
            "modelfile": "Modelfile" if layout is not None else None,
            **({"no_modelfile": no_modelfile} if no_modelfile else {}),
        }
        if verify:
            prompts = _prompts(tokenizer, conversations)
            stop_ids = sorted({end_of_turn, tokenizer.eos_token_id} - {None})
            report["verification"] = _verify(
                found.merged, staging, file_name, tokenizer, recipe, outtype, prompts, stop_ids
            )
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if verify and not report["verification"]["passed"]:
            failed = out.parent / f"{out.name}.export_report.failed.json"
            failed.write_text(json.dumps(report, indent=2) + "\n")
            raise RunFailed(
                f"the GGUF file does not compute what the merged model does ({report['verification']['reason']}); "
                f"nothing was written to {out}; figures in {failed}"
            )
        swap_into_place(staging, out)
    finally:
        remove_staging(staging)
    return report


def _end_of_turn(found: Source, manifest: dict, tokenizer) -> int:
    """The token the run's turns end on (manifest), else the last stop token the merge saved."""
    token = manifest.get("end_of_turn_token")
    if token is not None:
        return tokenizer.convert_tokens_to_ids(token)
    path = found.merged / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return (eos[-1] if isinstance(eos, list) and eos else eos) if eos is not None else tokenizer.eos_token_id


def _recipe(found: Source):
    if not found.run_dir:
        return None
    from lorakit.recipe.loading import load_recipe

    return load_recipe(found.run_dir / RECIPE)


def _conversations(recipe) -> list[list[dict]]:
    """The run's own conversations (eval split), for checking the Modelfile layout; built-in ones without."""
    from lorakit import data as data_mod

    if recipe is None:
        return FALLBACK
    try:
        return data_mod.conversations(recipe.data, recipe.train.seed) or FALLBACK
    except (LorakitError, OSError):
        return FALLBACK


def _prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """The first conversations as prompts for a reply: the chat template's generation prompt, else the text."""
    chats = conversations[:GREEDY_PROMPTS]
    if tokenizer.chat_template:
        return [
            list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in chats
        ]
    return [tokenizer(c[-1]["content"])["input_ids"] for c in chats]


def _greedy(model, prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    """Each prompt's greedy reply (token ids, up to the first stop token), one prompt at a time."""
    import torch

    replies = []
    model.eval()
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                eos_token_id=stops or None,  # none known: the reply runs to max_new_tokens
                pad_token_id=stops[0] if stops else 0,  # one prompt, never padded
            )
        tokens = out[0, len(ids) :].tolist()
        replies.append(tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))])
    return replies


def _verify(
    merged: Path, staging: Path, file_name: str, tokenizer, recipe, outtype: str, prompts: list, stops: list[int]
) -> dict:
    """The file read back by transformers (dequantized to float32) against the merged model, on the run's
    examples: logits, top-1 agreement, and the read-back tokenizer and chat template (which decide), and
    the greedy replies to the first prompts (reported)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.merge import verify

    if recipe is not None:
        inputs, where = verify.inputs_for(recipe, tokenizer)
    else:
        inputs = _prompts(tokenizer, FALLBACK)
        where = "built-in prompts (the run is not readable)"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    replies = _greedy(model, prompts, stops)
    reference = verify.logits(model, inputs)
    del model  # one model in memory at a time
    gc.collect()
    back = AutoModelForCausalLM.from_pretrained(staging, gguf_file=file_name, dtype=torch.float32)
    replies_back = _greedy(back, prompts, stops)
    figures = verify.compare(reference, verify.logits(back, inputs))
    del back
    back_tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=file_name)
    texts = [tokenizer.decode(ids) for ids in inputs]
    same_ids = all(
        back_tokenizer(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    rtol, top1 = TOLERANCE.get(outtype, K_QUANT_TOLERANCE)
    reason = ""
    if figures["max_abs_diff"] > rtol * figures["max_abs_logit"]:
        reason = "logits outside tolerance"
    elif figures["top1_agreement"] < top1:
        reason = "top-1 agreement too low"
    elif not same_ids:
        reason = "the tokenizer read back from the file splits the examples differently"
    elif back_tokenizer.chat_template != tokenizer.chat_template:
        reason = "the chat template read back from the file differs"
    return {
        "inputs": f"{len(inputs)} of {where}",
        "gguf_vs_merged": figures,
        "tolerance": f"<= {rtol * figures['max_abs_logit']:.2g}, top-1 >= {top1:.0%}",
        "tokenizer_identical": same_ids,
        "chat_template_identical": back_tokenizer.chat_template == tokenizer.chat_template,
        "greedy_replies": {
            "prompts": len(prompts),
            "max_new_tokens": GREEDY_TOKENS,
            "identical": sum(a == b for a, b in zip(replies, replies_back)),
        },
        "reason": reason,
        "passed": not reason,
    }
