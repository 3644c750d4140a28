"""`lorakit merge`: an adapter folded into its base, streamed shard by shard and verified; several
runs' adapters combined first.

Modules: `command` (`merge`: one run or several, and the option rules), `fold` (one run: the job, the
streamed merge, NF4 round trip, card), `combine` (several runs: refusals, the combined directory),
`weighted` (peft's add_weighted_adapter on a weightless base, checked against the weighted sum),
`skeleton` (an adapter on a meta-device copy of its base, merged layer by layer), `verify` (merged vs
base + adapter logits).
"""
