"""Stage 5, text writing: background descriptions for inpainting and the refined instruction/answer pair.

`TextWriter` is the replaceable interface (``complete(prompt, seed) -> text``). Two implementations:

- `TransformersTextWriter`: a local transformers causal LM (its chat template when the tokenizer has one).
- `OpenAITextWriter`: any OpenAI-compatible HTTP endpoint (``POST {url}/chat/completions``) given by URL,
  called with `urllib`; the API key is read from an environment variable and never recorded.

The prompts live in a JSON file the user can edit (`load_prompts`; the default ships with the package as
``sam_fast/synthesis/prompts.json``).
"""

from __future__ import annotations

import json
import os
import string
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from sam_fast.synthesis.errors import SynthesisError, load_local

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
_FIELDS = {"background": {"object", "caption"}, "refine": {"object", "caption", "instruction"},
           "instructions": {"images"}}
MAX_RESPONSE_BYTES = 1 << 20
"""Largest HTTP response read from a text endpoint."""


@runtime_checkable
class TextWriter(Protocol):
    """Completes a prompt; `seed` makes sampling repeatable where the backend allows it."""

    def complete(self, prompt: str, seed: int) -> str: ...

    def describe(self) -> dict: ...


@dataclass
class Prompts:
    """The text prompts: `background` and `refine` templates and the `instructions` templates list."""

    background: str
    refine: str
    instructions: list[str]
    source: str = "built-in"

    def to_dict(self) -> dict:
        """The prompts as a JSON-ready dict."""
        return {"background": self.background, "refine": self.refine, "instructions": list(self.instructions)}


def _check_template(path, key: str, template, allowed: set[str]) -> str:
    if not isinstance(template, str) or not template.strip():
        raise SynthesisError(f"{path}: '{key}' must be a non-empty string")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise SynthesisError(f"{path}: '{key}' is not a valid template ({e}); write a literal brace as {{{{ or }}}}")
    unknown = names - allowed
    if unknown:
        raise SynthesisError(f"{path}: '{key}' uses unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return template


def load_prompts(path: str | os.PathLike | None = None) -> Prompts:
    """Read and check a prompts JSON file (default: the one shipped with the package)."""
    p = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SynthesisError(f"--prompts {p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SynthesisError(f"--prompts {p}: not a readable JSON file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise SynthesisError(f"--prompts {p}: must hold a JSON object with background, refine and instructions")
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise SynthesisError(f"--prompts {p}: missing {missing}")
    inst = data["instructions"]
    if not isinstance(inst, list) or not inst:
        raise SynthesisError(f"{p}: 'instructions' must be a non-empty list of strings")
    return Prompts(_check_template(p, "background", data["background"], _FIELDS["background"]),
                   _check_template(p, "refine", data["refine"], _FIELDS["refine"]),
                   [_check_template(p, f"instructions[{i}]", t, _FIELDS["instructions"]) for i, t in enumerate(inst)],
                   source=str(p))


class TransformersTextWriter:
    """A local transformers causal LM.

    Args:
        model: an `AutoModelForCausalLM` model.
        tokenizer: its tokenizer; its chat template, if any, wraps the prompt as one user message.
        max_new_tokens: longest completion.
        do_sample: sample (seeded by `complete`'s seed) instead of greedy decoding.
        temperature: sampling temperature.
        name: the model name recorded in the manifest.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 0.7,
                 name: str = "causal-lm"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_new_tokens, self.do_sample, self.temperature = int(max_new_tokens), bool(do_sample), float(temperature)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kwargs) -> TransformersTextWriter:
        """Load a causal LM and its tokenizer from a local directory (never downloads)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok, model = load_local("--text-model", path, "a causal LM", lambda: (
            AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False),
            AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=dtype,
                                                 use_kernels=False)))
        if device is not None:
            model.to(device)
        return cls(model, tok, name=str(path), **kwargs)

    def complete(self, prompt: str, seed: int) -> str:
        """The model's continuation of `prompt` (new tokens only, special tokens removed)."""
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        kw = {"do_sample": self.do_sample, "max_new_tokens": self.max_new_tokens, "pad_token_id": pad}
        if self.do_sample:
            kw["temperature"] = self.temperature
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(seed))
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()

    def describe(self) -> dict:
        """What the manifest records about this stage."""
        return {"kind": "transformers", "model": self.name, "max_new_tokens": self.max_new_tokens,
                "do_sample": self.do_sample, "temperature": self.temperature if self.do_sample else None}


class OpenAITextWriter:
    """An OpenAI-compatible chat-completions endpoint.

    Args:
        url: the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` URL; http(s) only.
        model: the model name sent in each request.
        api_key_env: the environment variable holding the API key (sent as a Bearer token when set).
        timeout: seconds per request.
        opener: the function that sends a `urllib.request.Request` (default `urllib.request.urlopen`).
    """

    def __init__(self, url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", max_tokens: int = 256,
                 temperature: float = 0.7, timeout: float = 120.0, opener=None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SynthesisError(f"--text-url {url!r}: must be an http:// or https:// URL")
        if parsed.username or parsed.password:
            raise SynthesisError("--text-url: put the API key in the environment variable named by --text-api-key-env, "
                                 "not in the URL")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if not model:
            raise SynthesisError("--text-url needs --text-api-model (the model name the endpoint serves)")
        self.model, self.api_key_env, self.max_tokens = model, api_key_env, int(max_tokens)
        self.temperature, self.timeout = float(temperature), float(timeout)
        self.opener = opener or urllib.request.urlopen

    def complete(self, prompt: str, seed: int) -> str:
        """POST one chat message; returns the first choice's content."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": int(seed)}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with self.opener(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise SynthesisError(f"text endpoint {self.endpoint}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise SynthesisError(f"text endpoint {self.endpoint}: {getattr(e, 'reason', e)}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise SynthesisError(f"text endpoint {self.endpoint}: response over {MAX_RESPONSE_BYTES} bytes")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise SynthesisError(f"text endpoint {self.endpoint}: the response is not an OpenAI chat completion "
                                 f"({raw[:120]!r})") from None
        if not isinstance(content, str):
            raise SynthesisError(f"text endpoint {self.endpoint}: the message content is not text")
        return content.strip()

    def describe(self) -> dict:
        """What the manifest records about this stage (no API key)."""
        return {"kind": "openai", "url": self.endpoint, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
