"""What the ingress refuses in a prompt before it tokenizes it: text that is not text, and text
no context could hold. Tokenizing is the costly step, so these checks come first."""

from __future__ import annotations

from collections.abc import Iterable

from pdserve.errors import InvalidRequest

MAX_CHARS_PER_TOKEN = 32
"""A text longer than this many characters per token of context is refused before it is
tokenized (no tokenizer packs more into its tokens: it could not fit)."""


def check_text(texts: Iterable[str], param: str) -> None:
    """Text that cannot be encoded as UTF-8 (a lone surrogate, which JSON's \\uD800 escapes can carry)
    is the client's error, not a tokenizer crash."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidRequest(f"{param} holds a character that is not valid text ({err.reason} at "
                                 f"position {err.start})", param=param) from None


def check_chars(chars: int, max_model_len: int, param: str) -> None:
    """Refuse a text of `chars` characters that no tokenizer could fit in `max_model_len` tokens."""
    if chars > max_model_len * MAX_CHARS_PER_TOKEN:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens; {chars} characters of "
            f"prompt are more than {MAX_CHARS_PER_TOKEN} per token", param=param, code="context_length_exceeded")
