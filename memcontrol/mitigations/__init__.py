"""Published memorization mitigations, run as baselines against the mask search.

``captions``: training-time caption randomisation of Somepalli et al. 2023 (random caption replacement, random token
insertion, Gaussian noise on the text embedding), hooked into the training loop by ``train.caption_mitigation``.
``wen``: the inference-time mitigation of Wen et al. 2024 (the prompt's text embedding is optimised to lower the
text-conditional noise norm before sampling).
"""
