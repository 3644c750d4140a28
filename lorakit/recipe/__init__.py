"""The recipe: its schema (one pydantic class per section, help text in the Field descriptions) and
reading it from YAML with `--set` overrides and errors that name file, line and key.

Modules: `section` (the base class: unknown keys refused), `schema` (`Recipe` and its sections),
`peft_sections` (the sections of the methods other than LoRA), `loading` (`load_recipe`). Imports only
pydantic and yaml, so a rejected recipe answers in well under a second.
"""
