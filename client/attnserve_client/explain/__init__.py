"""`attnserve-client explain`: where a token's attention goes in the served layer of a real BERT.

explain.py computes it (with bert.py, the numpy BERT encoder, over checkpoints.py's reader and reference.py's float64
attention), render.py prints and draws it (page.html). Importing this package imports none of them: model/ uses the
checkpoint reader and the reference without the `explain` extra (tokenizers, matplotlib).
"""
