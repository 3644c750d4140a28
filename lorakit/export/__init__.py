"""`lorakit export`: a run's merged model written in another format, verified by reading it back.

Modules: `command` (`export`: the merged model to export, merging a run first when it has no verified
merge; staging, read-back verification, moving into place), `writer` (a merged checkpoint as one GGUF file
through the `gguf` package: tensor names, rotary layout, f16/bf16/q8_0, tokenizer and chat template; what it
refuses), `ollama` (the Modelfile: the chat template as an Ollama TEMPLATE, checked, and the stop tokens).
"""
