"""The run directory, the contract between commands (DESIGN.md): claiming it, the files lorakit
writes in it, and reading several runs together.

Modules: `directory` (claim, recipe.yaml, manifest.json, model card, generation config, the swap of a
finished output into place), `group` (several runs for `merge`, `eval`, `generate`: names, same-base checks),
`lock` (one writer per run: the exclusive lock `train` holds, the shared one readers hold).
"""
