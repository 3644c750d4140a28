"""What can be known before training, without loading weights: `lorakit check`, `plan` and
`data preview`.

Modules: `check` (the findings, also run by `lorakit train`), `plan` (memory per GPU on the meta device,
suggestions, time), `preview` (the prepared data rendered, and its figures).
"""
