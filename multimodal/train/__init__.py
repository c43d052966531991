"""Training LLaMA-Adapter V2 (the recipe the paper describes and the released code leaves out), and the
project's own demo model trained end to end on the generated toy world.

- ``data``: caption (CSV/JSONL) and instruction (Alpaca/LLaVA JSON) readers, tokenisation, batches.
- ``groups``: which parameters each data kind trains (the paper's disjoint groups, or the official phases).
- ``trainer``: the adapter training loop (AMP, accumulation, checkpoints, resume, DDP under torchrun).
- ``tokenizer``, ``lm``, ``clip``: the demo's own SentencePiece model, LLaMA and CLIP tower.
- ``demo``: the seeded stage plan that produces ``weights/demo``.

Run ``python -m multimodal.train --help``.
"""
