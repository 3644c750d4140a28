"""`lorakit eval`, `generate` and `chat`: tuned models and their base side by side.

Modules: `command` (each command as one call: targets, settings, option rules), `compare` (targets, loading
the models, loss, the eval run), `report` (report.json/md, samples, loss curve, the printed table, gates
missed), `generation` (batched generation with the run's stop tokens), `metrics` (text metrics and gates),
`harness` (lm-evaluation-harness tasks), `chat` (the terminal chat loop).
"""
