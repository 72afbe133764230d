"""Text in and out of runtime.serve: the checkpoint's chat template, and generated ids turned into text
deltas (whole characters only, stop strings matched and trimmed), as OpenAI's API defines them."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable

from runtime.errors import LoadError
from runtime.openai_api import ApiError


class ChatTemplate:
    """The checkpoint's chat template, rendered as transformers' apply_chat_template renders it: an
    ImmutableSandboxedEnvironment (trim_blocks, lstrip_blocks, loopcontrols), `raise_exception`, `strftime_now`
    and a non-escaping `tojson`; messages, add_generation_prompt=True and the special tokens in the context."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def load(cls, directory: Path) -> "ChatTemplate | None":
        """DIR/chat_template.jinja (newer transformers) or tokenizer_config.json's chat_template, else None."""
        config_file = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            jinja_file = directory / "chat_template.jinja"
            source = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name", "template"}]
                source = {t.get("name"): t.get("template") for t in source}.get("default")
            if not source:
                return None
            special = {}
            for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
                value = config.get(name)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    special[name] = value
            return cls(source, special)
        except Exception as e:  # noqa: BLE001 - bad JSON, a template that does not compile
            raise LoadError(f"{directory}: the chat template cannot be used: {e}") from None

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except Exception as e:  # noqa: BLE001 - raise_exception, undefined names, type errors: the messages' fault
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None


# ---------------------------------------------------------------------------------------------- text

class TextStream:
    """Generated ids to text deltas the way OpenAI streams them: a delta is released only when it decodes to
    whole characters (byte-level tokens may split one), text that may begin a stop string is held back, and
    a stop string ends the text (it is not part of it). Decodes a short window, not the whole text."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], context: list[int] = ()):
        self.decode, self.stops = decode, stops
        self.longest = max(map(len, stops), default=0)
        self.ids = list(context)
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] decode to text already released
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self.text += after[len(before):]
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped, final = self.text[:min(hits)], True, True
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that a stop string starts with."""
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                return k
        return 0
