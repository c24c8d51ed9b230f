"""A small CLIP BPE tokenizer written to disk, for the tiny presets.

It follows CLIP's byte-level BPE layout (``vocab.json`` + ``merges.txt``) so that ``CLIPTokenizer.from_pretrained``
loads it like any Stable Diffusion tokenizer. Merges are built so that every word of a given corpus becomes one
token; unknown words fall back to characters, so any prompt still tokenizes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

START, END = "<|startoftext|>", "<|endoftext|>"

# Words of radiology reports and of the other bundled domains; anything else is spelled out in characters.
BASE_WORDS = """
a an the of and with without no in on at to is are be seen there left right bilateral both upper middle lower
zone zones lung lungs field fields chest radiograph radiography x ray xray pa ap lateral view frontal portable
erect supine normal abnormal clear heart size cardiac silhouette enlarged cardiomegaly mild moderate severe small
large nodule nodules mass opacity opacities effusion effusions pleural pneumothorax consolidation atelectasis
edema costophrenic angle angles blunting blunted mediastinum mediastinal widened hilar hila diaphragm
hemidiaphragm elevated rib ribs fracture fractures device line tube acute cardiopulmonary process finding
findings impression unremarkable stable compared prior study patient male female adult child year old age
photograph photo face portrait person man woman smiling hair glasses background image picture of a an grayscale
axial brain mri t1 t2 lesion lesions lobe frontal parietal occipital temporal ventricle ventricles parenchyma focal
skull scalp midline shift
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training until every word is one symbol: applying the merges by rank then rebuilds each word
    exactly (a hand-made chain per word would not, since merges of different words compete)."""
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in corpus:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(sorted(counts), key=counts.__getitem__)
        merges.append(best)
        for k, symbols in enumerate(corpus):
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            corpus[k] = out


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    clean = sorted({w.lower() for w in words if re.fullmatch(r"[a-z0-9]{2,}", w.lower())})
    merges = learn_merges(clean)
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += [START, END]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str | Path, words: list[str] | None = None, max_length: int = 77) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(BASE_WORDS + list(words or []))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": START,
        "eos_token": END, "unk_token": END, "pad_token": END, "do_lower_case": True}), encoding="utf-8")
    return folder
